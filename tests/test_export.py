"""semodel export: ONNX and TorchScript files that carry their preprocessing and match PyTorch."""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from helpers_ckpt import (
    BAD_CHECKPOINT_MESSAGES,
    CLASSES,
    assert_one_line_error,
    bad_checkpoints,
    make_checkpoint,
    make_folder,
    run_cli,
)

from semodel.checkpoint import build_from_checkpoint, load_checkpoint
from semodel.data import eval_transform, load_rgb


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("export")
    root = make_folder(base / "data")
    images = sorted(root.rglob("*.jpg"))
    fit = {p: CLASSES.index(p.parent.name) for p in images}
    ema_fit = {p: (CLASSES.index(p.parent.name) + 1) % len(CLASSES) for p in images}
    ckpt = base / "run" / "best.pt"
    make_checkpoint(ckpt, root, fit=fit, ema_fit=ema_fit)
    state = load_checkpoint(ckpt)
    transform = eval_transform(state["preprocess"])
    batch = torch.stack([transform(load_rgb(p)) for p in images[:5]])  # 5: not the export batch size
    return {"ckpt": ckpt, "state": state, "batch": batch, "base": base}


def reference_logits(state, batch, ema=False):
    with torch.no_grad():
        return build_from_checkpoint(state, use_ema=ema)(batch)


def test_onnx_matches_pytorch_with_metadata_and_a_dynamic_batch(run, capsys, tmp_path):
    out = tmp_path / "model.onnx"
    code, stdout, err = run_cli(["export", run["ckpt"], "--format", "onnx", "--output", out], capsys)
    assert code == 0, err
    assert f"exported {out}" in stdout
    assert "max abs difference of logits" in stdout and ": OK" in stdout

    proto = onnx.load(str(out))
    onnx.checker.check_model(proto)
    meta = {p.key: p.value for p in proto.metadata_props}
    pre = run["state"]["preprocess"]
    assert json.loads(meta["classes"]) == CLASSES
    assert int(meta["image_size"]) == pre["image_size"] and int(meta["resize"]) == pre["resize"]
    assert json.loads(meta["mean"]) == pytest.approx(pre["mean"])
    assert json.loads(meta["std"]) == pytest.approx(pre["std"])
    assert meta["weights"] == "model"

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {"input": run["batch"].numpy()})
    expected = reference_logits(run["state"], run["batch"])
    assert got.shape == (5, len(CLASSES))
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-4, rtol=0)
    assert (got.argmax(1) == expected.argmax(1).numpy()).all()


def test_torchscript_ema_weights(run, capsys, tmp_path):
    out = tmp_path / "model.torchscript.pt"
    code, stdout, err = run_cli(["export", run["ckpt"], "-f", "torchscript", "-o", out, "--ema"], capsys)
    assert code == 0, err
    extra = {"semodel.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        loaded = torch.jit.load(str(out), _extra_files=extra)
    meta = json.loads(extra["semodel.json"])
    assert json.loads(meta["classes"]) == CLASSES and meta["weights"] == "ema"
    with torch.no_grad():
        got = loaded(run["batch"])
    ema = reference_logits(run["state"], run["batch"], ema=True)
    plain = reference_logits(run["state"], run["batch"], ema=False)
    torch.testing.assert_close(got, ema, atol=1e-5, rtol=0)
    assert not torch.allclose(got, plain, atol=1e-2)  # the EMA weights, not the plain ones


def test_default_output_is_beside_the_checkpoint(run, capsys, tmp_path):
    ckpt = tmp_path / "r" / "best.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(run["ckpt"].read_bytes())
    code, _, err = run_cli(["export", ckpt, "--format", "torchscript"], capsys)
    assert code == 0, err
    assert (tmp_path / "r" / "best.torchscript.pt").is_file()


def test_failed_check_writes_nothing_and_keeps_an_existing_file(run, capsys, tmp_path, monkeypatch):
    import semodel.export

    out = tmp_path / "model.torchscript.pt"
    out.write_bytes(b"an earlier export")
    real = semodel.export.RUNNERS["torchscript"]
    monkeypatch.setitem(semodel.export.RUNNERS, "torchscript", lambda path, x: real(path, x) + 0.5)
    code, stdout, err = run_cli(["export", run["ckpt"], "-f", "torchscript", "-o", out], capsys)
    assert_one_line_error(code, err, "disagrees with PyTorch: max abs difference of logits 0.5")
    assert out.read_bytes() == b"an earlier export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.torchscript.pt"]  # no temp file left


@pytest.mark.parametrize("kind", sorted(BAD_CHECKPOINT_MESSAGES))
def test_bad_checkpoints(run, capsys, tmp_path, kind):
    path = bad_checkpoints(tmp_path, run["ckpt"])[kind]
    code, out, err = run_cli(["export", path, "-f", "torchscript", "-o", tmp_path / "x.pt"], capsys)
    assert_one_line_error(code, err, BAD_CHECKPOINT_MESSAGES[kind], path)
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--format", "tflite"], "--format 'tflite': use one of onnx, torchscript"),
        (["--atol", "0"], "--atol 0.0: must be > 0"),
    ],
)
def test_bad_options(run, capsys, args, fragment):
    code, _, err = run_cli(["export", run["ckpt"], *args], capsys)
    assert_one_line_error(code, err, fragment)


def test_output_that_is_a_folder(run, capsys, tmp_path):
    code, _, err = run_cli(["export", run["ckpt"], "-f", "torchscript", "-o", tmp_path], capsys)
    assert_one_line_error(code, err, "is a folder", tmp_path)


def test_exported_file_name_is_not_the_checkpoint(run, capsys, tmp_path):
    ckpt = tmp_path / "best.pt"
    ckpt.write_bytes(run["ckpt"].read_bytes())
    code, _, err = run_cli(["export", ckpt, "-f", "torchscript", "-o", ckpt], capsys)
    assert_one_line_error(code, err, "is the checkpoint itself")
    assert load_checkpoint(ckpt)["classes"] == CLASSES  # untouched
