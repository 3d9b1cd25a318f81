"""Reconstruction quality of gradient-inversion attacks: MSE, PSNR, SSIM, LPIPS, label accuracy.

Images come in the project's range [-1, 1] and are scored de-normalised to [0, 1] with data
range 1, the convention of the DLG / Inverting Gradients papers. Reconstructions may leave the
valid range (DLG does not clamp), so both sides are clipped to [0, 1] first: a pixel cannot be
brighter than white. A batch comes back in arbitrary order, so images are paired by a minimum
total-MSE assignment before scoring. Only the evaluation calls this: it needs the private batch.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from skimage.metrics import structural_similarity
from torch import Tensor

log = logging.getLogger(__name__)
_LPIPS_BACKBONES = {"alex": "alexnet", "vgg": "vgg16", "squeeze": "squeezenet1_1"}


def _unit(images: Tensor, what: str) -> Tensor:
    x = torch.as_tensor(images).detach().to("cpu", torch.float64)
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4:
        raise ValueError(f"{what} must be NxCxHxW (or CxHxW), got {tuple(x.shape)}")
    return ((x + 1) / 2).clamp(0, 1)


def _pair(recon: Tensor, originals: Tensor) -> tuple[Tensor, Tensor]:
    r, o = _unit(recon, "reconstructions"), _unit(originals, "originals")
    if r.shape != o.shape:
        raise ValueError(f"reconstructions {tuple(r.shape)} and originals {tuple(o.shape)} differ")
    return r, o


def mse(recon: Tensor, originals: Tensor) -> Tensor:
    """Per-image mean squared error on [0, 1] images, paired in the given order."""
    r, o = _pair(recon, originals)
    return (r - o).pow(2).flatten(1).mean(dim=1)


def psnr(recon: Tensor, originals: Tensor) -> Tensor:
    """Per-image PSNR in dB, data range 1: ``10 log10(1 / MSE)`` (inf for identical images)."""
    return 10 * torch.log10(1 / mse(recon, originals))


def ssim(recon: Tensor, originals: Tensor) -> Tensor:
    """Per-image SSIM (scikit-image, data range 1, channels last for colour images)."""
    r, o = _pair(recon, originals)
    side = min(r.shape[-2:])
    win = min(7, side if side % 2 else side - 1)  # skimage's default 7, or the largest odd fit
    out = []
    for a, b in zip(r.numpy(), o.numpy(), strict=True):
        if a.shape[0] == 1:
            out.append(structural_similarity(a[0], b[0], data_range=1.0, win_size=win))
        else:
            out.append(
                structural_similarity(
                    np.moveaxis(a, 0, -1),
                    np.moveaxis(b, 0, -1),
                    data_range=1.0,
                    channel_axis=-1,
                    win_size=win,
                )
            )
    return torch.tensor(out, dtype=torch.float64)


def match(recon: Tensor, originals: Tensor) -> Tensor:
    """``order`` with ``recon[order[i]]`` the reconstruction assigned to ``originals[i]``.

    Hungarian assignment (``linear_sum_assignment``) minimising the total pairwise MSE.
    """
    r, o = _pair(recon, originals)
    cost = torch.cdist(o.flatten(1), r.flatten(1)).pow(2) / r[0].numel()
    rows, cols = linear_sum_assignment(cost.numpy())
    order = np.empty(len(rows), dtype=np.int64)
    order[rows] = cols
    return torch.from_numpy(order)


def label_accuracy(
    recon_labels: Sequence[int] | Tensor, true_labels: Sequence[int] | Tensor
) -> float:
    """Fraction of the true labels recovered, as multisets (the order is unknown)."""
    found = Counter(torch.as_tensor(recon_labels).flatten().tolist())
    truth = Counter(torch.as_tensor(true_labels).flatten().tolist())
    return sum((found & truth).values()) / max(1, sum(truth.values()))


def score_batch(
    recon: Tensor,
    originals: Tensor,
    recon_labels: Sequence[int] | Tensor | None = None,
    true_labels: Sequence[int] | Tensor | None = None,
) -> dict:
    """Match reconstructions to originals, then MSE / PSNR / SSIM per image and their means.

    ``label_accuracy`` is a multiset match of the label lists (None without labels);
    ``order`` is the assignment of :func:`match`.
    """
    order = match(recon, originals)
    paired = torch.as_tensor(recon)[order]
    per_mse, per_psnr = mse(paired, originals), psnr(paired, originals)
    per_ssim = ssim(paired, originals)
    labels_ok = None
    if recon_labels is not None and true_labels is not None:
        labels_ok = label_accuracy(recon_labels, true_labels)
    return {
        "mse": float(per_mse.mean()),
        "psnr": float(per_psnr.mean()),
        "ssim": float(per_ssim.mean()),
        "mse_per_image": per_mse.tolist(),
        "psnr_per_image": per_psnr.tolist(),
        "ssim_per_image": per_ssim.tolist(),
        "label_accuracy": labels_ok,
        "order": order.tolist(),
    }


def lpips_or_none(recon: Tensor, originals: Tensor, net: str = "alex") -> Tensor | None:
    """Per-image LPIPS (lower is closer), or None with a logged reason when unavailable.

    Needs the optional ``lpips`` package (not a fedleak dependency) and its backbone's
    pretrained weights already in the torch hub cache: nothing is downloaded here.
    """
    try:
        import lpips  # type: ignore[import-not-found]
    except ImportError:
        log.warning(
            "LPIPS skipped: the optional `lpips` package is not installed "
            "(fedleak does not depend on it)"
        )
        return None
    backbone = _LPIPS_BACKBONES.get(net, net)
    cached = Path(torch.hub.get_dir()) / "checkpoints"
    if not any(cached.glob(f"{backbone}-*.pth")):
        log.warning(
            "LPIPS skipped: the pretrained %s weights it needs are not in %s "
            "(no download is attempted)",
            backbone,
            cached,
        )
        return None
    try:
        model = lpips.LPIPS(net=net, verbose=False, pretrained=True)
    except Exception as exc:  # offline: the backbone weights cannot be fetched
        log.warning("LPIPS skipped: its %s weights are not available locally (%s)", net, exc)
        return None
    r, o = _pair(recon, originals)
    r, o = (t.float() * 2 - 1 for t in (r, o))  # LPIPS takes [-1, 1]
    if r.shape[1] == 1:
        r, o = r.repeat(1, 3, 1, 1), o.repeat(1, 3, 1, 1)
    with torch.no_grad():
        return model(r, o).flatten().double()
