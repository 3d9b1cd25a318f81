"""The attacker's generative image prior: a small DCGAN trained on auxiliary data, cached on disk.

GIAS (Jeon et al., NeurIPS'21) assumes the attacker holds a generator trained on data from (about)
the victims' distribution, never on the victims' own images: the caller passes an auxiliary set
disjoint from them (e.g. MNIST train for victims from MNIST test, or faces of other people).

The generator is Hitaj et al.'s DCGAN (``fedleak.models.hitaj.DCGANGenerator``, any widths) fed
with N(0, I) latents, the usual DCGAN input and the start distribution of the latent search. The
discriminator is the DCGAN mirror (strided 4x4 convolutions, LeakyReLU, BatchNorm). After
training, the BatchNorm running statistics are re-estimated over many latents in one cumulative
pass: the inversion runs the generator in eval mode, and the exponential averages collected during
adversarial training lag behind the final weights (eval-mode samples then look washed out).

Cache: ``cache_dir()/priors/<key>.pt``, the key hashing the settings and the images' bytes, so a
repeated study reuses the prior and any change of data or recipe trains a new one.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedleak.models.evaluator import cache_dir
from fedleak.models.hitaj import DCGANGenerator
from fedleak.runfolder import atomic_torch_save

PRIOR_VERSION = 1  # bump when the recipe below changes, so stale caches are not trusted


@dataclass(frozen=True)
class PriorSettings:
    """Everything that determines the trained prior (with the images): the cache key."""

    steps: int = 1500
    seed: int = 0
    widths: tuple[int, ...] = (128, 64, 32)
    latent_dim: int = 100
    batch_size: int = 64
    lr: float = 2e-4
    bn_samples: int = 2048


def latent_side(widths: tuple[int, ...]) -> int:
    """Output side of a DCGAN generator with these widths (4, doubled once per width)."""
    return 4 * 2 ** len(widths)


def build_generator(settings: PriorSettings, channels: int) -> DCGANGenerator:
    return DCGANGenerator(tuple(settings.widths), out_channels=channels, nz=settings.latent_dim)


class DCGANDiscriminator(nn.Module):
    """DCGAN discriminator: halves the image with 4x4 stride-2 convolutions down to 4x4."""

    def __init__(self, channels: int, side: int, width: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        cin, size = width, side // 2
        while size > 4:
            layers += [
                nn.Conv2d(cin, cin * 2, 4, 2, 1, bias=False),
                nn.BatchNorm2d(cin * 2),
                nn.LeakyReLU(0.2, True),
            ]
            cin, size = cin * 2, size // 2
        layers += [nn.Conv2d(cin, 1, 4, 1, 0)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).flatten()


def _fingerprint(images: Tensor) -> str:
    x = images.detach().to("cpu", torch.float32).contiguous()
    digest = hashlib.sha256(str(tuple(x.shape)).encode())
    digest.update(x.numpy().tobytes())
    return digest.hexdigest()[:16]


def prior_cache_path(images: Tensor, settings: PriorSettings) -> Path:
    """Where the prior for these images and settings is (or will be) cached."""
    blob = json.dumps({"v": PRIOR_VERSION, **asdict(settings)}, sort_keys=True)
    key = hashlib.sha256(blob.encode()).hexdigest()[:12]
    side = images.shape[-1]
    return cache_dir() / "priors" / f"dcgan{side}-{key}-{_fingerprint(images)}.pt"


def _adversarial_training(
    gen: DCGANGenerator, images: Tensor, settings: PriorSettings, rng: torch.Generator
) -> None:
    disc = DCGANDiscriminator(images.shape[1], images.shape[-1])
    opt_g = torch.optim.Adam(gen.parameters(), lr=settings.lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=settings.lr, betas=(0.5, 0.999))
    n, bs = len(images), settings.batch_size
    ones, zeros = torch.ones(bs), torch.zeros(bs)
    gen.train()
    for _ in range(settings.steps):
        real = images[torch.randint(0, n, (bs,), generator=rng)]
        fake = gen(torch.randn(bs, settings.latent_dim, generator=rng))
        d_loss = F.binary_cross_entropy_with_logits(
            disc(real), ones
        ) + F.binary_cross_entropy_with_logits(disc(fake.detach()), zeros)
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        # Non-saturating generator loss (Goodfellow et al.): strong gradients early on.
        g_loss = F.binary_cross_entropy_with_logits(disc(fake), ones)
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()


@torch.no_grad()
def recalibrate_batchnorm(
    gen: nn.Module, latent_dim: int, samples: int, rng: torch.Generator, batch: int = 256
) -> None:
    """Replace BN running statistics by their exact average over ``samples`` random latents."""
    norms = [m for m in gen.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs the same
    gen.train()
    for start in range(0, samples, batch):
        gen(torch.randn(min(batch, samples - start), latent_dim, generator=rng))
    for m in norms:
        m.momentum = 0.1
    gen.eval()


def _load(path: Path, settings: PriorSettings, channels: int) -> DCGANGenerator | None:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if blob["settings"] != asdict(settings) or blob["version"] != PRIOR_VERSION:
            return None
        gen = build_generator(settings, channels)
        gen.load_state_dict(blob["state_dict"])
    except Exception:  # a missing or damaged cache file only means: train again
        return None
    return gen.eval()


def train_dcgan_prior(
    images: Tensor,
    steps: int = PriorSettings.steps,
    seed: int = 0,
    *,
    widths: tuple[int, ...] = PriorSettings.widths,
    latent_dim: int = PriorSettings.latent_dim,
    batch_size: int = PriorSettings.batch_size,
    use_cache: bool = True,
) -> DCGANGenerator:
    """A DCGAN generator trained on ``images`` (N x C x H x W in [-1, 1]), in eval mode.

    ``H`` must equal ``4 * 2**len(widths)`` (32 for three widths, 64 for four). Returns the
    cached generator when one exists for the same images and settings; the global RNG is left
    untouched. Its ``prior_info`` attribute says whether it came from the cache and how long
    training took.
    """
    settings = PriorSettings(
        steps=steps,
        seed=seed,
        widths=tuple(widths),
        latent_dim=latent_dim,
        batch_size=batch_size,
    )
    side = latent_side(settings.widths)
    if images.ndim != 4 or images.shape[-1] != side or images.shape[-2] != side:
        raise ValueError(
            f"widths {settings.widths} generate {side}x{side} images, got {tuple(images.shape)}"
        )
    path = prior_cache_path(images, settings)
    if use_cache and path.is_file():
        cached = _load(path, settings, images.shape[1])
        if cached is not None:
            cached.prior_info = {"cached": True, "path": str(path), "seconds": 0.0}
            return cached
    rng = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):  # module init draws from the global RNG
        torch.manual_seed(seed)
        gen = build_generator(settings, images.shape[1])
        _adversarial_training(gen, images.detach().float().cpu(), settings, rng)
        recalibrate_batchnorm(gen, settings.latent_dim, settings.bn_samples, rng)
    seconds = time.perf_counter() - start
    if use_cache:
        blob = {
            "version": PRIOR_VERSION,
            "settings": asdict(settings),
            "state_dict": gen.state_dict(),
            "seconds": seconds,
        }
        atomic_torch_save(blob, path)
    gen.prior_info = {"cached": False, "path": str(path), "seconds": seconds}
    return gen
