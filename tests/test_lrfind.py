"""``semodel lr-find``: the learning-rate range test on tiny generated data (18 steps of 2 images).

What it must do: scan exponentially increasing learning rates (the CSV's lr column strictly
increasing, from --start), stop when the loss diverges and say so, suggest an lr inside the
scanned range, write a NEW run folder (never an existing run's), and refuse bad input with one
line and no folder.
"""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import pytest
from helpers_ckpt import make_folder, run_cli
from helpers_train import one_torch_thread, tiny_config, write_config  # noqa: F401 (fixture)

from semodel.lrfind import Scan, ScanOptions, lr_at, smoothing_beta, suggest

STEPS = 18  # 3 classes x 16 images, 25% validation: 36 training images, batches of 2


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("lrfind") / "photos", per_class=16)


def config_file(tmp_path: Path, root: Path, **sections) -> Path:
    sections.setdefault("data", {"batch_size": 2})
    return write_config(tmp_path / "tiny.yaml", tiny_config(root, tmp_path / "runs", name="tiny", **sections))


def read_rows(run_dir: Path) -> list[dict[str, float]]:
    with open(run_dir / "lr_find.csv", newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def suggested(out: str) -> float:
    match = re.search(r"--set optim\.lr=(\S+)$", out.strip().splitlines()[-1])
    assert match, out
    return float(match.group(1))


def test_scan_writes_a_new_folder_and_suggests_an_lr_inside_the_range(tmp_path, root, capsys):
    """AdamW without weight decay: on these images its loss falls within the 18 steps (every seed
    tried), so that there is a descent to suggest from."""
    config = config_file(tmp_path, root, optim={"name": "adamw", "weight_decay": 0.0})
    # An earlier training run and an earlier scan of the same name: neither may be touched.
    earlier = tmp_path / "runs" / "tiny"
    earlier.mkdir(parents=True)
    (earlier / "last.pt").write_bytes(b"weights")
    (tmp_path / "runs" / "tiny-lr-find").mkdir()
    code, out, err = run_cli(["lr-find", "-c", config, "--start", "1e-5", "--end", "1", "-q"], capsys)
    assert code == 0, err
    run_dir = tmp_path / "runs" / "tiny-lr-find-2"
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml", "lr_find.csv", "lr_find.png"]
    assert (run_dir / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (earlier / "last.pt").read_bytes() == b"weights" and len(list(earlier.iterdir())) == 1
    assert not any((tmp_path / "runs" / "tiny-lr-find").iterdir())
    assert f"one epoch has {STEPS} optimizer steps" in out  # --steps 100 (default) is cut to an epoch

    rows = read_rows(run_dir)
    lrs = [r["lr"] for r in rows]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    assert math.isclose(lrs[0], 1e-5) and all(a < b for a, b in zip(lrs, lrs[1:], strict=False))
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["smoothed_loss"]) for r in rows)
    assert math.isclose(rows[0]["smoothed_loss"], rows[0]["loss"])  # bias-corrected: no pull to 0
    lr = suggested(out)
    assert 1e-5 <= lr <= 1
    # The rule, applied to the CSV's own columns, gives the same lr (rounded to 2 digits).
    scan = Scan(lrs=lrs, losses=[r["loss"] for r in rows], smoothed=[r["smoothed_loss"] for r in rows])
    assert f"{lrs[suggest(scan)]:.1e}" == f"{lr:.1e}"
    assert f"suggested optim.lr: {lr:.1e}" in out
    assert out.strip().splitlines()[-1] == f"use it: semodel train --config {config} --set optim.lr={lr:.1e}"


def test_a_diverging_scan_stops_early_and_says_so(tmp_path, root, capsys):
    """SGD pushed to lr 1e4 blows up long before the last step (with the fine-tuning recipe's keys:
    the backbone at lr x 0.1 in groups of its own, and a freeze, which the scan does not apply)."""
    args = ["lr-find", "--data", root, "--end", "1e4", "--steps", "15", "-q"]
    sets = [
        "model.stem=cifar",
        "data.image_size=16",
        "data.batch_size=2",
        "data.num_workers=0",
        "data.split.val=0.25",
        "optim.name=sgd",
        "optim.backbone_lr_scale=0.1",
        "train.epochs=3",
        "train.freeze.epochs=1",
        "train.device=cpu",
        f"log.out_dir={tmp_path / 'runs'}",
    ]
    code, out, err = run_cli([*args, *(a for s in sets for a in ("-s", s))], capsys)
    assert code == 0, err
    rows = read_rows(tmp_path / "runs" / "photos-lr-find")  # --data: named after the folder
    assert 3 <= len(rows) < 15
    assert re.search(rf"stopped after step {len(rows)} of 15: .*(diverged|loss became)", out), out
    assert rows[-1]["lr"] < 1e4


def test_a_missing_data_folder_is_one_line_and_leaves_no_folder(tmp_path, capsys):
    config = config_file(tmp_path, tmp_path / "no-such-folder")
    code, out, err = run_cli(["lr-find", "--config", config], capsys)
    assert code == 2
    assert err.startswith("error: data folder not found") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--start", "0"], "--start 0: the smallest learning rate must be > 0"),
        (["--start", "1e-3", "--end", "1e-4"], "--end 0.0001: must be larger than --start"),
        (["--steps", "3"], "--steps 3: at least 10 steps"),
    ],
)
def test_bad_ranges_are_refused_before_anything_is_built(tmp_path, root, capsys, args, message):
    code, _, err = run_cli(["lr-find", "-c", config_file(tmp_path, root), *args], capsys)
    assert code == 2 and err.startswith(f"error: {message}"), err
    assert not (tmp_path / "runs").exists()


def test_too_few_batches_for_a_curve(tmp_path, root, capsys):
    code, _, err = run_cli(["lr-find", "-c", config_file(tmp_path, root, data={"batch_size": 32})], capsys)
    assert code == 2 and "the range test needs at least 10: lower data.batch_size" in err, err
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- the rule


def test_lr_ramp_is_exponential_from_start_to_end():
    lrs = [lr_at(i, 9, 1e-6, 1e2) for i in range(9)]
    assert math.isclose(lrs[0], 1e-6) and math.isclose(lrs[-1], 1e2)
    assert all(math.isclose(b / a, 10.0) for a, b in zip(lrs, lrs[1:], strict=False))


def test_smoothing_time_constant():
    assert smoothing_beta(100) == pytest.approx(0.8)  # 100 steps: 5 steps
    assert smoothing_beta(10) == pytest.approx(0.5)  # at least 2 steps
    assert smoothing_beta(10_000) == pytest.approx(0.98)  # at most 50


def test_suggestion_is_the_steepest_descent_before_the_minimum():
    """A loss that is flat, falls (fastest around lr 1e-3), bottoms out at 1e-2, then climbs steeply:
    the steep climb after the minimum must not count."""
    lrs = [10 ** (-6 + 0.25 * i) for i in range(25)]  # 1e-6 ... 1
    x = [math.log10(lr) for lr in lrs]
    smoothed = [2.0 - math.tanh(2 * (v + 3)) if v <= -2 else 2.0 - math.tanh(2) + 5 * (v + 2) ** 2 for v in x]
    index = suggest(Scan(lrs=lrs, losses=smoothed, smoothed=smoothed))
    assert math.isclose(lrs[index], 1e-3)
    # The minimum at the first steps: nothing to suggest.
    rising = [1.0 + i for i in range(10)]
    assert suggest(Scan(lrs=lrs[:10], losses=rising, smoothed=rising)) is None


def test_scan_options_defaults():
    options = ScanOptions()
    assert (options.start, options.end, options.steps) == (1e-7, 10.0, 100)
