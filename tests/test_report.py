"""Grids, plots and report.html.

The run folders built here are SYNTHETIC TEST DATA for the report (made-up metrics and random
images); they are not results of any federation.
"""

from __future__ import annotations

import base64
import io
import re

import pytest
import torch
from PIL import Image

from fedleak.records import GanScore, InversionScore, RoundMetrics
from fedleak.report import write_report
from fedleak.report.grids import save_comparison_grid, save_image_grid
from fedleak.report.page import fmt
from fedleak.report.plots import plot_metrics
from fedleak.runfolder import RunFolder

# --- grids ------------------------------------------------------------------------------------


def test_image_grid_size_and_pixels(tmp_path):
    images = -torch.ones(12, 1, 32, 32)
    images[0] = 1.0  # white
    images[1] = 5.0  # out of range: clamped to white
    path = save_image_grid(images, tmp_path / "g.png", nrow=10, padding=2, scale=2)
    img = Image.open(path)
    # 10 columns, 2 rows of 32 px cells with 2 px padding, then doubled.
    assert img.size == ((10 * 34 + 2) * 2, (2 * 34 + 2) * 2) == (684, 140)
    assert img.mode == "L"
    cell = lambda i: ((2 + (i % 10) * 34 + 16) * 2, (2 + (i // 10) * 34 + 16) * 2)  # noqa: E731
    assert img.getpixel(cell(0)) == 255
    assert img.getpixel(cell(1)) == 255
    assert img.getpixel(cell(2)) == 0
    assert img.getpixel(cell(11)) == 0
    assert img.getpixel((0, 0)) == 128  # padding is grey so black digits' cells stay visible
    assert [p.name for p in tmp_path.iterdir()] == ["g.png"]


def test_image_grid_rgb_and_fewer_images_than_nrow(tmp_path):
    img = Image.open(save_image_grid(torch.zeros(3, 3, 8, 8), tmp_path / "c.png", scale=1))
    assert img.mode == "RGB" and img.size == (3 * 10 + 2, 10 + 2)
    assert img.getpixel((2 + 4, 2 + 4)) == (128, 128, 128)  # 0.0 in [-1, 1] is mid grey


@pytest.mark.parametrize(
    "images",
    [torch.zeros(2, 2, 8, 8), torch.zeros(8, 8), torch.zeros(0, 1, 8, 8)],
    ids=["two-channels", "2d", "empty"],
)
def test_image_grid_rejects_bad_shapes(tmp_path, images):
    with pytest.raises(ValueError):
        save_image_grid(images, tmp_path / "x.png")


def test_image_grid_rejects_nan(tmp_path):
    images = torch.zeros(2, 1, 8, 8)
    images[1, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        save_image_grid(images, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_comparison_grid_shape_mismatch(tmp_path):
    with pytest.raises(ValueError):
        save_comparison_grid(
            torch.zeros(5, 1, 28, 28), torch.zeros(4, 1, 28, 28), tmp_path / "f.png"
        )
    with pytest.raises(ValueError):
        save_comparison_grid(
            torch.zeros(5, 1, 28, 28), torch.zeros(5, 3, 28, 28), tmp_path / "f.png"
        )


def test_comparison_grid_layout(tmp_path):
    top, bottom = -torch.ones(5, 1, 28, 28), torch.ones(5, 1, 28, 28)
    plain = Image.open(save_comparison_grid(top, bottom, tmp_path / "a.png", labels=None))
    assert plain.size == ((5 * 30 + 2) * 2, (2 * 30 + 2) * 2)
    assert plain.getpixel((30, 30)) == 0  # top row: the real images
    assert plain.getpixel((30, (2 + 30 + 14) * 2)) == 255  # bottom row: the generated ones
    labelled = Image.open(save_comparison_grid(top, bottom, tmp_path / "b.png"))
    assert labelled.height == plain.height and labelled.width > plain.width


# --- synthetic run folders (test data for the report, not real results) ----------------------


def _gan(r: int, *, rate: float, l2: float, success: bool, variant="active", attacker=1):
    measures = {
        "target_rate": rate,
        "target_confidence": 0.8,
        "nn_l2_median": l2,
        "nn_ssim_target": min(0.9, 0.1 * r),
        "nn_ssim_other": 0.05 * r,
        "diversity": 0.4,
    }
    return GanScore(
        attacker=attacker, round=r, variant=variant, target=0, success=success, measures=measures
    ).to_dict()


def _synthetic_run(tmp_path, *, success_round: int | None, rounds: int = 6) -> RunFolder:
    run = RunFolder(tmp_path / "20250101-000000-synthetic")
    run.write_json(
        "config.json",
        {
            "preset": "synthetic-test",
            "run": {"seed": 7, "rounds": rounds, "protocol": "collaborative"},
            "eval": {"realism-threshold": 15},
        },
    )
    run.write_meta(
        kind="federation",
        seed=7,
        preset="synthetic-test",
        status="finished",
        started="2025-01-01T00:00:00+00:00",
        finished="2025-01-01T00:03:05+00:00",
        versions=RunFolder.versions(),
        participation=[
            {
                "who": "participant 0 (honest)",
                "node": 11,
                "replied": 3,
                "aggregated": 3,
                "rejected": 0,
                "last_round": 5,
                "device": "cpu",
            },
        ],
    )
    gen = torch.Generator().manual_seed(0)
    for r in range(0, rounds + 1):
        victims = [
            {"attacker": 1, "target": 0, "fake": 10, "to_fake": 0.02 * r, "target_accuracy": 0.5}
        ]
        metrics = RoundMetrics(
            round=r,
            time=10.0 * r,
            test_accuracy=min(0.98, 0.5 + 0.07 * r),
            victims=victims,
            train_loss=1.0 / max(r, 1),
            participants=1,
        )
        run.append_jsonl("metrics.jsonl", metrics.to_dict())
        if r and r % 2 == 0:
            won = success_round is not None and r >= success_round
            score = _gan(r, rate=min(1.0, 0.3 * r), l2=max(9.0, 26.0 - 3.5 * r), success=won)
            run.append_jsonl("attack.jsonl", score)
            tag = f"active-a1-round-{r:04d}"
            images = torch.rand(12, 1, 28, 28, generator=gen) * 2 - 1
            save_image_grid(images, run.path / "samples" / f"strip-{tag}.png", nrow=12)
            save_comparison_grid(
                images[:10], images[:10], run.path / "grids" / f"figure6-{tag}.png"
            )
    run.append_jsonl(
        "attack.jsonl", _gan(rounds, rate=0.0, l2=7.7, success=False, variant="model-inversion")
    )
    return run


def _verdicts(html: str) -> list[tuple[str, str]]:
    found = re.findall(r'<div class="verdict (\w+)" id="verdict">(.*?)</div>', html, re.S)
    assert found, "no verdict"
    return found


def _embedded_pngs(html: str) -> list[Image.Image]:
    blobs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    return [Image.open(io.BytesIO(base64.b64decode(b))) for b in blobs]


def test_plot_metrics_writes_and_skips(tmp_path):
    assert plot_metrics(RunFolder(tmp_path / "empty")) == []
    run = _synthetic_run(tmp_path, success_round=4)
    paths = plot_metrics(run)
    assert sorted(p.name for p in paths) == ["accuracy.png", "attack.png"]
    assert all(Image.open(p).size[0] > 100 for p in paths)


def test_report_on_complete_run_puts_the_verdict_first(tmp_path):
    run = _synthetic_run(tmp_path, success_round=4)
    html = write_report(run.path).read_text(encoding="utf-8")
    ((kind, text),) = _verdicts(html)
    assert kind == "success"
    assert "class 0 leaked — success at round 4" in text
    assert html.index('id="verdict"') < html.index("<h2>")  # the verdict comes first
    assert 'class="attack-scores"' in html and "first success" in html
    assert "model inversion of the final model" in html
    assert "proximity, not realism" in html and "Fréchet distance" in html  # labelled
    assert "one per round" in html and "sawtooth" in html  # the protocol's effects explained
    assert "Round 0 is the initial" in html
    assert "participant 0 (honest)" in html
    assert "model-inversion-a" not in html  # no internal labels
    pngs = _embedded_pngs(html)
    # accuracy plot, attack plot, 3 strips (rounds 2, 4, 6), figure 6 of the first success
    assert len(pngs) == 6 and {im.format for im in pngs} == {"PNG"}
    assert "RUN FAILED" not in html and not [p for p in run.path.rglob("*.tmp")]


def test_report_on_empty_folder_says_nothing_was_recorded(tmp_path):
    (tmp_path / "run").mkdir()
    html = write_report(tmp_path / "run").read_text(encoding="utf-8")
    ((kind, text),) = _verdicts(html)
    assert kind == "none" and "No attack result was recorded" in text
    assert "No rounds were recorded" in html and "data:image" not in html


def test_report_on_killed_partial_run_escapes_and_says_so(tmp_path):
    run = RunFolder(tmp_path / "run")
    run.write_meta(status="running", message="<script>alert(1)</script> stopped", preset="p&q")
    run.append_jsonl("metrics.jsonl", RoundMetrics(round=1, test_accuracy=0.6).to_dict())
    with open(run.path / "metrics.jsonl", "a") as f:
        f.write('{"round": 2, "test_')
    html = write_report(run.path).read_text(encoding="utf-8")
    assert "RUN NOT FINISHED" in html
    assert "&lt;script&gt;" in html and "<script>" not in html
    assert "p&amp;q" in html
    assert "1 unreadable line(s) in metrics.jsonl" in html


def test_report_target_rate_alone_is_not_success(tmp_path):
    run = RunFolder(tmp_path / "run")
    run.write_meta(status="finished")
    run.write_json("config.json", {"eval": {"realism-threshold": 15}, "run": {"rounds": 60}})
    for r in (1, 2):
        run.append_jsonl("metrics.jsonl", RoundMetrics(round=r, test_accuracy=0.9).to_dict())
        run.append_jsonl("attack.jsonl", _gan(r, rate=1.0, l2=25.0, success=False))
    ((kind, text),) = _verdicts(write_report(run.path).read_text(encoding="utf-8"))
    assert kind == "fail"
    assert "success at round" not in text
    assert "no success in 2 scored sample set(s); best evaluator rate 1.00" in text


def test_report_of_a_gradient_inversion_run(tmp_path):
    run = RunFolder(tmp_path / "run")
    run.write_meta(status="finished", kind="federation")
    score = InversionScore(
        threat="client",
        round=1,
        attack="idlg",
        update="fedsgd",
        batch_size=1,
        isolated="exact",
        psnr=46.9,
        ssim=0.998,
        label_accuracy=1.0,
        iterations=120,
        evaluations=900,
        restart=1,
        seconds=30.0,
    )
    run.append_jsonl("inversion.jsonl", score.to_dict())
    failed = InversionScore(threat="server", round=1, node=5, error="ValueError: boom")
    run.append_jsonl("inversion.jsonl", failed.to_dict())
    images = torch.zeros(1, 3, 32, 32)
    save_comparison_grid(images, images, run.path / "grids" / "inversion-client-round-0001.png")
    html = write_report(run.path).read_text(encoding="utf-8")
    ((kind, text),) = _verdicts(html)
    assert kind == "success"
    assert "reconstructed 1/1 private image at" in text and "46.9 dB" in text
    assert "labels 1/1" in text
    assert "no reconstruction could be scored (ValueError: boom)" in text
    assert "Private (top) and reconstructed (bottom) images" in html
    assert "<figcaption>Round 1, adversarial client</figcaption>" in html


def test_an_inversion_that_recovered_nothing_says_so_and_what_to_try(tmp_path):
    run = RunFolder(tmp_path / "run")
    run.write_meta(status="finished", kind="federation")
    for psnr in (12.5, 17.25):
        score = InversionScore(
            threat="server", round=1, node=7, attack="dlg", batch_size=4, psnr=psnr, ssim=0.2
        )
        run.append_jsonl("inversion.jsonl", score.to_dict())
    html = write_report(run.path).read_text(encoding="utf-8")
    ((kind, text),) = _verdicts(html)
    assert kind != "success"
    assert "no private image recovered: the best of 8 reached 17.2 dB" in text
    assert "attack.inversion-restarts" in text


def test_report_requires_existing_folder(tmp_path):
    with pytest.raises(FileNotFoundError):
        write_report(tmp_path / "nope")


def test_one_number_formatter():
    assert fmt(3) == "3" and fmt(0.12345) == "0.123" and fmt(0.12345, 1) == "0.1"
    assert fmt(True) == "yes" and fmt(None) == "—" and fmt(float("nan")) == "—"
    assert fmt(1.5e-5, 3, "g") == "1.5e-05" and fmt([1, 2]) == "[1,2]"
