"""GIAS / GIML (attacker/inversion/generative.py, giml.py) and the DCGAN prior (prior.py).

Tiny generators and models keep this file to a few seconds: the victim image is exactly
``G(z*)`` for a known ``z*``, so a working latent search must find an image with (near) zero
error, and a broken one (wrong gradient path, wrong stage order) cannot.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedleak.attacker.inversion import (
    ATTACKS,
    GIAS,
    GIML,
    GenerativeAttack,
    GIMLConfig,
    LatentSearch,
    fedsgd_update,
    get_attack,
    meta_learn_generator,
)
from fedleak.attacker.inversion.generative import LATENT, PARAMS, GenerativeConfig
from fedleak.attacker.inversion.giml import reptile_step
from fedleak.attacker.inversion.prior import prior_cache_path, train_dcgan_prior
from fedleak.metrics.images import mse

SIDE, NZ, CLASSES = 8, 4, 4


class TinyGenerator(nn.Module):
    """z (N x 4) -> 1 x 8 x 8 images in [-1, 1]."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.nz = NZ
        self.net = nn.Sequential(nn.Linear(NZ, 32), nn.Tanh(), nn.Linear(32, SIDE * SIDE))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(z)).view(-1, 1, SIDE, SIDE)


def tiny_model(seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(SIDE * SIDE, 24), nn.Sigmoid(), nn.Linear(24, CLASSES)
    )


def victim(g: nn.Module, seed: int, label: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    z = torch.randn(1, NZ, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return g(z), torch.tensor([label])


FAST = {"restarts": 4, "tv_weight": 0.0, "latent_lr": 0.1, "lr_decay": True}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_latent_search_recovers_an_image_the_generator_can_make() -> None:
    g, model = TinyGenerator(), tiny_model()
    x, y = victim(g, seed=5)
    obs = fedsgd_update(model, x, y)
    rec = LatentSearch(g, latent_iterations=100, **FAST).reconstruct(model, obs)
    assert rec.labels.tolist() == [2]  # recovered from the update (iDLG)
    assert float(mse(rec.images, x)) < 1e-4  # measured ~1e-5; a random G(z) is ~1e-1
    assert rec.stages == [LATENT] * 100
    assert rec.loss_history[-1] < 1e-4


def test_gias_recovers_to_low_error_and_beats_a_random_image() -> None:
    g, model = TinyGenerator(), tiny_model()
    x, y = victim(g, seed=7)
    obs = fedsgd_update(model, x, y)
    rec = GIAS(g, latent_iterations=70, param_iterations=30, **FAST).reconstruct(model, obs)
    assert float(mse(rec.images, x)) < 1e-4
    random_image = g(torch.randn(1, NZ)).detach()
    assert float(mse(random_image, x)) > 10 * float(mse(rec.images, x))


def test_latent_stage_comes_first_and_parameters_only_move_after_it() -> None:
    g, model = TinyGenerator(), tiny_model()
    # An image the generator cannot make exactly: the parameter stage has something to fix.
    x, y = victim(g, seed=3)
    x = (x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    obs = fedsgd_update(model, x, y)
    prior_before = {n: p.detach().clone() for n, p in g.named_parameters()}
    seen: list[tuple[int, int]] = []
    gias = GIAS(g, latent_iterations=60, param_iterations=40, **FAST)
    rec = gias.reconstruct(
        model, obs, callback=lambda step, losses, images, ids: seen.append((step, len(ids)))
    )
    latent_only = LatentSearch(g, latent_iterations=60, **FAST).reconstruct(model, obs)

    assert rec.stages == [LATENT] * 60 + [PARAMS] * 40
    assert [s for s, _ in seen] == list(range(100))
    assert {n for _, n in seen[:60]} == {4} and {n for _, n in seen[60:]} == {1}  # R, then K=1
    # Stage 1 is exactly the latent-only attack; stage 2 keeps its latent and moves only w.
    torch.testing.assert_close(rec.latents, latent_only.latents)
    assert rec.loss_history[:60] == pytest.approx(latent_only.loss_history)
    moved = [n for n, p in g.named_parameters() if not torch.equal(rec.adapted[n][0], p)]
    assert moved, "the parameter stage did not change the generator copy"
    # The result is the adapted copy rendered at the stage-1 latent (z did not move in stage 2).
    adapted = {n: rec.adapted[n][0] for n, _ in g.named_parameters()}
    rendered = torch.func.functional_call(g, adapted, (rec.latents,))
    torch.testing.assert_close(rendered, rec.images)
    assert rec.loss_history[-1] < latent_only.loss_history[-1]
    # The work done: 60 latent steps for all four restarts, 40 more for the one carried on.
    carried = rec.restart
    assert rec.per_restart_iterations == [100 if r == carried else 60 for r in range(4)]
    assert rec.per_restart_evaluations == [102 if r == carried else 61 for r in range(4)]
    assert rec.evaluations == 102 + 3 * 61 and latent_only.per_restart_iterations == [60] * 4
    # The caller's generator is never modified.
    for n, p in g.named_parameters():
        assert torch.equal(p, prior_before[n])


def test_per_image_generators_for_a_batch() -> None:
    g, model = TinyGenerator(), tiny_model()
    xs = torch.cat([victim(g, seed=s)[0] for s in (11, 12)])
    obs = fedsgd_update(model, xs, torch.tensor([0, 3]))
    rec = GIAS(g, latent_iterations=20, param_iterations=5, restarts=2).reconstruct(model, obs)
    assert rec.images.shape == (2, 1, SIDE, SIDE)
    assert rec.latents.shape == (2, NZ)
    w = dict(g.named_parameters())["net.0.weight"]
    assert rec.adapted["net.0.weight"].shape == (2, *w.shape)  # one copy per image
    assert sorted(rec.labels.tolist()) == [0, 3]


def test_reptile_step_interpolates_towards_the_adapted_parameters() -> None:
    g = TinyGenerator()
    before = {n: p.detach().clone() for n, p in g.named_parameters()}
    target = {n: p + 1.0 for n, p in before.items()}
    reptile_step(g, [target], 0.25)
    for n, p in g.named_parameters():
        torch.testing.assert_close(p, before[n] + 0.25)


def _mean_task_cost(g: nn.Module, model: nn.Module, observations) -> float:
    probe = LatentSearch(g, latent_iterations=40, restarts=2, tv_weight=0.0)
    costs = [
        min(
            probe.reconstruct(model, o, generator=torch.Generator().manual_seed(9)).per_restart_loss
        )
        for o in observations
    ]
    return sum(costs) / len(costs)


def test_giml_moves_the_generator_towards_lower_inversion_cost() -> None:
    truth, model = TinyGenerator(seed=0), tiny_model()
    observations = [
        fedsgd_update(model, *victim(truth, seed=s, label=s % CLASSES)) for s in range(4)
    ]
    start = TinyGenerator(seed=42)  # a "wrong" generator: unrelated weights
    inner = GenerativeConfig(
        latent_iterations=20,
        param_iterations=20,
        param_lr=1e-2,
        restarts=1,
        latent_norm_weight=1e-3,
        tv_weight=0.0,
        per_image_generator=False,
    )
    cfg = GIMLConfig(meta_steps=4, meta_lr=1.0, anneal=False, inner=inner)
    learned, history = meta_learn_generator(model, observations, cfg, prior=start)
    assert len(history) == 4
    # Measured: 0.003 after vs 0.017 before (a zero Reptile step leaves it at 0.017).
    assert _mean_task_cost(learned, model, observations) < 0.5 * _mean_task_cost(
        start, model, observations
    )
    # The starting generator is copied, not modified.
    assert all(
        torch.equal(a, b)
        for a, b in zip(start.parameters(), TinyGenerator(seed=42).parameters(), strict=True)
    )


def test_registry_finds_the_generative_attacks() -> None:
    g = TinyGenerator()
    assert {"gias", "gi-latent", "giml"} <= set(ATTACKS)
    gias = get_attack("gias", prior=g, latent_iterations=7)
    assert isinstance(gias, GIAS) and gias.config.latent_iterations == 7
    assert gias.config.param_lr == 1e-3 and gias.config.latent_lr == 3e-2
    latent = get_attack("gi-latent", prior=g)
    assert isinstance(latent, LatentSearch) and latent.config.param_iterations == 0
    giml = get_attack("giml", meta=GIMLConfig(meta_steps=1))
    assert isinstance(giml, GIML) and isinstance(giml, GenerativeAttack)
    budget = get_attack("gias", prior=g, iterations=300).config  # the preset's even split
    assert (budget.latent_iterations, budget.param_iterations) == (150, 150)
    assert get_attack("gi-latent", iterations=300).config.latent_iterations == 300
    with pytest.raises(ValueError, match="unknown option"):
        get_attack("gias", prior=g, lr=0.1)
    with pytest.raises(ValueError, match="needs a generator"):
        get_attack("gias").reconstruct(tiny_model(), fedsgd_update(tiny_model(), *victim(g, 1)))


def test_giml_attack_meta_learns_then_reconstructs() -> None:
    truth, model = TinyGenerator(seed=0), tiny_model()
    observations = [fedsgd_update(model, *victim(truth, seed=s)) for s in range(2)]
    inner = GenerativeConfig(
        latent_iterations=5, param_iterations=5, restarts=1, per_image_generator=False
    )
    attack = get_attack(
        "giml",
        prior=TinyGenerator(seed=3),
        meta=GIMLConfig(meta_steps=2, inner=inner),
        latent_iterations=5,
        param_iterations=5,
        restarts=1,
    )
    learned = attack.meta_learn(model, observations)
    assert attack.prior is learned and len(attack.meta_history) == 2
    rec = attack.reconstruct(model, observations[0])
    assert rec.images.shape == (1, 1, SIDE, SIDE) and torch.isfinite(rec.images).all()


def test_prior_is_trained_once_then_read_from_the_cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FEDLEAK_CACHE_DIR", str(tmp_path))
    images = torch.rand(16, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    kwargs = {"steps": 2, "seed": 0, "widths": (8, 4, 2), "latent_dim": 6, "batch_size": 4}
    first = train_dcgan_prior(images, **kwargs)
    assert first.prior_info["cached"] is False
    path = prior_cache_path(images, _settings(kwargs))
    assert path.is_file() and str(tmp_path) in str(path)
    second = train_dcgan_prior(images, **kwargs)
    assert second.prior_info["cached"] is True and not second.training
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    z = torch.randn(3, 6)
    torch.testing.assert_close(first(z), second(z))
    assert first(z).shape == (3, 1, 32, 32)
    # Other settings or other images are other cache entries.
    assert train_dcgan_prior(images, **{**kwargs, "seed": 1}).prior_info["cached"] is False
    assert train_dcgan_prior(images[:8], **kwargs).prior_info["cached"] is False
    assert len(list((tmp_path / "priors").glob("*.pt"))) == 3
    # A damaged cache file means retraining, not a crash.
    path.write_bytes(b"garbage")
    assert train_dcgan_prior(images, **kwargs).prior_info["cached"] is False


def test_prior_rejects_images_of_the_wrong_size() -> None:
    with pytest.raises(ValueError, match="generate 32x32"):
        train_dcgan_prior(torch.zeros(4, 1, 64, 64), steps=1, widths=(8, 4, 2), use_cache=False)


def _settings(kwargs: dict):
    from fedleak.attacker.inversion.prior import PriorSettings

    return PriorSettings(**kwargs)
