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

from fedleak.report import plot_metrics, save_comparison_grid, save_image_grid, write_report
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


def _synthetic_run(tmp_path, *, success_round: int | None, rounds: int = 6) -> RunFolder:
    run = RunFolder(tmp_path / "20250101-000000-synthetic")
    run.write_json(
        "config.json",
        {
            "run": {"seed": 7, "rounds": rounds},
            "eval": {"target-class": 0, "realism-threshold": 15},
        },
    )
    run.write_meta(
        seed=7,
        preset="synthetic-test",
        status="finished",
        started="2025-01-01T00:00:00+00:00",
        finished="2025-01-01T00:03:05+00:00",
        versions=RunFolder.versions(),
    )
    gen = torch.Generator().manual_seed(0)
    for r in range(1, rounds + 1):
        run.append_jsonl(
            "metrics.jsonl",
            {
                "round": r,
                "time": 10.0 * r,
                "test_accuracy": min(0.98, 0.5 + 0.07 * r),
                "test_to_fake": 0.02 * r,
                "train_loss": 1.0 / r,
                "participants": 1,
            },
        )
        if r % 2 == 0:
            won = success_round is not None and r >= success_round
            run.append_jsonl(
                "attack.jsonl",
                {
                    "round": r,
                    "time": 10.0 * r,
                    "target": 0,
                    "target_rate": min(1.0, 0.3 * r),
                    "target_confidence": 0.8,
                    "nn_l2_median": max(9.0, 26.0 - 3.5 * r),
                    "nn_ssim_target": min(0.9, 0.1 * r),
                    "nn_ssim_other": 0.05 * r,
                    "diversity": 0.4,
                    "success": won,
                    "variant": "active",
                },
            )
            save_image_grid(torch.rand(20, 1, 28, 28, generator=gen) * 2 - 1, run.sample_path(r))
            save_comparison_grid(
                torch.rand(10, 1, 28, 28, generator=gen) * 2 - 1,
                torch.rand(10, 1, 28, 28, generator=gen) * 2 - 1,
                run.figure6_path(r),
            )
    run.append_jsonl(
        "attack.jsonl",
        {
            "round": rounds,
            "target": 0,
            "target_rate": 0.2,
            "nn_l2_median": 40.0,
            "success": False,
            "variant": "model-inversion",
        },
    )
    return run


def _verdict(html: str) -> tuple[str, str]:
    m = re.search(r'<p class="verdict (\w+)" id="verdict">(.*?)</p>', html, re.S)
    assert m, "no verdict paragraph"
    return m.group(1), m.group(2)


def _embedded_pngs(html: str) -> list[Image.Image]:
    blobs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    return [Image.open(io.BytesIO(base64.b64decode(b))) for b in blobs]


def test_plot_metrics_writes_and_skips(tmp_path):
    assert plot_metrics(RunFolder(tmp_path / "empty")) == []
    run = _synthetic_run(tmp_path, success_round=4)
    paths = plot_metrics(run)
    assert sorted(p.name for p in paths) == ["accuracy.png", "attack.png"]
    assert all(Image.open(p).size[0] > 100 for p in paths)


def test_report_on_complete_run(tmp_path):
    run = _synthetic_run(tmp_path, success_round=4)
    html = write_report(run.path).read_text(encoding="utf-8")
    kind, text = _verdict(html)
    assert kind == "success"
    assert "Active GAN attack on class 0: success at round 4" in text
    assert "target rate 1.00, median NN distance 12.0 &lt;= 15" in text
    assert "Model-inversion baseline on class 0: no success" in text
    assert 'class="attack-scores"' in html and "first success" in html
    assert "synthetic-test" in html and "<details>" in html and "torch" in html
    pngs = _embedded_pngs(html)
    # accuracy plot, attack plot, latest samples, latest figure 6, figure 6 at first success
    assert len(pngs) == 5
    assert {im.format for im in pngs} == {"PNG"}
    assert "round 6 (latest)" in html and "(first success)" in html
    assert "RUN FAILED" not in html and "RUN INTERRUPTED" not in html
    assert not [p for p in run.path.rglob("*.tmp")]


def test_report_on_empty_folder_says_no_rounds(tmp_path):
    (tmp_path / "run").mkdir()
    html = write_report(tmp_path / "run").read_text(encoding="utf-8")
    kind, text = _verdict(html)
    assert kind == "none" and "No rounds were recorded" in text
    assert "meta.json is missing" in html
    assert "data:image" not in html


def test_report_on_killed_partial_run(tmp_path):
    run = RunFolder(tmp_path / "run")
    run.write_meta(status="interrupted", message="<script>alert(1)</script> stopped", preset="p&q")
    run.append_jsonl("metrics.jsonl", {"round": 1, "test_accuracy": 0.6, "test_to_fake": None})
    with open(run.path / "metrics.jsonl", "a") as f:
        f.write('{"round": 2, "test_')
    (run.path / "samples" / "round-0002.png").write_bytes(b"")  # killed before the image landed
    html = write_report(run.path).read_text(encoding="utf-8")
    assert "RUN INTERRUPTED" in html
    assert "&lt;script&gt;" in html and "<script>" not in html
    assert "p&amp;q" in html
    assert "1 unreadable line in metrics.jsonl" in html
    kind, text = _verdict(html)
    assert kind == "none" and "No attack scores were recorded (1 training round)" in text
    assert "partial" in text
    assert "No sample grid was written" in html


def test_report_target_rate_alone_is_not_success(tmp_path):
    run = RunFolder(tmp_path / "run")
    run.write_meta(status="finished")
    for r in (1, 2):
        run.append_jsonl("metrics.jsonl", {"round": r, "test_accuracy": 0.9})
        run.append_jsonl(
            "attack.jsonl",
            {
                "round": r,
                "target": 3,
                "target_rate": 1.0,
                "nn_l2_median": 25.0,
                "success": False,
                "variant": "active",
            },
        )
    kind, text = _verdict(write_report(run.path).read_text(encoding="utf-8"))
    assert kind == "fail"
    assert "success at round" not in text
    assert "Active GAN attack on class 3: no success in 2 scored sample sets" in text
    assert "best target rate 1.00" in text and "25.0 &gt; 15" in text


def test_report_requires_existing_folder(tmp_path):
    with pytest.raises(FileNotFoundError):
        write_report(tmp_path / "nope")


def test_report_finds_images_tagged_per_variant_and_attacker(tmp_path):
    run = RunFolder(tmp_path / "run")
    run.write_meta(status="finished")
    images = torch.zeros(4, 1, 28, 28)
    for r in (2, 4):
        run.append_jsonl(
            "attack.jsonl",
            {
                "round": r,
                "attacker": 1,
                "target": 0,
                "target_rate": 0.9,
                "success": r == 2,
                "variant": "active",
            },
        )
        save_image_grid(images, run.path / "samples" / f"active-a1-round-{r:04d}.png")
        save_comparison_grid(
            images, images, run.path / "grids" / f"figure6-active-a1-round-{r:04d}.png"
        )
    html = write_report(run.path).read_text(encoding="utf-8")
    assert "Generated samples, active-a1, round 4 (latest)" in html
    assert "Figure 6 layout, active-a1, round 4 (latest)" in html
    assert "Figure 6 layout, active, round 2 (first success)" in html
    assert len(_embedded_pngs(html)) == 4  # attack plot + the three grids
