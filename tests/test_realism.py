"""Scores that cannot be fooled: which sample sets the GAN-attack score calls a success, and why.

Every sample set below is one an attack, a broken generator or a lucky classifier could hand the
scorer. Real held-out images of the target class must succeed; blank, constant, mean, noise,
blob, collapsed and near-black model-inversion sets must not, whatever the evaluator's rate or
the nearest-neighbour distance says. The reason is in each test's name.
"""

from __future__ import annotations

import copy
import functools
import json
import math

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from fedleak.attacker.gan import train_generator
from fedleak.attacker.model_inversion import invert
from fedleak.data import ImageSet, load_dataset
from fedleak.metrics import realism
from fedleak.metrics.attack import (
    MEASURES,
    GeneratedScore,
    calibrate_realism,
    score_generated,
    score_samples,
)
from fedleak.metrics.realism import FrechetRealism, _Gaussian
from fedleak.models import build_classifier, build_generator
from fedleak.models.evaluator import cache_dir, get_evaluator
from fedleak.models.hitaj import sample_noise
from fedleak.training import local_sgd

N = 100  # the GAN attack's num-samples; it scores sets of 20-100


class FooledHead(nn.Module):
    """The real evaluator's feature space under a head that calls every image ``label``: the
    evaluator rate a passive GAN's blobs reached (98-100%), without changing the features."""

    def __init__(self, evaluator: nn.Module, label: int) -> None:
        super().__init__()
        self.evaluator, self.label = evaluator, label

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(len(x), self.evaluator.num_classes)
        out[:, self.label] = 10.0
        return out

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.evaluator.embed(x)


@pytest.fixture
def mnist(data_root) -> tuple[ImageSet, ImageSet]:
    return load_dataset("mnist", root=data_root), load_dataset("mnist", "test", root=data_root)


@pytest.fixture
def evaluator(data_root) -> nn.Module:
    return get_evaluator("mnist", root=data_root)[0]  # trained once per session, then cached


def _score(images: torch.Tensor, evaluator: nn.Module, train: ImageSet, **kw) -> GeneratedScore:
    kw.setdefault("target", 0)
    return score_samples(images, evaluator=evaluator, reference=train, **kw)


def _assert_not_realistic(s: GeneratedScore) -> None:
    record = s.to_dict()
    assert record["realistic"] is False and record["success"] is False
    assert record["realism"].startswith("not realistic: ")
    assert record["realism"][len("not realistic: ") :] in record["verdict"]


def _held_out_except(test: ImageSet, used: torch.Tensor) -> ImageSet:
    """The test split without the images being scored: the calibration never sees them."""
    keep = torch.ones(len(test), dtype=torch.bool)
    keep[used] = False
    return test.subset(keep.nonzero().flatten().numpy())


# --- real images succeed --------------------------------------------------------------------


@pytest.mark.parametrize(("target", "n"), [(0, 100), (0, 20), (3, 100)])
def test_real_held_out_digits_succeed_at_the_attacks_sample_sizes(
    mnist, evaluator, target: int, n: int
) -> None:
    train, test = mnist
    idx = (test.labels == target).nonzero().flatten()[-n:]  # the last writers of the test split
    s = _score(
        test.images[idx],
        evaluator,
        train,
        target=target,
        held_out=_held_out_except(test, idx),
    )
    assert s.fd <= s.fd_threshold and s.fd_size == n
    assert f"held-out class-{target} sets" in s.fd_calibration
    assert f"draws of {n};" in s.fd_calibration
    assert s.target_rate > 0.9 and 0.7 < s.diversity < 1.3
    assert s.realistic and s.success
    assert s.to_dict()["realism"] == "realistic" and s.to_dict()["verdict"] == "success"


def test_small_real_sets_need_a_threshold_calibrated_at_their_own_size(mnist, evaluator) -> None:
    """FD is biased upward for small sets: 20 real digits lie farther from their class than any
    of 100 draws of 100 real digits, so a threshold fitted to sets of 100 would reject them."""
    train, test = mnist
    idx = (test.labels == 0).nonzero().flatten()[-20:]
    frechet = FrechetRealism(evaluator, train, _held_out_except(test, idx), 0)
    small, large = frechet.calibrate(20), frechet.calibrate(100)
    assert small.real_p95 > 2 * large.real_p95
    fd = frechet.score(test.images[idx]).fd
    assert large.real_max < fd <= small.threshold


# --- constant images: close to real digits, not realistic ------------------------------------


def test_blank_images_fail_realism_although_nn_distance_is_small(mnist, evaluator) -> None:
    train, test = mnist
    s = _score(torch.full((N, 1, 32, 32), -1.0), evaluator, train)
    real = _score(test.images[test.labels == 0][:N], evaluator, train)
    # The old criterion's hole: a blank tile is nearer to real digits than real digits are.
    assert s.nn_l2_median < real.nn_l2_median < 15.0
    assert s.fd > s.fd_threshold and s.diversity == 0.0
    _assert_not_realistic(s)


def test_white_images_fail_realism(mnist, evaluator) -> None:
    train, _ = mnist
    s = _score(torch.full((N, 1, 32, 32), 1.0), evaluator, train, realism_threshold=None)
    assert s.fd > s.fd_threshold
    _assert_not_realistic(s)


def test_dataset_mean_repeated_fails_realism_although_it_lies_among_real_digits(
    mnist, evaluator
) -> None:
    train, _ = mnist
    mean = train.images.mean(0, keepdim=True).repeat(N, 1, 1, 1)
    s = _score(mean, evaluator, train)
    assert s.nn_l2_median < 15.0  # within the old realism threshold
    assert s.fd > s.fd_threshold
    _assert_not_realistic(s)


def test_one_real_image_repeated_fails_on_diversity_although_each_copy_is_a_real_target(
    mnist, evaluator
) -> None:
    """A real 0 repeated lies nearer its class (FD ~18) than the threshold (~44): no spread in
    the features, but the right mean. Only the diversity floor exposes the collapse."""
    train, test = mnist
    copies = test.images[test.labels == 0][:1].repeat(N, 1, 1, 1)
    s = _score(copies, evaluator, train)
    assert s.target_rate == 1.0 and s.nn_l2_median < 15.0  # every copy is a real 0
    assert s.diversity < 0.05  # but the set is one image
    assert s.realism_failures == [f"diversity {s.diversity:.2f} < {s.min_diversity:g}"]
    _assert_not_realistic(s)


# --- noise and blobs: what fools a classifier does not fool the FD ---------------------------


def test_gaussian_noise_fails_realism_even_when_the_evaluator_calls_it_the_target(
    mnist, evaluator
) -> None:
    train, _ = mnist
    g = torch.Generator().manual_seed(0)
    noise = (0.5 * torch.randn(N, 1, 32, 32, generator=g)).clamp(-1, 1)
    s = _score(noise, FooledHead(evaluator, 0), train, realism_threshold=None)
    assert s.target_rate == 1.0 and s.diversity > 0.5  # fooled rate, plenty of variety
    assert s.fd > s.fd_threshold
    _assert_not_realistic(s)
    # With the presets' NN-L2 bound the verdict also names the distance, as proximity only.
    record = _score(noise, FooledHead(evaluator, 0), train).to_dict()
    assert "nearest real image" in record["verdict"]
    assert "nearest real image" not in record["realism"]


@functools.cache
def _shared_model_and_passive_blobs(root: str) -> tuple[nn.Module, torch.Tensor]:
    """The passive GAN attack in miniature, with the project's own training steps.

    A Hitaj MNIST CNN is trained the way the federation trains it, in alternating turns of
    ``local_sgd`` by the victim (digits 0-4) and the attacker (5-9), with a larger learning rate
    than the paper so that 120 steps give a usable classifier. Between turns the attacker trains
    its DCGAN generator with ``train_generator`` (Algorithm 1, lines 6-8) so that a frozen copy
    of the shared model calls its images a 0, and injects nothing: the passive variant. What the
    shared model calls a 0 after this is what the passive attack's samples look like: blobs.
    """
    train = load_dataset("mnist", root=root)
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = build_classifier("hitaj-mnist", 11)
    victim, attacker = train.of_classes(range(5)), train.of_classes(range(5, 10))
    generator = build_generator("hitaj-mnist")
    for turn in range(6):
        data = victim if turn % 2 == 0 else attacker
        local_sgd(model, data, steps=20, batch_size=64, lr=0.05, momentum=0.9, generator=g)
        if turn % 2 == 1:
            disc = copy.deepcopy(model)
            train_generator(generator, disc, 0, steps=15, batch=32, lr=0.02, rng=g)
    generator.eval()
    with torch.no_grad():
        blobs = generator(sample_noise(N, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
    return model.eval(), blobs


def test_passive_attack_blobs_fail_realism_although_the_shared_model_calls_them_the_target(
    mnist, evaluator, data_root
) -> None:
    train, _ = mnist
    shared, blobs = _shared_model_and_passive_blobs(str(data_root))
    with torch.no_grad():
        assert float((shared(blobs).argmax(1) == 0).double().mean()) >= 0.9
    for judge in (evaluator, FooledHead(evaluator, 0)):  # the real rate, and a fooled one
        s = _score(blobs, judge, train, realism_threshold=None)
        assert s.fd > s.fd_threshold
        _assert_not_realistic(s)


def test_a_generator_that_fools_the_evaluator_itself_still_fails_realism(mnist, evaluator) -> None:
    """The worst case for the rate: G is trained against (a copy of) the evaluator, the way the
    GAN attack trains against the shared model, until the evaluator calls its images a 0."""
    train, _ = mnist
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    generator = build_generator("hitaj-mnist")
    fixed = sample_noise(N, generator=torch.Generator().manual_seed(1))
    for _ in range(8):
        train_generator(generator, copy.deepcopy(evaluator), 0, steps=15, batch=32, lr=0.02, rng=g)
        generator.eval()
        with torch.no_grad():
            images = generator(fixed).clamp(-1, 1)
        s = _score(images, evaluator, train, realism_threshold=None)
        if s.target_rate >= 0.8:
            break
    assert s.target_rate >= 0.8  # the evaluator is fooled ...
    assert s.fd > s.fd_threshold  # ... its feature statistics are not
    _assert_not_realistic(s)


def test_old_demo_model_inversion_tiles_are_not_called_realistic(mnist, evaluator, data_root):
    """Fredrikson's model inversion as the demo ran it (16 starts near the blank image, 300 SGD
    steps at lr 0.05, the `eval.mi-*` defaults) on a trained shared model: near-black tiles whose
    median NN distance (~7.7) passed the old threshold of 15 and were reported as realistic."""
    train, _ = mnist
    shared, _ = _shared_model_and_passive_blobs(str(data_root))
    tiles = invert(copy.deepcopy(shared), 0, (1, 32, 32), num=16, steps=300, lr=0.05, seed=0)
    assert float(tiles.mean()) < -0.8  # near-black
    record = score_generated(tiles, target=0, evaluator=evaluator, reference=train)
    assert record["nn_l2_median"] < 15.0  # what the old report printed as "<= 15"
    assert record["fd"] > record["fd_threshold"]
    assert record["realistic"] is False and record["success"] is False
    assert "FD" in record["realism"]


def test_a_single_image_cannot_be_judged_realistic(mnist, evaluator) -> None:
    train, test = mnist
    s = _score(test.images[test.labels == 0][:1], evaluator, train)
    assert math.isnan(s.fd) and math.isnan(s.diversity)
    assert "fewer than 2 images" in s.to_dict()["realism"]
    _assert_not_realistic(s)


# --- AT&T faces: 2 held-out photos per person -------------------------------------------------


@pytest.fixture
def faces(data_root) -> tuple[ImageSet, ImageSet, nn.Module]:
    train = load_dataset("faces", root=data_root)
    test = load_dataset("faces", "test", root=data_root)
    return train, test, get_evaluator("faces", root=data_root)[0]


def test_faces_held_out_photos_succeed_under_a_threshold_calibrated_on_other_people(
    faces,
) -> None:
    """Each person has 8 training and 2 held-out photos, so the FD is calibrated on pairs: each
    other person's 2 held-out photos against their own 8. Person 0's pair is not used."""
    train, test, evaluator = faces
    pair = test.images[test.labels == 0]
    s = score_samples(pair, target=0, evaluator=evaluator, reference=train, held_out=test)
    assert s.fd_size == 2 and "held-out sets of 2 of 39 other classes" in s.fd_calibration
    assert s.fd <= s.fd_threshold and s.target_rate == 1.0
    assert s.realistic and s.success


def _face_sets(train: ImageSet, test: ImageSet) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shape = (N, 1, 64, 64)
    return {
        "black": torch.full(shape, -1.0),
        "white": torch.full(shape, 1.0),
        "mean-face": train.images.mean(0, keepdim=True).repeat(N, 1, 1, 1),
        "gaussian-noise": (0.5 * torch.randn(shape, generator=g)).clamp(-1, 1),
        "one-photo-repeated": test.images[test.labels == 0][:1].repeat(N, 1, 1, 1),
    }


@pytest.mark.parametrize(
    "name", ["black", "white", "mean-face", "gaussian-noise", "one-photo-repeated"]
)
def test_faces_constant_noise_and_repeated_sets_fail_realism_even_with_a_fooled_evaluator(
    faces, name: str
) -> None:
    train, test, evaluator = faces
    images = _face_sets(train, test)[name]
    s = score_samples(
        images,
        target=0,
        evaluator=FooledHead(evaluator, 0),
        reference=train,
        held_out=test,
        realism_threshold=None,  # gan-faces turns the NN-L2 bound off
    )
    assert s.target_rate == 1.0
    if name == "one-photo-repeated":
        assert s.diversity < 0.05  # a real photo: only the lack of variety gives it away
    else:
        assert s.fd > s.fd_threshold
    _assert_not_realistic(s)


# --- the FD itself and its calibration cache --------------------------------------------------


def test_fd_matches_the_textbook_formula_with_a_matrix_square_root() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 16, generator=g, dtype=torch.float64) @ torch.randn(
        16, 16, generator=g, dtype=torch.float64
    )
    b = torch.randn(40, 16, generator=g, dtype=torch.float64) * 1.5 + 0.3
    ma, mb = a.mean(0).numpy(), b.mean(0).numpy()
    ca, cb = np.cov(a.numpy().T), np.cov(b.numpy().T)
    covmean = scipy.linalg.sqrtm(ca @ cb).real
    expected = ((ma - mb) ** 2).sum() + np.trace(ca) + np.trace(cb) - 2 * np.trace(covmean)
    assert _Gaussian(a).distance(b) == pytest.approx(expected, rel=1e-6)
    assert _Gaussian(a).distance(a) == pytest.approx(0.0, abs=1e-6)


def test_calibration_is_cached_atomically_and_reused(
    mnist, evaluator, monkeypatch, tmp_path
) -> None:
    train, test = mnist
    monkeypatch.setenv("FEDLEAK_CACHE_DIR", str(tmp_path))
    images = test.images[test.labels == 0][:N]
    first = _score(images, evaluator, train).to_dict()
    files = list((cache_dir() / "realism").rglob("mnist-class0-n100-*.json"))
    assert len(files) == 1 and not list((cache_dir() / "realism").rglob("*.tmp"))
    saved = json.loads(files[0].read_text())
    assert saved["size"] == N and saved["draws"] == realism.DRAWS
    assert saved["threshold"] == pytest.approx(first["fd_threshold"])

    def no_recalibration(*args, **kwargs):
        raise AssertionError("calibrated again despite a valid cache")

    monkeypatch.setattr(realism, "_draws", no_recalibration)
    assert _score(images, evaluator, train).to_dict() == first


def test_calibrating_before_a_run_spares_the_first_scored_round(
    mnist, evaluator, monkeypatch, tmp_path
) -> None:
    train, test = mnist
    monkeypatch.setenv("FEDLEAK_CACHE_DIR", str(tmp_path))
    calibration = calibrate_realism(N, target=0, evaluator=evaluator, reference=train)
    assert calibration.size == N and calibration.method == "held-out"
    assert calibration.real_p95 < calibration.threshold < calibration.nearest_fd

    def no_recalibration(*args, **kwargs):
        raise AssertionError("calibrated again despite calibrate_realism")

    monkeypatch.setattr(realism, "_draws", no_recalibration)
    s = _score(test.images[test.labels == 0][:N], evaluator, train)
    assert s.fd_threshold == calibration.threshold


def test_damaged_or_foreign_calibration_cache_is_recomputed(
    mnist, evaluator, monkeypatch, tmp_path
) -> None:
    train, test = mnist
    monkeypatch.setenv("FEDLEAK_CACHE_DIR", str(tmp_path))
    images = test.images[test.labels == 0][:30]
    first = _score(images, evaluator, train)
    (path,) = (cache_dir() / "realism").rglob("mnist-class0-n30-*.json")
    path.write_text('{"threshold": ')  # what a killed non-atomic writer would leave
    assert _score(images, evaluator, train) == first
    saved = json.loads(path.read_text())
    saved["fingerprint"], saved["threshold"] = "another evaluator", 1e9
    path.write_text(json.dumps(saved))
    assert _score(images, evaluator, train) == first  # a foreign threshold is never trusted


def test_another_evaluator_gets_its_own_calibration(
    mnist, evaluator, monkeypatch, tmp_path
) -> None:
    train, test = mnist
    monkeypatch.setenv("FEDLEAK_CACHE_DIR", str(tmp_path))
    other = copy.deepcopy(evaluator)
    with torch.no_grad():
        other.classifier[1].weight.mul_(1.5)  # other weights, other feature space
    images = test.images[test.labels == 0][:40]
    a, b = _score(images, evaluator, train), _score(images, other, train)
    assert a.fd_threshold != b.fd_threshold
    assert len(list((cache_dir() / "realism").rglob("mnist-class0-n40-*.json"))) == 2


# --- the record ------------------------------------------------------------------------------


def test_record_keeps_old_keys_and_labels_each_measure(mnist, evaluator) -> None:
    train, test = mnist
    record = score_generated(
        test.images[test.labels == 0][:N], target=0, evaluator=evaluator, reference=train
    )
    old = {"target_rate", "nn_l2_median", "nn_ssim_target", "nn_ssim_other", "diversity"}
    assert old | {"success", "num_images", "target_confidence"} <= record.keys()
    new = {"fd", "fd_threshold", "fd_size", "fd_calibration", "realistic", "realism", "verdict"}
    assert new <= record.keys()
    assert json.loads(json.dumps(record)) == record  # one attack.jsonl line
    assert set(MEASURES) <= record.keys()
    assert "not realism" in MEASURES["nn_l2_median"]
    assert "held-out" in record["fd_calibration"]


def test_realism_needs_the_evaluators_feature_space(mnist) -> None:
    train, test = mnist

    class RateOnly(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.zeros(len(x), 10)

    with pytest.raises(ValueError, match="no embed"):
        _score(test.images[:4], RateOnly(), train)


def test_missing_held_out_split_is_a_one_line_error(
    mnist, evaluator, monkeypatch, tmp_path
) -> None:
    train, test = mnist
    monkeypatch.setenv("FEDLEAK_DATA_ROOT", str(tmp_path))
    with pytest.raises(ValueError, match="realism needs held-out real images") as err:
        _score(test.images[:4], evaluator, train)
    assert "\n" not in str(err.value)


def test_held_out_images_of_another_shape_are_rejected(mnist, evaluator, faces) -> None:
    train, test = mnist
    _, face_test, _ = faces
    with pytest.raises(ValueError, match="held-out images are"):
        FrechetRealism(evaluator, train, face_test, 0)
