"""Reliability, round two: the data a command uses is the data it says, and hostile or odd input is
handled in bounded time (the error cases are rows of tests/test_bad_inputs.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import pytest
from helpers_ckpt import CLASSES, make_folder, make_image, run_cli
from helpers_train import alias_bomb, tiny_config, write_config

from semodel.config import load_config
from semodel.errors import SemodelError
from semodel.files import make_run_dir


def train(tmp_path: Path, capsys, root, name: str, **sections) -> Path:
    config = write_config(tmp_path / f"{name}.yaml", tiny_config(root, "runs", name, **sections))
    code, _, err = run_cli(["train", "--config", config, "--quiet"], capsys)
    assert code == 0, err
    return Path("runs") / name


def test_eval_finds_the_run_data_not_the_current_folder_data(tmp_path, monkeypatch, capsys):
    """data.root relative to where training ran: eval from another folder that has its own data/
    (same class names, other images) must still evaluate the run's images, and say which folder."""
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    make_folder(project / "data", CLASSES, per_class=4)
    make_folder(elsewhere / "data", CLASSES, per_class=6)  # a decoy with more images per class
    monkeypatch.chdir(project)
    run_dir = train(project, capsys, "data", "rel", data={"split": {"val": 0.25, "test": 0.25}})
    monkeypatch.chdir(elsewhere)
    ckpt = project / run_dir / "best.pt"
    code, out, err = run_cli(["eval", ckpt, "-o", elsewhere / "r.json"], capsys)
    assert code == 0, err
    report = json.loads((elsewhere / "r.json").read_text())
    assert Path(report["data"]["root"]) == project / "data"
    assert report["data"]["evaluated"] == 3  # the run's test split: one image per class
    assert f"data        {project / 'data'}" in out


def test_ema_runs_are_evaluated_predicted_and_exported_with_the_ema_weights(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    make_folder(tmp_path / "data", CLASSES, per_class=4)
    run_dir = train(
        tmp_path,
        capsys,
        "data",
        "ema",
        data={"split": {"val": 0.25, "test": 0.25}},
        train={"epochs": 2, "ema": True, "ema_decay": 0.5},
    )
    tested = json.loads((run_dir / "metrics.json").read_text())["test"]
    ckpt = run_dir / "best.pt"
    code, out, err = run_cli(["eval", ckpt, "-o", "default.json"], capsys)
    assert code == 0, err
    default = json.loads(Path("default.json").read_text())
    assert default["weights"] == "ema" and "weights     ema (the weights the run selected" in out
    assert default["metrics"]["loss"] == pytest.approx(tested["loss"], rel=1e-5)  # the run's own test
    # best.pt keeps the selected (EMA) weights only; the raw ones are in last.pt.
    code, out, err = run_cli(["eval", ckpt, "--no-ema", "-o", "raw.json"], capsys)
    assert code == 2 and "holds only the EMA weights the run selected" in err and "last.pt" in err
    code, out, err = run_cli(["eval", run_dir / "last.pt", "--no-ema", "-o", "raw.json"], capsys)
    raw = json.loads(Path("raw.json").read_text())
    assert raw["weights"] == "model" and raw["metrics"]["loss"] != default["metrics"]["loss"]
    code, out, err = run_cli(["predict", "data/cat/cat_0.jpg", "--checkpoint", ckpt], capsys)
    assert code == 0 and "weights: ema (the weights the run selected" in err
    code, out, err = run_cli(["export", ckpt, "-f", "torchscript", "-o", "m.pt"], capsys)
    assert code == 0 and "ema weights" in out, err


def test_file_names_that_are_not_utf8_round_trip(tmp_path, monkeypatch, capsys):
    """A name like b'caf\\xe9.jpg' (Latin-1) on a UTF-8 system: trained on, listed in split.csv as its
    bytes, read back by eval, predicted; no temp file or half-made folder anywhere."""
    monkeypatch.chdir(tmp_path)
    root = make_folder(tmp_path / "data", CLASSES, per_class=4)
    odd = os.fsdecode(os.fsencode(str(root / "cat")) + b"/caf\xe9.jpg")
    make_image(Path(odd), (250, 10, 10), seed=99, size=(24, 24))
    run_dir = train(tmp_path, capsys, "data", "odd", data={"split": {"val": 0.25, "test": 0.0}})
    split = (run_dir / "split.csv").read_bytes()
    assert b"cat/caf\xe9.jpg" in split
    code, out, err = run_cli(["eval", run_dir / "best.pt", "--split", "all", "-o", "e.json"], capsys)
    assert code == 0, err
    assert json.loads(Path("e.json").read_text())["data"]["evaluated"] == 13
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "semodel",
            "predict",
            odd,
            "--checkpoint",
            str(run_dir / "best.pt"),
            "-f",
            "csv",
        ],
        capture_output=True,
    )
    assert result.returncode == 0, result.stderr
    assert b"caf\xe9.jpg" in result.stdout
    leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_two_runs_started_at_once_get_their_own_folders(tmp_path):
    made, errors = [], []
    barrier = threading.Barrier(8)

    def start() -> None:
        barrier.wait()
        try:
            made.append(make_run_dir(tmp_path / "runs", "same"))
        except Exception as e:  # noqa: BLE001 (the test reports any failure)
            errors.append(e)

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(set(made)) == 8
    assert {p.name for p in made} == {"same", *(f"same-{n}" for n in range(2, 9))}


def test_a_hostile_config_is_refused_in_bounded_time_and_memory(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb(levels=12))  # 9**12 strings if expanded
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(SemodelError) as info:
        load_config(path)
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert seconds < 1.0 and peak < 50 * 2**20, (seconds, peak)
    assert len(str(info.value)) < 400 and "data.root = [[[[" in str(info.value)


def test_help_shows_flags_without_a_value(capsys):
    for command in ("train", "eval", "predict", "export", "inspect", "cv"):
        code, out, err = run_cli([command, "--help"], capsys)
        assert code == 0, err
        assert "<bool>" not in out, command
    assert "--ema / --no-ema" in run_cli(["eval", "--help"], capsys)[1]


@pytest.fixture(scope="module")
def many_images(tmp_path_factory):
    """A checkpoint and 120 images to predict."""
    from helpers_ckpt import make_checkpoint

    base = tmp_path_factory.mktemp("stream")
    root = make_folder(base / "data", CLASSES, per_class=40)
    ckpt = base / "best.pt"
    make_checkpoint(ckpt, root)
    return base, root, ckpt


@pytest.mark.parametrize("fmt", ["table", "json", "csv"])
def test_predict_streams_rows_and_keeps_them_on_ctrl_c(many_images, fmt):
    base, root, ckpt = many_images
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    args = ["predict", str(root), "--checkpoint", str(ckpt), "-b", "1", "-f", fmt, "--device", "cpu"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "semodel", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        lines = [proc.stdout.readline() for _ in range(4)]  # rows arrive before the end
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        rest, err = proc.stdout.read(), proc.stderr.read()  # (communicate would skip what readline buffered)
    finally:
        proc.kill()
    out = "".join(lines) + rest
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    if fmt == "json":
        rows = json.loads(out)  # the list is closed: valid JSON of what was predicted
        assert 1 <= len(rows) < 120
    else:
        rows = [line for line in out.splitlines()[1:] if line.strip()]
        assert 3 <= len(rows) < 120
