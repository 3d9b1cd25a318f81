"""Gradient inversion: honest observations, label recovery, and the attacks recovering inputs."""

from __future__ import annotations

import collections

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedleak.attacker.inversion import (
    ATTACKS,
    Observation,
    fedavg_update,
    fedsgd_update,
    get_attack,
    idlg_label,
    recover_labels,
)
from fedleak.data import load_dataset
from fedleak.metrics.images import label_accuracy, score_batch
from fedleak.models.leakage import SigmoidLeNet


def tiny_model(seed: int, classes: int = 4, bias: bool = True, act: type = nn.Sigmoid) -> nn.Module:
    """One 3x3 conv and a Linear on 1x8x8 inputs, DLG's U(-0.5, 0.5) init."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), act(), nn.Flatten(), nn.Linear(4 * 8 * 8, classes, bias=bias)
    )
    for p in model.parameters():
        nn.init.uniform_(p, -0.5, 0.5)
    return model


def tiny_batch(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models: one thread is fastest, and spinning OpenMP threads on a busy machine made
    # these tests 30x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cifar(data_root):
    return load_dataset("cifar10", "test", data_root)


# --- observations --------------------------------------------------------------------------


def test_fedsgd_update_is_the_mean_cross_entropy_gradient():
    model, x, y = tiny_model(0), tiny_batch(3, 0), torch.tensor([0, 2, 2])
    obs = fedsgd_update(model, x, y)
    expected = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    assert all(torch.allclose(a, b) for a, b in zip(obs.update, expected, strict=True))
    assert (obs.kind, obs.batch_size, obs.num_classes, obs.image_shape) == (
        "fedsgd",
        3,
        4,
        (1, 8, 8),
    )
    assert torch.equal(obs.model_state["3.weight"], model[3].weight)


def test_fedavg_update_is_new_minus_old_after_local_sgd():
    model, x, y = tiny_model(1), tiny_batch(4, 1), torch.tensor([0, 1, 2, 3])
    before = [p.detach().clone() for p in model.parameters()]
    one = fedavg_update(model, x, y, steps=1, lr=0.1)
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    assert all(
        torch.allclose(u, -0.1 * g, atol=1e-7) for u, g in zip(one.update, grads, strict=True)
    )
    # Three steps over mini-batches of 2: chunks 0, 1, 0, as torch.optim.SGD would do them.
    obs = fedavg_update(model, x, y, steps=3, lr=0.1, batch_size=2)
    reference = tiny_model(1)
    opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for chunk in (0, 1, 0):
        part = slice(2 * chunk, 2 * chunk + 2)
        opt.zero_grad()
        F.cross_entropy(reference(x[part]), y[part]).backward()
        opt.step()
    for u, new, old in zip(obs.update, reference.parameters(), before, strict=True):
        assert torch.allclose(u, new.detach() - old, atol=1e-6)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert (obs.kind, obs.local_steps, obs.local_lr, obs.local_batch_size) == ("fedavg", 3, 0.1, 2)


def test_observation_rejects_inconsistent_metadata():
    obs = fedsgd_update(tiny_model(0), tiny_batch(1, 0), torch.tensor([1]))
    with pytest.raises(ValueError, match="update kind"):
        Observation(obs.update, "fedprox", 1, 1, 0.1, 4, (1, 8, 8), obs.model_state)
    with pytest.raises(ValueError, match="learning rate"):
        Observation(obs.update, "fedavg", 1, 1, 0.0, 4, (1, 8, 8), obs.model_state)


# --- labels --------------------------------------------------------------------------------


def test_idlg_label_is_exact_for_batch_one(cifar):
    # Two real images of every class, three random LeNets: every label exact.
    picks = [int(i) for c in range(10) for i in (cifar.labels == c).nonzero().flatten()[:2]]
    for seed in range(3):
        torch.manual_seed(seed)
        model = SigmoidLeNet(10)
        for i in picks:
            obs = fedsgd_update(model, cifar.images[i : i + 1], cifar.labels[i : i + 1])
            assert idlg_label(obs) == int(cifar.labels[i])
        fedavg = fedavg_update(model, cifar.images[picks[:1]], cifar.labels[picks[:1]], 2, 0.05)
        assert idlg_label(fedavg) == int(cifar.labels[picks[0]])


@pytest.mark.parametrize("act", [nn.Sigmoid, nn.Tanh])
def test_idlg_label_without_bias_needs_no_sign_assumption(act):
    # No bias: the largest-norm weight-gradient row; with Tanh the features have either sign.
    for seed in range(20):
        model, y = tiny_model(seed, classes=6, bias=False, act=act), torch.tensor([seed % 6])
        assert idlg_label(fedsgd_update(model, tiny_batch(1, seed), y)) == seed % 6


def test_batch_label_recovery_on_real_batches(data_root):
    """Measured: multiset accuracy over 10 random CIFAR-10 batches of 8 on fresh LeNets."""
    train = load_dataset("cifar10", "train", data_root)
    gen = torch.Generator().manual_seed(0)
    accuracies = []
    for seed in range(10):
        torch.manual_seed(seed)
        model = SigmoidLeNet(10)
        idx = torch.randperm(len(train), generator=gen)[:8]
        obs = fedsgd_update(model, train.images[idx], train.labels[idx])
        labels = recover_labels(model, obs, generator=torch.Generator().manual_seed(seed))
        assert len(labels) == 8
        present = set((obs.update[-1] < 0).nonzero().flatten().tolist())
        assert present <= set(train.labels[idx].tolist())  # stage 1 is exact
        accuracies.append(label_accuracy(labels, train.labels[idx]))
    assert sum(accuracies) / len(accuracies) >= 0.9, accuracies
    assert min(accuracies) >= 0.75, accuracies


def test_batch_label_recovery_without_bias_uses_weight_rows():
    # Measured 100% on these 20 draws (and 97.5% on bias-free LeNets with CIFAR batches of 8).
    accuracies = []
    for seed in range(20):
        model = tiny_model(seed, classes=6, bias=False)
        y = torch.randint(0, 6, (4,), generator=torch.Generator().manual_seed(seed))
        labels = recover_labels(model, fedsgd_update(model, tiny_batch(4, seed), y))
        accuracies.append(label_accuracy(labels, y))
    assert sum(accuracies) / len(accuracies) >= 0.9, accuracies


# --- attacks on a tiny model ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("dlg", {"iterations": 40, "restarts": 3}),  # one L-BFGS start can stall: best of 3
        ("idlg", {"iterations": 40}),
        ("inverting-gradients", {"iterations": 300, "restarts": 2, "tv_weight": 0.0}),
    ],
)
def test_each_attack_recovers_a_tiny_models_input(name, options):
    for seed in range(2):
        model, x, y = tiny_model(seed), tiny_batch(1, 10 + seed), torch.tensor([seed + 1])
        rec = get_attack(name, **options).reconstruct(model, fedsgd_update(model, x, y))
        scores = score_batch(rec.images, x, rec.labels, y)
        assert scores["mse"] < 1e-4, (name, seed, scores["mse"])
        assert scores["label_accuracy"] == 1.0
        assert rec.iterations <= options["iterations"] and rec.seconds > 0


def test_attack_takes_weights_from_the_observation_not_the_model():
    model, x, y = tiny_model(0), tiny_batch(1, 3), torch.tensor([2])
    obs = fedsgd_update(model, x, y)
    attack = get_attack("idlg", iterations=40)
    rec = attack.reconstruct(tiny_model(99), obs)  # same architecture, other weights
    assert score_batch(rec.images, x)["mse"] < 1e-4


def test_batched_and_sequential_restarts_agree():
    model, x, y = tiny_model(2), tiny_batch(2, 4), torch.tensor([0, 3])
    obs = fedsgd_update(model, x, y)
    finals, groups = {}, {}
    for mode in ("batched", "sequential"):
        last: dict[int, torch.Tensor] = {}
        seen = groups.setdefault(mode, set())

        def keep(step, losses, images, ids, last=last, seen=seen):
            last.update({r: images[i].clone() for i, r in enumerate(ids)})
            seen.add(tuple(ids))

        attack = get_attack(
            "inverting-gradients", iterations=150, restarts=3, restarts_mode=mode, tv_weight=1e-3
        )
        rec = attack.reconstruct(
            model, obs, generator=torch.Generator().manual_seed(7), callback=keep
        )
        finals[mode] = (rec, torch.stack([last[r] for r in range(3)]))
    (batched, b_images), (sequential, s_images) = finals["batched"], finals["sequential"]
    assert batched.per_restart_loss == pytest.approx(sequential.per_restart_loss, abs=1e-5)
    assert batched.restart == sequential.restart
    assert torch.allclose(b_images, s_images, atol=1e-4)
    assert not torch.allclose(b_images[0], b_images[1], atol=1e-2)  # restarts differ
    # Batched: every iteration handles all restarts at once; sequential: one at a time.
    assert groups == {"batched": {(0, 1, 2)}, "sequential": {(0,), (1,), (2,)}}


def test_batched_lbfgs_restarts_are_the_sequential_ones():
    """L-BFGS restarts run together (one vectorised L-BFGS) follow the very iterates each
    restart follows alone, and every iteration handles all of them at once. Float64: in float32
    the restarts reach the rounding floor, where summation order alone decides the digits."""
    model, x, y = tiny_model(6).double(), tiny_batch(1, 9).double(), torch.tensor([2])
    obs = fedsgd_update(model, x, y)
    out, groups = {}, {}
    for mode in ("batched", "sequential"):
        seen = groups.setdefault(mode, set())

        def keep(step, losses, images, ids, seen=seen):
            seen.add(tuple(ids))

        attack = get_attack("dlg", iterations=12, restarts=3, restarts_mode=mode)
        out[mode] = attack.reconstruct(
            model, obs, generator=torch.Generator().manual_seed(3), callback=keep
        )
    batched, sequential = out["batched"], out["sequential"]
    assert batched.per_restart_loss == pytest.approx(sequential.per_restart_loss, rel=1e-6)
    assert batched.per_restart_evaluations == sequential.per_restart_evaluations
    assert batched.restart == sequential.restart
    assert torch.allclose(batched.images, sequential.images, atol=1e-8)
    assert len(set(batched.per_restart_loss)) == 3  # the restarts differ
    assert groups == {"batched": {(0, 1, 2)}, "sequential": {(0,), (1,), (2,)}}


def test_reconstruction_reports_the_work_done():
    model, x, y = tiny_model(7), tiny_batch(1, 11), torch.tensor([1])
    rec = get_attack("idlg", iterations=9, restarts=2).reconstruct(
        model, fedsgd_update(model, x, y)
    )
    assert rec.per_restart_iterations == [9, 9] and rec.iterations == 9
    assert len(rec.loss_history) == 9 and len(rec.per_restart_loss) == 2
    # Up to lbfgs_max_iter evaluations per step, plus the final one.
    assert all(9 < e <= 9 * 20 + 1 for e in rec.per_restart_evaluations)
    assert rec.evaluations == sum(rec.per_restart_evaluations)
    assert rec.per_restart_loss[rec.restart] == min(rec.per_restart_loss)
    assert rec.seconds > 0 and rec.stopped == "budget" and rec.seed == "rescaled"


def test_a_converged_restart_stops_before_its_budget():
    model, x, y = tiny_model(0), tiny_batch(1, 10), torch.tensor([1])
    obs = fedsgd_update(model, x, y)
    full = get_attack("idlg", iterations=200).reconstruct(model, obs)
    early = get_attack("idlg", iterations=200, stall_window=10).reconstruct(model, obs)
    assert full.stopped == "budget" and full.iterations == 200
    assert early.stopped == "converged" and early.iterations < 100, early.iterations
    assert score_batch(early.images, x)["mse"] < 1e-4
    assert early.evaluations < full.evaluations


def test_pruning_keeps_the_better_half_by_gradient_distance():
    model, x, y = tiny_model(1), tiny_batch(1, 12), torch.tensor([0])
    losses = []

    def record(step, latest, images, ids):
        losses.append(latest.clone())

    rec = get_attack("idlg", iterations=8, restarts=4, prune_every=4).reconstruct(
        model, fedsgd_update(model, x, y), callback=record
    )
    at_pruning = losses[3]  # after step 4
    kept = sorted(at_pruning.argsort()[:2].tolist())
    assert [i for i, n in enumerate(rec.per_restart_iterations) if n == 8] == kept
    assert sorted(rec.per_restart_iterations) == [4, 4, 8, 8]


def test_objective_is_zero_at_the_true_image_for_every_seed():
    from fedleak.attacker.inversion.attacks import InversionConfig, _Simulator

    model, x, y = tiny_model(2), tiny_batch(1, 13), torch.tensor([3])
    obs = fedsgd_update(model, x, y)
    onehot = F.one_hot(y, 4).float()
    for seed in ("softmax", "observed", "rescaled"):
        sim = _Simulator(model, obs, InversionConfig(distance="l2"), False, seed, relative=True)
        assert float(sim.losses(x[None], onehot[None], False).detach()) < 1e-10, seed
        assert float(sim.losses(tiny_batch(1, 14)[None], onehot[None], False).detach()) > 1e-3, seed


def test_unsupported_combinations_say_so():
    model, x = tiny_model(3), tiny_batch(2, 15)
    batch = fedsgd_update(model, x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="FedSGD update of one image"):
        get_attack("idlg", seed="rescaled", iterations=1).reconstruct(model, batch)
    assert get_attack("idlg", iterations=1).reconstruct(model, batch).seed == "softmax"  # auto
    with pytest.raises(ValueError, match="L-BFGS attacks only"):
        get_attack("inverting-gradients", stall_window=5)
    with pytest.raises(ValueError, match="relative applies to the l2 distance"):
        get_attack("inverting-gradients", relative=True)
    with pytest.raises(ValueError, match="line_search"):
        get_attack("idlg", line_search="wolfe")


def test_fedavg_unrolled_inversion_beats_a_random_guess():
    model, x, y = tiny_model(3), tiny_batch(2, 5), torch.tensor([1, 2])
    obs = fedavg_update(model, x, y, steps=3, lr=0.5, batch_size=1)
    rec = get_attack("inverting-gradients", iterations=400, restarts=2).reconstruct(model, obs)
    guess = tiny_batch(2, 6)
    attacked, random = score_batch(rec.images, x)["mse"], score_batch(guess, x)["mse"]
    assert attacked < 0.01 * random, (attacked, random)  # measured: 1.5e-4 vs 0.16
    assert sorted(rec.labels.tolist()) == [1, 2]  # recovered from -update / (lr * steps)


# --- divergence ----------------------------------------------------------------------------


def _poison(restart: int, at: int):
    """A callback that once writes NaN into one restart's iterate (``images`` shares storage)."""
    done = []

    def callback(step, losses, images, ids):
        if step == at and restart in ids and not done:
            images[ids.index(restart)].fill_(float("nan"))
            done.append(step)

    return callback


def test_a_diverging_restart_is_discarded_without_poisoning_the_others():
    model, x, y = tiny_model(4), tiny_batch(1, 7), torch.tensor([1])
    obs = fedsgd_update(model, x, y)
    attack = get_attack("inverting-gradients", iterations=60, restarts=3)
    clean = attack.reconstruct(model, obs)
    hit = attack.reconstruct(model, obs, callback=_poison(1, at=5))
    assert hit.discarded == [1] and hit.restart != 1
    assert torch.isfinite(hit.images).all()
    assert [hit.per_restart_loss[i] for i in (0, 2)] == pytest.approx(
        [clean.per_restart_loss[i] for i in (0, 2)], abs=1e-6
    )


def test_lbfgs_restart_is_reset_after_divergence():
    model, x, y = tiny_model(5), tiny_batch(1, 8), torch.tensor([3])
    obs = fedsgd_update(model, x, y)
    rec = get_attack("dlg", iterations=40).reconstruct(model, obs, callback=_poison(0, at=2))
    assert rec.resets == 1 and rec.discarded == []
    assert score_batch(rec.images, x)["mse"] < 1e-4


# --- the real setting: DLG's sigmoid LeNet on a real CIFAR-10 image ------------------------


def test_idlg_reconstructs_a_real_cifar_image(cifar):
    first_cat = int((cifar.labels == 3).nonzero()[0])  # test_00000.png, DLG's usual example
    x, y = cifar.images[first_cat : first_cat + 1], cifar.labels[first_cat : first_cat + 1]
    torch.manual_seed(1234)
    model = SigmoidLeNet(10)
    rec = get_attack("idlg", iterations=60).reconstruct(model, fedsgd_update(model, x, y))
    scores = score_batch(rec.images, x, rec.labels, y)
    assert scores["psnr"] >= 30, scores["psnr"]
    assert scores["label_accuracy"] == 1.0


# --- registry ------------------------------------------------------------------------------


def test_registry_presets_and_overrides():
    assert set(ATTACKS) == {"dlg", "idlg", "inverting-gradients", "gias", "gi-latent", "giml"}
    dlg = get_attack("dlg").config
    assert (dlg.optimizer, dlg.lr, dlg.distance, dlg.labels, dlg.clamp) == (
        "lbfgs",
        1.0,
        "l2",
        "optimize",
        False,
    )
    assert get_attack("idlg").config.labels == "recover"
    ig = get_attack("inverting-gradients", restarts=8).config
    assert (ig.optimizer, ig.lr, ig.distance, ig.lr_decay, ig.restarts) == (
        "adam",
        0.1,
        "cosine",
        True,
        8,
    )
    assert 1e-4 <= ig.tv_weight <= 1e-2
    with pytest.raises(ValueError, match="unknown attack"):
        get_attack("no-such-attack")
    with pytest.raises(ValueError, match="unknown option"):
        get_attack("dlg", learning_rate=1.0)
    assert collections.Counter(type(get_attack(n)).__name__ for n in ATTACKS).total() == 6


def test_plain_autograd_simulation_is_the_functional_one():
    """A restart alone is simulated with plain autograd, batched ones with torch.func: the same
    objective and the same input gradient, for every seed of the simulated backward pass."""
    from fedleak.attacker.inversion.attacks import InversionConfig, _Simulator

    model, x, y = tiny_model(4), tiny_batch(1, 16), torch.tensor([2])
    obs = fedsgd_update(model, x, y)
    onehot = F.one_hot(y, 4).float()
    for seed in ("softmax", "observed", "rescaled"):
        sim = _Simulator(model, obs, InversionConfig(distance="l2"), False, seed, relative=True)
        values = {}
        for plain in (True, False):
            z = tiny_batch(1, 17).requires_grad_(True)
            loss = sim.objective(z, onehot, sim.seed_vector(z, onehot), plain)
            values[plain] = (loss.detach(), torch.autograd.grad(loss, z)[0])
        assert torch.allclose(values[True][0], values[False][0], rtol=1e-5)
        assert torch.allclose(values[True][1], values[False][1], rtol=1e-4, atol=1e-9)
