"""semodel predict: probabilities checked against the model, inputs, formats, bad files, Grad-CAM."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_ckpt import (
    BAD_CHECKPOINT_MESSAGES,
    CLASSES,
    assert_one_line_error,
    bad_checkpoints,
    make_checkpoint,
    make_folder,
    make_image,
    run_cli,
    run_subprocess,
)
from PIL import Image

import semodel.preprocess
from semodel.checkpoint import build_from_checkpoint, load_checkpoint
from semodel.data import eval_transform, load_rgb
from semodel.gradcam import grad_cam, model_view_box
from semodel.predict import collect_inputs
from semodel.preprocess import preprocess_image

# Every image is fitted to its true class, except two that the model gets wrong on purpose.
WRONG = {"cat_1": "fox", "dog_2": "cat"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("predict")
    root = make_folder(base / "data")
    fit = {p: CLASSES.index(WRONG.get(p.stem, p.parent.name)) for p in sorted(root.rglob("*.jpg"))}
    ckpt = base / "runs" / "r" / "best.pt"
    make_checkpoint(ckpt, root, fit=fit)
    return {"base": base, "root": root, "ckpt": ckpt}


def reference_probs(ckpt: Path, paths: list[Path]) -> torch.Tensor:
    """The model run the plain way: torchvision's eval transform, one forward pass."""
    state = load_checkpoint(ckpt)
    model = build_from_checkpoint(state)
    transform = eval_transform(state["preprocess"])
    with torch.no_grad():
        return model(torch.stack([transform(load_rgb(p)) for p in paths])).softmax(1)


def predict_json(args: list, capsys) -> tuple[int, list[dict], str]:
    code, out, err = run_cli(["predict", *args, "--format", "json"], capsys)
    return code, json.loads(out) if out.strip() else [], err


# ----------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("native", [True, False])
def test_preprocess_is_the_eval_transform(native, monkeypatch, tmp_path):
    """predict's torchvision-free preprocessing gives exactly torchvision's tensor."""
    import torchvision.transforms.v2.functional._geometry as tv_geometry

    monkeypatch.setattr(semodel.preprocess, "_uint8_resize_is_native", lambda: native)
    monkeypatch.setattr(tv_geometry, "_do_native_uint8_resize_on_cpu", lambda interpolation: native)
    pre = {"image_size": 32, "resize": 37, "mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3]}
    transform = eval_transform(pre | {"interpolation": "bilinear"})
    rng = np.random.default_rng(0)
    for w, h in [(40, 36), (36, 40), (37, 37), (300, 41), (32, 32), (37, 90)]:
        for mode in ("RGB", "L", "RGBA", "P"):
            path = tmp_path / f"{w}x{h}_{mode}.png"
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode).save(path)
            image = load_rgb(path)
            expected = transform(image)
            got = preprocess_image(image, pre)
            assert got.shape == (3, 32, 32) and got.dtype == torch.float32
            torch.testing.assert_close(got, expected, atol=0, rtol=0, msg=f"{w}x{h} {mode}")


# ----------------------------------------------------------------------------- predictions


def test_probabilities_match_the_model(world, capsys):
    paths = sorted(world["root"].rglob("*.jpg"))
    code, items, err = predict_json(["--checkpoint", world["ckpt"], world["root"]], capsys)
    assert code == 0, err
    assert [Path(i["path"]) for i in items] == paths
    expected = reference_probs(world["ckpt"], paths)
    for item, probs, path in zip(items, expected, paths, strict=True):
        assert len(item["predictions"]) == 3  # default: min(3, classes)
        order = probs.argsort(descending=True)
        assert [p["class"] for p in item["predictions"]] == [CLASSES[int(i)] for i in order]
        assert [p["prob"] for p in item["predictions"]] == pytest.approx(probs[order].tolist(), abs=2e-6)
        assert item["predictions"][0]["class"] == WRONG.get(path.stem, path.parent.name)


def test_batch_size_does_not_change_results(world, capsys):
    results = []
    for batch in ("1", "5", "64"):
        code, items, err = predict_json(["--checkpoint", world["ckpt"], world["root"], "-b", batch], capsys)
        assert code == 0, err
        results.append(items)
    for items in results[1:]:
        assert [i["path"] for i in items] == [i["path"] for i in results[0]]
        for a, b in zip(items, results[0], strict=True):
            assert [p["class"] for p in a["predictions"]] == [p["class"] for p in b["predictions"]]
            assert [p["prob"] for p in a["predictions"]] == pytest.approx(
                [p["prob"] for p in b["predictions"]], abs=1e-5
            )


def test_topk(world, capsys, tmp_path):
    code, items, err = predict_json(
        ["--checkpoint", world["ckpt"], world["root"] / "cat", "--topk", "1"], capsys
    )
    assert code == 0, err
    assert [len(i["predictions"]) for i in items] == [1, 1, 1, 1]
    code, _, err = run_cli(
        ["predict", "--checkpoint", world["ckpt"], world["root"] / "cat", "--topk", "4"], capsys
    )
    assert_one_line_error(code, err, "--topk 4: must be between 1 and 3")

    binary = tmp_path / "binary.pt"
    make_checkpoint(binary, world["root"], classes=["cat", "dog"])
    code, out, err = run_cli(
        ["predict", "--checkpoint", binary, world["root"] / "cat" / "cat_0.jpg", "-f", "csv"], capsys
    )
    assert code == 0, err
    assert out.splitlines()[0] == "path,top1,prob1,top2,prob2"  # min(3, 2 classes)


def test_files_folders_and_globs(world, tmp_path):
    root = world["root"]
    (root / "dog" / "readme.txt").write_text("not an image")
    paths, problems = collect_inputs(
        [
            str(root / "cat" / "cat_2.jpg"),
            str(root / "cat"),
            str(root / "d*" / "*_[01].jpg"),
            str(root / "zzz*.png"),
        ]
    )
    names = [p.name for p in paths]
    # the named file first, then the folder (without repeating cat_2), then the glob's matches
    assert names == ["cat_2.jpg", "cat_0.jpg", "cat_1.jpg", "cat_3.jpg", "dog_0.jpg", "dog_1.jpg"]
    assert problems == [(str(root / "zzz*.png"), "no image file matches this pattern")]
    paths, problems = collect_inputs([str(root / "dog")])
    assert "readme.txt" not in [p.name for p in paths] and len(paths) == 4
    empty = tmp_path / "empty"
    empty.mkdir()
    assert collect_inputs([str(empty)])[1][0][1].startswith("no image files in this folder")


def test_table_and_csv(world, capsys):
    files = [world["root"] / "cat" / "cat_0.jpg", world["root"] / "cat" / "cat_1.jpg"]
    code, out, err = run_cli(["predict", "--checkpoint", world["ckpt"], *files], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["image", "top1", "prob1", "top2", "prob2", "top3", "prob3"]
    assert lines[1].split()[:2] == [str(files[0]), "cat"]
    assert lines[2].split()[:2] == [str(files[1]), "fox"]
    code, out, err = run_cli(["predict", "--checkpoint", world["ckpt"], *files, "--format", "csv"], capsys)
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["path"] for r in rows] == [str(f) for f in files]
    assert [r["top1"] for r in rows] == ["cat", "fox"]
    probs = reference_probs(world["ckpt"], files)
    assert [float(r["prob1"]) for r in rows] == pytest.approx(probs.max(1).values.tolist(), abs=1e-5)
    for r in rows:
        assert float(r["prob1"]) >= float(r["prob2"]) >= float(r["prob3"])
        assert float(r["prob1"]) + float(r["prob2"]) + float(r["prob3"]) == pytest.approx(1, abs=1e-5)


def test_bad_files_are_named_and_the_rest_predicted(world, capsys, tmp_path):
    good = world["root"] / "dog" / "dog_0.jpg"
    text = tmp_path / "notes.jpg"
    text.write_text("hello")
    truncated = tmp_path / "truncated.jpg"
    data = make_image(tmp_path / "full.jpg", (10, 200, 10), seed=3, size=(64, 64)).read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    missing = tmp_path / "missing.jpg"
    empty = tmp_path / "empty"
    empty.mkdir()
    code, items, err = predict_json(
        ["--checkpoint", world["ckpt"], text, good, missing, truncated, empty], capsys
    )
    assert code == 1
    assert [i["path"] for i in items] == [str(good)]
    assert items[0]["predictions"][0]["class"] == "dog"
    lines = err.splitlines()
    assert f"error: {text}: not an image (unknown file format)" in lines
    assert f"error: {missing}: file not found" in lines
    assert any(line.startswith(f"error: {truncated}: corrupt image") for line in lines), err
    assert any(line.startswith(f"error: {empty}: no image files") for line in lines), err
    assert "4 input(s) failed, 1 image(s) predicted" in err
    assert "Traceback" not in err


def test_newest_best_checkpoint_under_runs(world, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    image = world["root"] / "cat" / "cat_0.jpg"
    code, _, err = run_cli(["predict", image], capsys)
    assert_one_line_error(code, err, "no best.pt found under runs/")

    old, new = Path("runs/a/best.pt"), Path("runs/b/nested/best.pt")
    make_checkpoint(old, world["root"], classes=["ant", "bee", "cow"])
    make_checkpoint(new, world["root"], classes=["elk", "emu", "eel"])
    os.utime(old, (2_000_000_000, 2_000_000_000))
    os.utime(new, (2_000_000_100, 2_000_000_100))
    code, items, err = predict_json([image], capsys)
    assert code == 0, err
    assert f"using checkpoint {new}" in err
    assert items[0]["predictions"][0]["class"] in {"elk", "emu", "eel"}
    os.utime(old, (2_000_000_200, 2_000_000_200))
    code, items, err = predict_json([image], capsys)
    assert f"using checkpoint {old}" in err
    assert items[0]["predictions"][0]["class"] in {"ant", "bee", "cow"}


def test_progress_bar_on_a_terminal_only(world, capsys, monkeypatch):
    args = ["predict", "--checkpoint", world["ckpt"], world["root"], "-b", "4", "-f", "csv"]
    code, _, err = run_cli(args, capsys)
    assert code == 0 and "img/s" not in err and "predict:" not in err
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    code, out, err = run_cli(args, capsys)
    assert code == 0
    assert "predict: 100%" in err and "12/12" in err  # tqdm's bar
    assert len(out.splitlines()) == 13  # the bar stays off stdout


@pytest.mark.parametrize("kind", sorted(BAD_CHECKPOINT_MESSAGES))
def test_bad_checkpoints(world, capsys, tmp_path, kind):
    path = bad_checkpoints(tmp_path, world["ckpt"])[kind]
    code, out, err = run_cli(["predict", "--checkpoint", path, world["root"] / "cat"], capsys)
    assert_one_line_error(code, err, BAD_CHECKPOINT_MESSAGES[kind], path)
    assert out == ""


def test_cold_start_imports_only_what_it_needs(world):
    """`semodel predict one.jpg` must not import torchvision, matplotlib, torchmetrics, onnx, ...

    Modules that the CLI framework itself loads (recent typer versions import pydantic) are not
    predict's doing: only what is new after a trivial typer command has run counts. The config
    schema (semodel.config, with yaml) is loaded on purpose: a checkpoint's stored config is
    validated with it before anything is built from the file (about 0.1 s).
    """
    script = (
        "import sys\n"
        "import typer\n"
        "probe = typer.Typer()\n"
        "probe.command()(lambda name='x': None)\n"
        "try:\n    probe(['--name', 'y'])\nexcept SystemExit:\n    pass\n"
        "framework = set(sys.modules)\n"
        "from semodel.cli import main\n"
        f"image = {str(world['root'] / 'cat' / 'cat_0.jpg')!r}\n"
        f"sys.argv = ['semodel', 'predict', '--checkpoint', {str(world['ckpt'])!r}, image]\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "heavy = ['torchvision', 'matplotlib', 'torchmetrics', 'onnx', 'onnxruntime', 'tensorboard',\n"
        "         'semodel.train', 'semodel.evaluate', 'semodel.gradcam', 'semodel.loaders']\n"
        "print('LOADED', [m for m in heavy if m in sys.modules and m not in framework])\n"
    )
    import subprocess

    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "LOADED []" in result.stdout, result.stdout
    assert "cat_0.jpg" in result.stdout


def test_partial_failure_exit_code_end_to_end(world, tmp_path):
    missing = tmp_path / "missing.jpg"
    result = run_subprocess(
        ["predict", "--checkpoint", world["ckpt"], missing, world["root"] / "cat" / "cat_0.jpg"]
    )
    assert result.returncode == 1
    assert f"error: {missing}: file not found" in result.stderr
    assert "Traceback" not in result.stderr
    assert "cat_0.jpg" in result.stdout


# ----------------------------------------------------------------------------- Grad-CAM


def test_grad_cam_is_the_class_activation_map_for_a_linear_head(world):
    """With global pooling and a linear head, Grad-CAM equals CAM: ReLU(sum_k w_ck A_k), normalised."""
    model = build_from_checkpoint(load_checkpoint(world["ckpt"]))
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([0, 2, 1])
    logits, cams, used = grad_cam(model, x, target)
    with torch.no_grad():
        feats = model.forward_features(x)
        expected = torch.relu(torch.einsum("nk,nkhw->nhw", model.fc.weight[target], feats))
        expected = expected / expected.amax(dim=(1, 2), keepdim=True)
        torch.testing.assert_close(logits, model(x), atol=1e-5, rtol=0)
    assert torch.equal(used, target)
    torch.testing.assert_close(cams, expected, atol=1e-5, rtol=1e-4)
    assert cams.shape == feats.shape[:1] + feats.shape[2:] and float(cams.amax()) == pytest.approx(1.0)
    _, _, predicted = grad_cam(model, x)
    assert torch.equal(predicted, logits.argmax(1))


def test_grad_cam_matches_hooks_on_the_full_backward_pass(world):
    """An independent Grad-CAM: hook the last stage, backpropagate through the whole network."""
    model = build_from_checkpoint(load_checkpoint(world["ckpt"]))
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    _, cams, target = grad_cam(model, x)
    for i in range(2):
        saved = {}
        handle = model.layer4.register_forward_hook(lambda m, inp, out, saved=saved: saved.update(out=out))
        out = model(x[i : i + 1].clone().requires_grad_(True))
        handle.remove()
        (grad,) = torch.autograd.grad(out[0, target[i]], saved["out"])
        cam = torch.relu((grad.mean(dim=(2, 3), keepdim=True) * saved["out"]).sum(1))[0].detach()
        torch.testing.assert_close(cams[i], cam / cam.max(), atol=1e-5, rtol=1e-4)


def test_cam_overlays(world, capsys, tmp_path):
    other = tmp_path / "other" / "cat_0.jpg"  # same file name as one in data/cat
    make_image(other, (200, 60, 60), seed=9, size=(300, 200))
    files = [world["root"] / "cat" / "cat_0.jpg", other]
    out_dir = tmp_path / "cams"
    code, items, err = predict_json(["--checkpoint", world["ckpt"], *files, "--cam", out_dir], capsys)
    assert code == 0, err
    written = sorted(p.name for p in out_dir.iterdir())
    assert written == ["cat_0-2_cam.png", "cat_0_cam.png"]
    assert [Path(i["cam"]).name for i in items] == ["cat_0_cam.png", "cat_0-2_cam.png"]
    with Image.open(out_dir / "cat_0_cam.png") as im:
        assert im.format == "PNG" and min(im.size) == 224  # the 36 px crop, enlarged to be seen
    state = load_checkpoint(world["ckpt"])
    pre = state["preprocess"]
    # torchvision's eval geometry by hand: the short side (200) becomes `resize`, the long side
    # int(resize * 300 / 200); the center crop of `image_size` maps back through the scale factors.
    short, size = pre["resize"], pre["image_size"]
    long = int(short * 300 / 200)
    left, top = round((long - size) / 2), round((short - size) / 2)
    expected = (left * 300 / long, top * 200 / short, (left + size) * 300 / long, (top + size) * 200 / short)
    box = model_view_box(300, 200, pre)
    assert box == pytest.approx(expected, abs=1e-6)
    with Image.open(out_dir / "cat_0-2_cam.png") as im:
        # the square crop the model saw (about 178 px here), enlarged to at least 224 px
        assert min(im.size) == 224 and abs(im.size[0] - im.size[1]) <= 1
        shown = im.convert("RGB")
    view_image = load_rgb(other).crop(tuple(round(v) for v in box))
    overlay = np.asarray(shown.resize(view_image.size), dtype=np.float32)
    view = np.asarray(view_image, dtype=np.float32)
    assert np.abs(overlay - view).mean() > 10  # the heat map is visible
    assert "wrote 2 Grad-CAM overlay(s)" in err
