"""Ensembler training, bundles and the inversion attack, on a few images (in-process, CPU)."""

from __future__ import annotations

import math

import pytest
import torch

from fedleak.attacker.ensembler_inversion import (
    AttackSettings,
    Decoder,
    Inverter,
    ShadowHead,
    ShadowModel,
    attack,
    choose,
    cycle_error,
    fit_inverters,
    variants,
)
from fedleak.ensembler import baselines, experiment, training
from fedleak.ensembler.data import Split, load_splits
from fedleak.errors import ConfigError
from fedleak.metrics.images import ssim
from fedleak.models.ensembler import load_client_bundle, load_server_bundle
from fedleak.settings import load_ensembler as load_preset
from fedleak.settings import preset_names

TINY = [
    "data.client-train=24",
    "data.aux=16",
    "data.eval=8",
    "train.epochs=1",
    "train.batch-size=8",
    "ensembler.num-nets=2",
    "ensembler.selected=1",
    "ensembler.stage2-epochs=1",
    "attack.shadow-epochs=1",
    "attack.decoder-epochs=1",
    "attack.batch-size=8",
]


@pytest.fixture(scope="module")
def tiny(data_root):
    torch.set_num_threads(1)
    cfg = load_preset("ensembler-cifar10-smoke", [*TINY, f"data.root={data_root}"])
    return cfg, load_splits(cfg)


@pytest.fixture(scope="module")
def stage1_nets(tiny):
    cfg, splits = tiny
    nets, _ = training.stage1(splits.client, cfg)
    return nets


def test_cosine_penalty_on_known_tensors():
    features = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    refs = [torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[1.0, 1.0], [0.0, 1.0]])]
    # image 0: cos 1 and 1/sqrt2 -> 1; image 1: cos 0 and 1 -> 1; mean 1
    assert training.cosine_penalty(features, refs).item() == pytest.approx(1.0)
    refs = [torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([[1.0, 1.0], [1.0, 1.0]])]
    # image 0: max(0, 1/sqrt2); image 1: max(0, 1/sqrt2)
    assert training.cosine_penalty(features, refs).item() == pytest.approx(1 / math.sqrt(2))
    # feature maps are flattened per image
    maps = torch.ones(3, 4, 2, 2)
    assert training.cosine_penalty(maps, [maps.clone()]).item() == pytest.approx(1.0)


def test_secret_selection_is_seeded_and_valid():
    a = training.choose_selected(10, 4, 123)
    assert a == training.choose_selected(10, 4, 123)
    assert len(set(a)) == 4 and all(0 <= i < 10 for i in a)


def test_stage2_leaves_server_nets_frozen(tiny, stage1_nets):
    cfg, splits = tiny
    before = [{k: v.clone() for k, v in n.body.state_dict().items()} for n in stage1_nets]
    head_before = {k: v.clone() for k, v in stage1_nets[0].head.state_dict().items()}
    server, client, stats = training.stage2(splits.client, stage1_nets, cfg)
    for net, state in zip(server.nets, before, strict=True):
        after = net.state_dict()
        # weights and BatchNorm running statistics alike
        assert all(torch.equal(after[k], v) for k, v in state.items())
        assert not any(p.requires_grad for p in net.parameters())
    new_head = client.head.state_dict()
    assert any(
        not torch.equal(new_head[k], v) for k, v in head_before.items() if v.is_floating_point()
    )
    assert len(client.selected) == cfg.ensembler.selected
    assert stats["last_cosine_penalty"] is not None


def test_bundles_keep_the_secret_on_the_client(tiny, stage1_nets, tmp_path):
    cfg, splits = tiny
    server, client, _ = training.stage2(splits.client, stage1_nets, cfg)
    baselines.write_pair(server, client, tmp_path, "v1")
    raw = torch.load(tmp_path / "server.pt", weights_only=True)
    assert set(raw) == {"format", "version", "input_shape", "info", "nets"}
    assert len(raw["nets"]) == cfg.ensembler.num_nets
    assert "selected" not in repr(raw["info"])
    # ResNet stages only (Sequential indices); the head's conv1/bn1 and the tail's fc are absent
    for state in raw["nets"]:
        assert all(key.split(".")[0].isdigit() for key in state)
    loaded = load_client_bundle(tmp_path / "client.pt")
    assert loaded.selected == client.selected and loaded.server_version == "v1"
    assert load_server_bundle(tmp_path / "server.pt").version == "v1"


def test_shadow_head_and_decoder_shapes():
    x = torch.randn(2, 3, 32, 32)
    features = ShadowHead()(x)
    assert features.shape == (2, 64, 16, 16)
    assert Decoder()(features).shape == (2, 3, 32, 32)
    nets = [
        torch.nn.Sequential(
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(1), torch.nn.Linear(64, 512)
        )
        for _ in range(3)
    ]
    assert ShadowModel(nets)(x).shape == (2, 10)
    assert variants(3, True) == ["net-0", "net-1", "net-2", "adaptive"]
    assert variants(1, True) == ["net-0"]


def test_end_to_end_training_and_attack_in_process(tiny, stage1_nets):
    cfg, splits = tiny
    server, client, _ = training.stage2(splits.client, stage1_nets, cfg)
    with torch.no_grad():
        sent = client.encode(splits.victims.images)
        outs = torch.stack([net(sent) for net in server.nets])
        logits = client.decode(outs)
    assert logits.shape == (len(splits.victims), 10)
    results = attack(
        server.nets, splits.aux.images, splits.aux.labels, sent, AttackSettings(1, 1, batch_size=8)
    )
    assert set(results) == {"net-0", "net-1", "adaptive"}
    for recon, stats in results.values():
        assert recon.shape == splits.victims.images.shape
        assert torch.isfinite(recon).all() and recon.abs().max() <= 1
        assert math.isfinite(float(ssim(recon, splits.victims.images).mean()))
        assert "shadow" in stats and "decoder" in stats


def test_none_and_shredder_share_server_nets(tiny):
    cfg, splits = tiny
    server, client, _ = baselines.train_defense("none", splits.client, cfg)
    assert client.noise.abs().max() == 0 and len(server.nets) == 1
    s2, c2, stats = baselines.train_defense("shredder", splits.client, cfg, (server, client))
    assert s2 is server and stats == {"retrained": False}
    assert c2.noise.std() == pytest.approx(cfg.baselines.shredder_sigma, rel=0.1)


def test_splits_are_disjoint_and_stratified(tiny):
    cfg = load_preset(
        "ensembler-cifar10-smoke", ["data.client-train=200", "data.aux=100", "data.eval=100"]
    )
    s = load_splits(cfg)
    flat = lambda split: {tuple(x.flatten()[:64].tolist()) for x in split.images}  # noqa: E731
    assert not flat(s.client) & flat(s.aux)
    assert len(set(s.victims.labels.tolist())) == 10
    overlap = load_splits(load_preset("ensembler-cifar10-smoke", ["data.aux-overlap=true"]))
    assert isinstance(overlap.aux, Split)


def test_presets_and_overrides():
    assert {"ensembler-cifar10-smoke", "ensembler-cifar10", "ensembler-cifar10-paper"} <= set(
        preset_names("ensembler")
    )
    paper = load_preset("ensembler-cifar10-paper")
    assert (paper.ensembler.num_nets, paper.ensembler.selected) == (10, 4)
    cfg = load_preset("ensembler-cifar10-smoke", ["baselines.defenses=none,ensembler", "seed=3"])
    assert cfg.baselines.defenses == ["none", "ensembler"] and cfg.seed == 3
    with pytest.raises(ConfigError):
        load_preset("ensembler-cifar10-smoke", ["train.nope=1"])
    with pytest.raises(ConfigError):
        load_preset("ensembler-cifar10-smoke", ["ensembler.selected=9"])
    with pytest.raises(ConfigError):
        load_preset("ensembler-cifar10-smoke", ["baselines.defenses=ensembler"])


def test_stage1_is_cached_across_stage2_settings(tiny, tmp_path):
    cfg, splits = tiny
    nets, _ = baselines.stage1_cached(splits.client, cfg, tmp_path)
    (cached,) = tmp_path.glob("stage1-*.pt")
    other = cfg.model_copy(
        update={"ensembler": cfg.ensembler.model_copy(update={"lambda_": 7.0, "stage2_epochs": 9})}
    )
    again, _ = baselines.stage1_cached(splits.client, other, tmp_path)
    assert list(tmp_path.glob("stage1-*.pt")) == [cached]
    for a, b in zip(nets, again, strict=True):
        assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def _scaled_conv(scale: float) -> torch.nn.Conv2d:
    conv = torch.nn.Conv2d(4, 4, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(scale * torch.eye(4)[:, :, None, None])
    return conv


def test_cycle_error_is_the_relative_re_encoding_error():
    received = torch.randn(6, 4, 3, 3)
    head = torch.nn.Identity()
    assert cycle_error(head, _scaled_conv(1.0), received) == pytest.approx(0.0, abs=1e-10)
    # decode halves, head keeps: error (0.5 r)^2 / r^2 = 0.25, whatever the batching
    assert cycle_error(head, _scaled_conv(0.5), received, batch_size=4) == pytest.approx(0.25)


def test_choose_keeps_the_restart_that_best_explains_the_features():
    received = torch.randn(5, 4, 2, 2)

    def inverter(scale: float) -> Inverter:
        shadow = torch.nn.Module()
        shadow.head = torch.nn.Identity()
        return Inverter("net-0", shadow, _scaled_conv(scale), {"scale": scale})

    chosen, info = choose([inverter(0.2), inverter(0.9), inverter(1.7)], received)
    assert chosen.stats["scale"] == 0.9
    assert info["chosen_restart"] == 1
    assert info["cycle_errors"] == pytest.approx([0.64, 0.01, 0.49], rel=1e-4)
    assert info["cycle_error"] == pytest.approx(0.01, rel=1e-4)
    only = inverter(0.2)
    chosen, info = choose([only], received)
    assert chosen is only and info["chosen_restart"] == 0
    assert info["cycle_error"] == pytest.approx(0.64, rel=1e-4)


def test_table_rows_add_the_net_an_attacker_would_pick_without_ground_truth():
    attacks = {
        "net-0": {"ssim": 0.30, "psnr": 13.0, "cycle_error": 2.1},
        "net-1": {"ssim": -0.01, "psnr": 10.4, "cycle_error": 1.9},
        "net-2": {"ssim": 0.10, "psnr": 14.0, "cycle_error": 2.8},
        "adaptive": {"ssim": 0.19, "psnr": 12.5, "cycle_error": 1.8, "_images": None},
    }
    rows = experiment.table_rows("ensembler", 0.50, 0.52, attacks)
    by_name = {r["name"]: r for r in rows}
    assert by_name["N=1 (best SSIM)"]["variant"] == "net-0"  # the paper's oracle choice
    assert by_name["N=1 (best PSNR)"]["variant"] == "net-2"
    assert by_name["N=1 (attacker's choice)"]["variant"] == "net-1"
    assert by_name["Adaptive"]["accuracy_change"] == pytest.approx(-2.0)
    assert by_name["Adaptive"]["_images"] is None  # kept for the grids, dropped from results
    assert all(not k.startswith("_") for r in rows for k in experiment._public(r))
    none = {"defense": "none", "name": "NONE", "ssim": 0.4, "accuracy_change": 0.0}
    verdict = experiment.acceptance([none, *rows])
    assert verdict["ssim_ratio_strongest_attack"] == pytest.approx(0.75)  # 0.30 / 0.40
    assert not verdict["ssim_met_strongest_attack"] and verdict["accuracy_met"]
    assert verdict["ssim_ratio_per_row"]["N=1 (attacker's choice)"] == pytest.approx(-0.025)


def _trial(ssim: float, psnr: float, cycle: float, images: object = None) -> dict:
    return {
        "ssim": ssim,
        "psnr": psnr,
        "cycle_error": cycle,
        "attack_seconds": 1.0,
        "_images": images,
    }


def test_summary_over_trials_is_the_mean_with_the_median_trial_on_the_grid():
    out = experiment.summarize(
        [_trial(0.30, 13.0, 2.0, "a"), _trial(-0.10, 10.0, 1.0, "b"), _trial(0.10, 12.0, 3.0, "c")]
    )
    assert out["ssim"] == pytest.approx(0.10) and out["psnr"] == pytest.approx(35.0 / 3)
    assert out["ssim_std"] == pytest.approx(0.2)  # sample std of 0.3, -0.1, 0.1
    assert out["cycle_error"] == pytest.approx(2.0) and out["attack_seconds"] == 3.0
    assert out["grid_trial"] == 2 and out["_images"] == "c"
    assert [t["ssim"] for t in out["trials"]] == [0.30, -0.10, 0.10]
    assert all("_images" not in t for t in out["trials"])
    one = experiment.summarize([_trial(0.25, 12.0, 1.5)])
    assert one["ssim"] == 0.25 and one["ssim_std"] == 0.0 and one["grid_trial"] == 0


def test_attackers_choice_picks_a_net_per_trial_by_cycle_error():
    # Trial 0: net-1 explains the features best; trial 1: net-0. Ground truth plays no part.
    nets = {
        "net-0": experiment.summarize(
            [_trial(0.40, 14.0, 2.0, "0a"), _trial(0.20, 12.0, 1.0, "0b")]
        ),
        "net-1": experiment.summarize(
            [_trial(0.00, 10.0, 1.5, "1a"), _trial(0.30, 13.0, 1.8, "1b")]
        ),
    }
    choice = experiment.attackers_choice(nets)
    assert choice["variant"] == "net-1,net-0"
    assert choice["ssim"] == pytest.approx(0.10)  # mean of 0.00 (net-1, trial 0), 0.20
    assert choice["_images"] in {"1a", "0b"}
    rows = experiment.table_rows("ensembler", 0.5, 0.5, nets)
    by_name = {r["name"]: r for r in rows}
    assert by_name["N=1 (best SSIM)"]["variant"] == "net-0"  # mean 0.30 vs 0.15
    assert by_name["N=1 (attacker's choice)"]["ssim"] == pytest.approx(0.10)
    assert experiment.attackers_choice({"net-0": {"ssim": 0.1, "psnr": 9.0}}) is None


def test_trials_are_independent_attackers():
    settings = AttackSettings(restarts=3, seed=5)
    seeds = [experiment.trial_settings(settings, t).seed for t in range(3)]
    assert seeds == [5, 8, 11]  # restarts 5-7, 8-10, 11-13: no shadow shared
    with pytest.raises(ConfigError, match="trials"):
        load_preset("ensembler-cifar10-smoke", ["attack.trials=0"])


def test_restarts_are_differently_seeded_shadows(tiny, stage1_nets):
    cfg, splits = tiny
    bodies = [n.body for n in stage1_nets]
    settings = AttackSettings(1, 1, batch_size=8, restarts=2)
    first, second = fit_inverters(bodies, "net-0", splits.aux.images, splits.aux.labels, settings)
    w0 = first.shadow.head.net[0].weight
    assert not torch.equal(w0, second.shadow.head.net[0].weight)
    again = fit_inverters(
        bodies, "net-0", splits.aux.images, splits.aux.labels, AttackSettings(1, 1, batch_size=8)
    )
    assert torch.equal(again[0].shadow.head.net[0].weight, w0)  # restart 0 is the seed itself
    with pytest.raises(ValueError, match="restarts"):
        fit_inverters(
            bodies, "net-0", splits.aux.images, splits.aux.labels, AttackSettings(restarts=0)
        )
    with pytest.raises(ConfigError, match="restarts"):
        load_preset("ensembler-cifar10-smoke", ["attack.restarts=0"])


def test_report_gives_spread_over_trials_and_flags_an_unreliable_attack_on_none(tmp_path):
    from fedleak.report import write_report
    from fedleak.runfolder import RunFolder

    trials = [_trial(s, 12.0, 1.0) for s in (0.31, 0.11, 0.38)]
    none = {"defense": "none", "name": "NONE", "accuracy": 0.5, "accuracy_change": 0.0}
    none.update(experiment._public(experiment.summarize(trials)))
    ens = {**none, "defense": "ensembler", "name": "Adaptive", "ssim": 0.05, "trials": []}
    run = RunFolder(tmp_path)
    run.write_json("meta.json", {"status": "finished", "preset": "x", "kind": "ensembler"})
    run.write_json("config.json", {"attack": {"trials": 3, "restarts": 3}})
    rows = [none, ens]
    run.write_json("results.json", {"rows": rows, "acceptance": experiment.acceptance(rows)})
    html = write_report(tmp_path).read_text("utf-8")
    assert "0.2667 ± 0.1401" in html  # NONE: mean ± sample std of the three trials
    assert "2 of its 3 trials reach 0.3 (0.310, 0.110, 0.380)" in html
    assert "over 3 independent attacker trial(s)" in html
