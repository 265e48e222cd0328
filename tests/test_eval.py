"""semodel eval: figures checked against an independent computation, data selection, bad input."""

from __future__ import annotations

import csv
import json
import shutil
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
    run_cli,
    run_subprocess,
    write_split,
)
from PIL import Image

from semodel.checkpoint import build_from_checkpoint, load_checkpoint
from semodel.evaluate import EvalOptions, evaluate_checkpoint
from semodel.metrics import classification_metrics

# Per class: images 0 and 1 are test, 2 is val, 3 is train.
SPLITS = {f"{c}_{i}.jpg": s for c in CLASSES for i, s in enumerate(["test", "test", "val", "train"])}
# What the model predicts for each test image (fitted that way): cat_1 -> dog, fox_0 -> cat.
DESIGN = {"cat_0": "cat", "cat_1": "dog", "dog_0": "dog", "dog_1": "dog", "fox_0": "cat", "fox_1": "fox"}
# ... and what the EMA weights predict: every test image -> its true class except dog_1 -> fox.
EMA_DESIGN = {"cat_0": "cat", "cat_1": "cat", "dog_0": "dog", "dog_1": "fox", "fox_0": "fox", "fox_1": "fox"}
EXPECTED_CM = [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
EXPECTED_EMA_CM = [[2, 0, 0], [0, 1, 1], [0, 0, 2]]


def design_of(root: Path, design: dict[str, str]) -> dict[Path, int]:
    """Fit targets: the designed class for test images, the true class for the others."""
    targets = {}
    for path in sorted(root.rglob("*.jpg")):
        targets[path] = CLASSES.index(design.get(path.stem, path.parent.name))
    return targets


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder as training leaves it: data root, split.csv, best.pt (with EMA weights)."""
    base = tmp_path_factory.mktemp("eval")
    root = make_folder(base / "data")
    run_dir = base / "runs" / "r"
    write_split(run_dir, root, SPLITS)
    ckpt = run_dir / "best.pt"
    make_checkpoint(ckpt, root, fit=design_of(root, DESIGN), ema_fit=design_of(root, EMA_DESIGN))
    return {"base": base, "root": root, "run_dir": run_dir, "ckpt": ckpt}


def independent_predictions(ckpt: Path, root: Path, split_csv: Path, split: str, use_ema: bool = False):
    """Run the model by hand, image by image (csv module, PIL, torchvision v1 functional ops)."""
    import torchvision.transforms.functional as TF

    state = torch.load(ckpt, weights_only=True)
    model = build_from_checkpoint(state, use_ema=use_ema)
    pre = state["preprocess"]
    truth, predicted, probs = [], [], []
    with open(split_csv, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == split]
    for row in rows:
        image = Image.open(root / row["path"]).convert("RGB")
        x = TF.resize(TF.pil_to_tensor(image), [pre["resize"]], antialias=True)
        x = TF.center_crop(x, [pre["image_size"]]).float() / 255
        x = TF.normalize(x, pre["mean"], pre["std"])
        with torch.no_grad():
            p = model(x[None]).softmax(1)[0]
        truth.append(state["classes"].index(row["class"]))
        predicted.append(int(p.argmax()))
        probs.append(p)
    return truth, predicted, torch.stack(probs)


def confusion(truth: list[int], predicted: list[int], n: int) -> list[list[int]]:
    cm = [[0] * n for _ in range(n)]
    for t, p in zip(truth, predicted, strict=True):
        cm[t][p] += 1
    return cm


def auc_by_ranks(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC-AUC as the Mann-Whitney probability that a positive outscores a negative (ties count 1/2)."""
    pos, neg = scores[positive], scores[~positive]
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def test_eval_matches_an_independent_computation(run, capsys, tmp_path):
    out = tmp_path / "m.json"
    code, stdout, err = run_cli(["eval", run["ckpt"], "--output", out], capsys)
    assert code == 0, err
    report = json.loads(out.read_text())
    m = report["metrics"]

    truth, predicted, probs = independent_predictions(
        run["ckpt"], run["root"], run["run_dir"] / "split.csv", "test"
    )
    cm = confusion(truth, predicted, 3)
    assert cm == EXPECTED_CM  # the model does what it was fitted to do
    assert m["confusion_matrix"] == cm
    assert m["n"] == len(truth) == 6
    assert m["acc"] == pytest.approx(sum(t == p for t, p in zip(truth, predicted, strict=True)) / len(truth))
    assert m["acc"] == pytest.approx(4 / 6)
    recalls = [cm[i][i] / sum(cm[i]) for i in range(3)]
    precisions = [cm[i][i] / sum(row[i] for row in cm) for i in range(3)]
    assert m["balanced_acc"] == pytest.approx(np.mean(recalls))
    for i, name in enumerate(CLASSES):
        pc = m["per_class"][name]
        f1 = 2 * precisions[i] * recalls[i] / (precisions[i] + recalls[i])
        assert (pc["precision"], pc["recall"], pc["f1"], pc["support"]) == pytest.approx(
            (precisions[i], recalls[i], f1, 2)
        )
    assert m["precision_macro"] == pytest.approx(np.mean(precisions))
    assert m["recall_weighted"] == pytest.approx(m["acc"])  # weighted recall is accuracy
    y = np.array(truth)
    p = probs.numpy()
    expected_auc = np.mean([auc_by_ranks(p[:, c], y == c) for c in range(3)])
    assert m["auc"] == pytest.approx(expected_auc, abs=1e-6)
    top2 = np.mean([t in np.argsort(-row)[:2] for t, row in zip(truth, p, strict=True)])
    assert m["top2_acc"] == pytest.approx(top2)
    assert "top3_acc" not in m  # k < number of classes only
    assert report["data"]["split"] == "test" and report["weights"] == "model"

    # The printed report carries the same figures, with class names on the confusion matrix.
    assert f"accuracy                      {m['acc']:.4f}" in stdout
    assert "test split of" in stdout
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("true \\ predicted"))
    assert lines[header].split()[-3:] == CLASSES
    for i, name in enumerate(CLASSES):
        assert lines[header + 1 + i].split() == [name, *map(str, EXPECTED_CM[i])]
    assert any(line.split()[:2] == ["macro", "avg"] for line in lines)
    assert any(line.split()[:2] == ["weighted", "avg"] for line in lines)
    # This hand-made checkpoint has EMA weights but no train.ema: the run selected the raw weights.
    assert "weights     model" in stdout and "wrote" in err


def test_ema_weights(run, capsys, tmp_path):
    out = tmp_path / "m.json"
    code, _, err = run_cli(["eval", run["ckpt"], "--ema", "-o", out], capsys)
    assert code == 0, err
    report = json.loads(out.read_text())
    assert report["weights"] == "ema"
    assert report["metrics"]["confusion_matrix"] == EXPECTED_EMA_CM
    truth, predicted, _ = independent_predictions(
        run["ckpt"], run["root"], run["run_dir"] / "split.csv", "test", use_ema=True
    )
    assert confusion(truth, predicted, 3) == EXPECTED_EMA_CM


def test_ema_flag_without_ema_weights(run, capsys, tmp_path):
    ckpt = tmp_path / "run" / "best.pt"
    make_checkpoint(ckpt, run["root"])
    code, _, err = run_cli(["eval", ckpt, "--ema", "--data", run["root"]], capsys)
    assert_one_line_error(code, err, "has no EMA weights", ckpt)


def test_tta_averages_the_flipped_prediction(run):
    result = evaluate_checkpoint(run["ckpt"], options=EvalOptions(tta=True, device="cpu"))
    state = load_checkpoint(run["ckpt"])
    model = build_from_checkpoint(state)
    from semodel.data import eval_transform, load_rgb

    transform = eval_transform(state["preprocess"])
    names = [f"{c}/{c}_{i}.jpg" for c in CLASSES for i in (0, 1)]  # split.csv order of the test rows
    x = torch.stack([transform(load_rgb(run["root"] / n)) for n in names])
    with torch.no_grad():
        expected = ((model(x) + model(x.flip(3))) / 2).softmax(1)
        plain = model(x).softmax(1)
    assert result.report["tta"] == "hflip"
    torch.testing.assert_close(result.probs, expected, atol=1e-5, rtol=0)
    assert (result.probs - plain).abs().max() > 1e-3  # the flip changed something


def test_val_split_when_the_run_has_no_test_split(run, capsys, tmp_path):
    run_dir = tmp_path / "runs" / "noval"
    write_split(run_dir, run["root"], {k: v for k, v in SPLITS.items() if v != "test"})
    shutil.copy(run["ckpt"], run_dir / "best.pt")
    out = tmp_path / "m.json"
    code, stdout, err = run_cli(["eval", run_dir / "best.pt", "-o", out], capsys)
    assert code == 0, err
    report = json.loads(out.read_text())
    assert report["data"]["split"] == "val"
    assert report["metrics"]["n"] == 3  # one val image per class
    assert "val split of" in stdout


def test_data_folder_and_its_test_split(run, capsys, tmp_path):
    plain = make_folder(tmp_path / "plain", per_class=2, seed=7)
    out = tmp_path / "plain.json"
    code, _, err = run_cli(["eval", run["ckpt"], "--data", plain, "-o", out], capsys)
    assert code == 0, err
    report = json.loads(out.read_text())
    assert report["data"]["split"] == "all" and report["metrics"]["n"] == 6
    assert [pc["support"] for pc in report["metrics"]["per_class"].values()] == [2, 2, 2]

    presplit = tmp_path / "presplit"
    make_folder(presplit / "train", per_class=1, seed=1)
    make_folder(presplit / "val", per_class=1, seed=2)
    make_folder(presplit / "test", per_class=3, seed=3)
    code, _, err = run_cli(["eval", run["ckpt"], "--data", presplit, "-o", out], capsys)
    assert code == 0, err
    report = json.loads(out.read_text())
    assert report["data"]["split"] == "test" and report["metrics"]["n"] == 9


def test_data_folder_with_other_classes(run, capsys, tmp_path):
    other = make_folder(tmp_path / "other", classes=["bee", "cat", "dog"], per_class=1)
    code, _, err = run_cli(["eval", run["ckpt"], "--data", other], capsys)
    assert_one_line_error(code, err, "do not match the checkpoint's classes", other)
    assert "checkpoint has [cat, dog, fox]" in err
    assert "folder has [bee, cat, dog]" in err
    assert "missing: fox" in err and "not in checkpoint: bee" in err


def test_missing_split_file_or_data_root_asks_for_data(run, capsys, tmp_path):
    lonely = tmp_path / "lonely" / "best.pt"
    lonely.parent.mkdir()
    shutil.copy(run["ckpt"], lonely)
    code, _, err = run_cli(["eval", lonely], capsys)
    assert_one_line_error(code, err, "split.csv not found", lonely.parent / "split.csv")
    assert "pass --data DIR" in err

    gone = tmp_path / "gone"
    run_dir = tmp_path / "runs" / "gone"
    write_split(run_dir, run["root"], SPLITS)
    make_checkpoint(run_dir / "best.pt", gone)
    code, _, err = run_cli(["eval", run_dir / "best.pt"], capsys)
    assert_one_line_error(code, err, "is not found", gone)
    assert "pass --data DIR" in err


def test_relative_data_root_found_from_the_training_folder(run, capsys, tmp_path, monkeypatch):
    project = tmp_path / "project"
    shutil.copytree(run["root"], project / "data")
    run_dir = project / "runs" / "r"
    write_split(run_dir, project / "data", SPLITS)
    make_checkpoint(run_dir / "best.pt", "data", run_dir="runs/r")
    monkeypatch.chdir(tmp_path)  # not the training folder: "data" is not here
    out = tmp_path / "m.json"
    code, _, err = run_cli(["eval", "project/runs/r/best.pt", "-o", out], capsys)
    assert code == 0, err
    assert Path(json.loads(out.read_text())["data"]["root"]).resolve() == (project / "data").resolve()


def test_plots(run, capsys, tmp_path):
    code, _, err = run_cli(["eval", run["ckpt"], "--plot", tmp_path / "plots"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "confusion_matrix.png",
        "reliability.png",
        "roc.png",
    ]
    with Image.open(tmp_path / "plots" / "confusion_matrix.png") as im:
        assert im.format == "PNG" and min(im.size) > 100

    binary_root = make_folder(tmp_path / "binary", classes=["cat", "dog"], per_class=3)
    ckpt = tmp_path / "binary_run" / "best.pt"
    make_checkpoint(ckpt, binary_root, classes=["cat", "dog"])
    code, stdout, err = run_cli(["eval", ckpt, "--data", binary_root, "--plot", tmp_path / "bplots"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "bplots").iterdir()) == [
        "confusion_matrix.png",
        "reliability.png",
        "roc.png",
    ]
    assert "top-" not in stdout  # no top-k line for k >= number of classes
    assert "ROC-AUC  " in stdout


@pytest.mark.parametrize("kind", sorted(BAD_CHECKPOINT_MESSAGES))
def test_bad_checkpoints(run, capsys, tmp_path, kind):
    path = bad_checkpoints(tmp_path, run["ckpt"])[kind]
    code, _, err = run_cli(["eval", path, "--data", run["root"]], capsys)
    assert_one_line_error(code, err, BAD_CHECKPOINT_MESSAGES[kind], path)


def test_bad_input_end_to_end(run, tmp_path):
    """The real command: exit code 2, one line on stderr, no traceback."""
    path = bad_checkpoints(tmp_path, run["ckpt"])["code"]
    result = run_subprocess(["eval", path])
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith(
        f"error: {path}: refused to load"
    )
    assert result.stdout == ""


def test_metrics_keep_the_training_keys():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.5, 0.4, 0.1]])
    targets = torch.tensor([0, 1, 2, 1])
    m = classification_metrics(probs, targets, CLASSES)
    assert m["acc"] == pytest.approx(0.75)
    assert m["confusion_matrix"] == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    assert m["balanced_acc"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert m["f1_macro"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    assert m["precision_macro"] == pytest.approx((0.5 + 1 + 1) / 3)
    assert m["precision_weighted"] == pytest.approx((0.5 * 1 + 1 * 2 + 1 * 1) / 4)
