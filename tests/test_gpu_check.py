"""scripts/gpu_check.sh, the one-call GPU check (docs/gpu.md), tested where there is no GPU: its
dry run (the same parts on the CPU at toy sizes, the CUDA tests collected and skipped) must write
a complete report, and the part runner must survive a part that fails or runs past its cap."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PARTS = ["cuda_tests", "throughput", "se_tail", "data", "train", "endtoend", "throughput_compiled"]


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_check", module)  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check") / "out"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,  # the dry run's own budget is 300 s; it takes about 30 s on 2 cores
    )
    return done, out


def test_dry_run_writes_a_complete_report(dry_run):
    done, out = dry_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.log", "summary.md"]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["mode"] == "dry-run" and report["complete"] is True
    assert report["seconds"] <= report["budget_s"]
    env = report["environment"]
    assert env["torch"] and env["python"] and env["device"] and env["semodel"][0].isdigit()
    assert list(report["parts"]) == PARTS  # every part, in the order they ran
    for name, part in report["parts"].items():
        assert part["status"] in report["statuses"] == ["ok", "failed", "timed_out", "skipped"], name
        assert is_number(part["seconds"]) and part["seconds"] >= 0, name
        assert is_number(part["cap_s"]) and part["cap_s"] > 0, name
        if part["status"] == "ok":
            assert part["figures"], f"{name}: ok but no figures"
            assert all(is_number(v) for v in part["figures"].values()), (name, part["figures"])
            assert part["seconds"] <= part["cap_s"], name
    statuses = {name: part["status"] for name, part in report["parts"].items()}
    assert statuses == {**dict.fromkeys(PARTS, "ok"), "throughput_compiled": "skipped"}, statuses
    assert "torch.compile" in report["parts"]["throughput_compiled"]["note"]


def test_dry_run_collects_the_cuda_tests_and_skips_them_for_want_of_cuda(dry_run):
    _, out = dry_run
    tests = json.loads((out / "gpu_check.json").read_text())["parts"]["cuda_tests"]
    figures = tests["figures"]
    assert figures["tests"] >= 10 and figures["skipped"] == figures["tests"] and figures["passed"] == 0
    assert all(outcome == "SKIPPED" for outcome in tests["details"]["outcomes"].values())
    assert tests["details"]["skip_reasons"] == ["needs a CUDA GPU (torch.cuda.is_available() is False here)"]


def test_dry_run_figures_and_summary(dry_run):
    _, out = dry_run
    parts = json.loads((out / "gpu_check.json").read_text())["parts"]
    assert parts["throughput"]["figures"]["r18-se-overhead.images_per_s"] > 0
    assert parts["se_tail"]["figures"]["C64x8.fused_ms"] > 0
    assert parts["data"]["figures"]["images"] == 24
    assert parts["data"]["figures"]["dataloader_0_workers.ratio"] == 1.0
    train = parts["train"]["figures"]
    assert train["epochs"] == 1 and train["wall_s"] >= train["run_wall_time_s"] > 0
    e2e = parts["endtoend"]["figures"]
    assert e2e["semodel_s"] > 0 and e2e["reference_s"] > 0
    # both times are rounded to 0.01 s, the ratio is not: the ratio of the rounded times may differ by that
    rounding = e2e["ratio"] * (0.005 / e2e["reference_s"] + 0.005 / e2e["semodel_s"])
    assert e2e["ratio"] == pytest.approx(e2e["reference_s"] / e2e["semodel_s"], abs=1e-3 + rounding)
    assert 0 < e2e["outside_train_step_share"] < 1 and 0 <= e2e["checkpoint_share"] < 1
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# semodel GPU check (dry-run)")
    for name in PARTS:
        assert f"| {name} |" in summary
    headings = ("## Eager training throughput", "## SE tail", "## Data pipeline", "## semodel train")
    for heading in (*headings, "## End to end: semodel train vs a plain loop"):
        assert heading in summary
    log = (out / "gpu_check.log").read_text()
    assert all(f"===== {name}: " in log for name in PARTS)


def test_a_failing_or_slow_part_does_not_stop_the_later_ones(tmp_path):
    g = load_gpu_check()
    py = sys.executable
    parts = [
        g.Part("slow", "sleeps past its cap", 1.5, [py, "-c", "import time; time.sleep(60)"], min_s=0.5),
        g.Part("broken", "exits 3", 20, [py, "-c", "raise SystemExit(3)"]),
        g.Part(
            "unreadable",
            "exits 0 but writes no JSON",
            20,
            [py, "-c", "pass"],
            g.read_throughput(tmp_path / "missing.json", ["r18-timm"]),
        ),
        g.Part("fine", "prints", 20, [py, "-c", "print('x = 1.5')"], lambda text, s: g.Outcome({"x": 1.5})),
        g.Part("late", "wants more than is left", 20, [py, "-c", "pass"], optional=True, min_s=1e6),
    ]
    reports = []
    results = g.run_parts(
        parts, g.time.monotonic() + 200, dict(os.environ), tmp_path, tmp_path / "log", reports.append
    )
    assert {n: r["status"] for n, r in results.items()} == {
        "slow": "timed_out",
        "broken": "failed",
        "unreadable": "failed",
        "fine": "ok",
        "late": "skipped",
    }
    assert results["slow"]["seconds"] < 15
    assert results["broken"]["note"] == "exit code 3"
    assert "could not be read" in results["unreadable"]["note"]
    assert results["fine"]["figures"] == {"x": 1.5}
    assert "no time left" in results["late"]["note"]
    assert len(reports) == len(parts)  # the report is rewritten after every part
    assert g.not_ok(results) == ["slow", "broken", "unreadable", "late"]
