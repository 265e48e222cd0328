"""semodel cv on tiny generated ImageFolders: grouped and stratified folds, augmented copies that
follow their original, cv.json against the folds' own metrics, the weights choice, resume after an
interruption, and bad input.

Every fold is an se_resnet18 (cifar stem) on 16 px images, one optimizer step per epoch. The main
cross-validation (3 folds, 2 epochs) is run once per module, interrupted twice on the way.
"""

from __future__ import annotations

import csv
import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers_ckpt import assert_one_line_error, make_folder, make_image, run_cli
from helpers_train import (
    load_ckpt,
    one_torch_thread,  # noqa: F401  (autouse fixture: one torch thread)
    tiny_config,
    write_config,
)

import semodel.train
from semodel.config import validate
from semodel.cv import cv_from_cli, find_cv_dir, make_folds, match_copies
from semodel.data import Sample, group_of, scan_dataset
from semodel.evaluate import EvalOptions, EvalSet, evaluate_checkpoint

CLASSES = ["cat", "dog"]
PATIENT = r"^(P\d+)_"
# Images per patient: P01-P08 cats, P09-P16 dogs, P17 two cats and one dog (a cat patient).
PLAN = {"cat": [1, 2, 3, 2, 1, 2, 3, 2], "dog": [2, 1, 2, 3, 1, 2, 2, 1]}
TINTS = {"cat": (200, 60, 60), "dog": (60, 200, 60)}


def make_patients(root: Path) -> dict[str, str]:
    """root/<class>/P<nn>_<i>.jpg; returns path (relative to root) -> patient."""
    patients, seed = {}, 0
    plan = [(c, f"P{i + 1 + 8 * ci:02d}", n) for ci, c in enumerate(CLASSES) for i, n in enumerate(PLAN[c])]
    plan += [("cat", "P17", 2), ("dog", "P17", 1)]
    for cls, patient, n in plan:
        for i in range(n):
            path = f"{cls}/{patient}_{cls}{i}.jpg"
            make_image(root / path, TINTS[cls], seed)
            patients[path] = patient
            seed += 1
    return patients


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class Stop(Exception):
    """Raised from the log to stop a cross-validation at a chosen line (a crash or kill there)."""


def stopping_log(lines: list[str], fold: int | None, prefix: str | None):
    """A log that records lines and raises Stop at the first line starting with ``prefix`` in ``fold``."""
    current = {"fold": 0}

    def log(message: str) -> None:
        lines.append(message)
        m = re.match(r"fold (\d+)/\d+: ", message)
        if m:
            current["fold"] = int(m.group(1))
        if fold is not None and current["fold"] == fold and message.startswith(prefix):
            raise Stop(message)

    return log


def mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def cv(tmp_path_factory):
    """3 folds x 2 epochs, EMA on, best epoch always 1 (so best.pt != last.pt); run A stops in
    fold 2 after epoch 1, run B in fold 3 before its first epoch, run C finishes."""
    base = tmp_path_factory.mktemp("cv")
    root = base / "data"
    patients = make_patients(root)
    raw = tiny_config(
        root,
        base / "runs",
        "cv",
        data={"split": {"val": 0.25, "test": 0.0, "group_by": PATIENT}},
        train={"epochs": 2, "ema": True, "ema_decay": 0.5},
        cv={"folds": 3},
    )
    config = write_config(base / "cv.yaml", raw)
    cv_dir = base / "runs" / "cv"
    runs = {}
    with pytest.MonkeyPatch.context() as mp:
        # The monitored value is the image count: equal every epoch, so epoch 1 stays the best.
        mp.setitem(semodel.train.MONITORS, "val_acc", ("n", True))
        for name, fold, prefix in (("A", 2, "epoch 1/2"), ("B", 3, "model:"), ("C", None, None)):
            lines: list[str] = []
            try:
                cv_from_cli(config, None, [], None, quiet=True, log=stopping_log(lines, fold, prefix))
            except Stop:
                pass
            runs[name] = {"lines": lines, **{f"fold-{f}": mtimes(cv_dir / f"fold-{f}") for f in (1, 2)}}
    return {
        "base": base,
        "root": root,
        "patients": patients,
        "config": config,
        "cv_dir": cv_dir,
        "runs": runs,
    }


def fold_test_images(cv_dir: Path, fold: int) -> list[Sample]:
    index = {c: i for i, c in enumerate(CLASSES)}
    rows = [r for r in read_csv(cv_dir / "folds.csv") if int(r["fold"]) == fold]
    return [Sample(r["path"], index[r["class"]], "test", r["group"]) for r in rows]


# ----------------------------------------------------------------------------- folds


def test_folds_partition_the_patients_and_every_image_is_tested_once(cv):
    cv_dir, patients = cv["cv_dir"], cv["patients"]
    rows = read_csv(cv_dir / "folds.csv")
    assert sorted(r["path"] for r in rows) == sorted(patients)  # every image once
    folds_of_patient = defaultdict(set)
    for r in rows:
        assert r["group"] == patients[r["path"]]
        folds_of_patient[r["group"]].add(int(r["fold"]))
    assert all(len(f) == 1 for f in folds_of_patient.values()), folds_of_patient
    assert {f for fs in folds_of_patient.values() for f in fs} == {1, 2, 3}
    # Stratified: per class, the folds' image counts differ by at most the largest patient (3 images).
    for cls in CLASSES:
        counts = Counter(int(r["fold"]) for r in rows if r["class"] == cls)
        assert sorted(counts) == [1, 2, 3] and max(counts.values()) - min(counts.values()) <= 3, (cls, counts)

    tested = []
    for fold in (1, 2, 3):
        split = read_csv(cv_dir / f"fold-{fold}" / "split.csv")
        in_fold = {r["path"] for r in rows if int(r["fold"]) == fold}
        # The fold's run: its test split is the fold, train + val are the other folds.
        assert {r["path"] for r in split if r["split"] == "test"} == in_fold
        assert {r["path"] for r in split if r["split"] != "test"} == set(patients) - in_fold
        splits_of_patient = defaultdict(set)
        for r in split:
            splits_of_patient[patients[r["path"]]].add(r["split"])
        assert all(len(s) == 1 for s in splits_of_patient.values()), (fold, splits_of_patient)
        assert {r["class"] for r in split if r["split"] == "val"} == set(CLASSES)
        report = json.loads((cv_dir / f"fold-{fold}" / "test_metrics.json").read_text())
        assert report["data"]["evaluated"] == len(in_fold) and report["data"]["root"] == str(cv["root"])
        tested += sorted(in_fold)
    assert sorted(tested) == sorted(patients)


def test_make_folds_is_stratified_and_follows_the_seed():
    rng = np.random.default_rng(0)
    samples = []
    for label in range(3):
        for g in range(12):
            samples += [
                Sample(f"c{label}/g{label}_{g}_{i}.jpg", label, "", f"g{label}_{g}")
                for i in range(int(rng.integers(1, 5)))
            ]
    folds = make_folds(samples, ["a", "b", "c"], 4, seed=0, why="test")
    assert folds == make_folds(samples, ["a", "b", "c"], 4, seed=0, why="test")
    assert folds != make_folds(samples, ["a", "b", "c"], 4, seed=1, why="test")
    for label in range(3):
        counts = Counter(folds[s.group] for s in samples if s.label == label)
        groups = Counter(folds[g] for g in {s.group for s in samples if s.label == label})
        assert sorted(groups) == [1, 2, 3, 4]
        assert max(counts.values()) - min(counts.values()) <= 4, counts  # within the largest group


# ----------------------------------------------------------------------------- runs and results


def test_each_fold_is_a_normal_run_with_its_own_stream_and_checkpoints(cv):
    cv_dir = cv["cv_dir"]
    assert sorted(p.name for p in cv_dir.iterdir()) == [
        "config.yaml",
        "cv.json",
        "fold-1",
        "fold-2",
        "fold-3",
        "folds.csv",
    ]
    for fold in (1, 2, 3):
        fold_dir = cv_dir / f"fold-{fold}"
        names = {p.name for p in fold_dir.iterdir()}
        run_files = {"config.yaml", "split.csv", "best.pt", "last.pt", "metrics.json", "test_metrics.json"}
        assert run_files <= names
        assert any(n.startswith("events.out.tfevents.") for n in names)
        saved = validate(yaml.safe_load((fold_dir / "config.yaml").read_text()), "fold config")
        assert saved.log.name == f"fold-{fold}" and Path(saved.log.out_dir) == cv_dir
        assert load_ckpt(fold_dir / "best.pt")["epoch"] == 1 and load_ckpt(fold_dir / "last.pt")["epoch"] == 2


def test_cv_json_holds_the_fold_metrics_with_mean_and_sample_std(cv):
    cv_dir = cv["cv_dir"]
    summary = json.loads((cv_dir / "cv.json").read_text())
    assert summary["folds"] == 3 and summary["weights"] == "best" and summary["std_ddof"] == 1
    assert [f["fold"] for f in summary["per_fold"]] == [1, 2, 3]
    for f in summary["per_fold"]:
        report = json.loads((cv_dir / f"fold-{f['fold']}" / "test_metrics.json").read_text())
        for key in ("acc", "balanced_acc", "f1_macro", "auc", "n"):
            assert f[key] == report["metrics"][key], key
        assert (f["weights"], f["epoch"], f["ema"]) == ("best", 1, True)
        assert Path(f["checkpoint"]) == cv_dir / f"fold-{f['fold']}" / "best.pt"
    for key in ("acc", "balanced_acc", "f1_macro", "auc"):
        values = np.array([f[key] for f in summary["per_fold"]])
        assert summary["mean"][key] == pytest.approx(values.mean(), abs=1e-12)
        assert summary["std"][key] == pytest.approx(values.std(ddof=1), abs=1e-12)
    assert summary["n"] == len(cv["patients"])
    # The table: a row per fold, then mean +- std, as printed by the last run.
    lines = cv["runs"]["C"]["lines"]
    mean_row = next(line for line in lines if line.startswith("mean +- std"))
    m, s = summary["mean"]["acc"], summary["std"]["acc"]
    assert f"{m:.4f} +- {s:.4f}" in mean_row
    assert any("sample standard deviation" in line for line in lines)


def test_interrupted_cv_resumes_and_skips_finished_folds(cv):
    runs, cv_dir = cv["runs"], cv["cv_dir"]
    a, b, c = runs["A"]["lines"], runs["B"]["lines"], runs["C"]["lines"]
    assert any(line.startswith("fold 1/3 done:") for line in a)
    assert a[-1].startswith("epoch 1/2")  # stopped in fold 2 after its first epoch
    # Fold 1 was never trained again: its files are as run A left them.
    assert runs["A"]["fold-1"] == runs["B"]["fold-1"] == runs["C"]["fold-1"]
    assert "fold 1/3: finished earlier" in "\n".join(b) and "fold 1/3: finished earlier" in "\n".join(c)
    # Fold 2 continued from its last.pt at epoch 2 (run B); best.pt kept epoch 1's weights (the end
    # of training only added the calibration fitted on val to it).
    assert any(line.startswith("fold 2/3: continuing from last.pt") for line in b)
    assert any(line.startswith(f"resuming {cv_dir / 'fold-2'} at epoch 2") for line in b)
    best = torch.load(cv_dir / "fold-2" / "best.pt", weights_only=True)
    assert best["epoch"] == 1 and best["calibration"]["fitted_on"] == "val"
    assert runs["A"]["fold-2"]["last.pt"] != runs["C"]["fold-2"]["last.pt"]
    assert "fold 2/3: finished earlier" in "\n".join(c)
    # Fold 3 stopped before its first epoch (run B): run C started it again from scratch.
    assert any(line.startswith("fold 3/3: training:") for line in c)
    assert not any("resuming" in line for line in c)
    done = [line for line in c if line.startswith("fold ") and " done: " in line]
    assert len(done) == 1 and done[0].startswith("fold 3/3 done:")

    # A fold whose test was lost is tested again, not retrained.
    fold3 = cv_dir / "fold-3"
    before, report = mtimes(fold3), (fold3 / "test_metrics.json").read_text()
    (fold3 / "test_metrics.json").unlink()
    lines: list[str] = []
    cv_from_cli(cv["config"], None, [], None, quiet=True, log=lines.append)
    assert "fold 3/3: trained earlier; testing it" in lines
    after = mtimes(fold3)
    tested = ("test_metrics.json", "test_predictions.csv")  # what testing writes; no checkpoint changes
    assert {k: v for k, v in after.items() if k not in tested} == {
        k: v for k, v in before.items() if k not in tested
    }
    assert (fold3 / "test_metrics.json").read_text() == report


@pytest.mark.parametrize(
    "choice, file, ema", [("last", "last.pt", False), ("ema", "last.pt", True), ("best", "best.pt", True)]
)
def test_the_weights_choice_picks_the_checkpoint_and_needs_no_retraining(cv, choice, file, ema):
    cv_dir = cv["cv_dir"]

    def checkpoints(fold: int) -> dict[str, int]:
        return {n: t for n, t in mtimes(cv_dir / f"fold-{fold}").items() if n.endswith(".pt")}

    before = {f: checkpoints(f) for f in (1, 2, 3)}
    lines: list[str] = []
    summary = cv_from_cli(None, None, [f"cv.weights={choice}"], cv_dir, quiet=True, log=lines.append)
    assert summary["weights"] == choice
    assert not any(line.startswith("epoch ") for line in lines)  # nothing trained
    for f in summary["per_fold"]:
        fold_dir = cv_dir / f"fold-{f['fold']}"
        assert Path(f["checkpoint"]) == fold_dir / file and f["ema"] is ema
        assert f["epoch"] == (1 if file == "best.pt" else 2)
        images = EvalSet(cv["root"], fold_test_images(cv_dir, f["fold"]), "test", "t")
        options = EvalOptions(device="cpu", use_ema=ema, workers=0)
        direct = evaluate_checkpoint(fold_dir / file, options=options, log=lambda _: None, images=images)
        assert f["acc"] == direct.report["metrics"]["acc"] and f["auc"] == direct.report["metrics"]["auc"]
        stored = json.loads((fold_dir / "test_metrics.json").read_text())
        assert stored["choice"] == choice and stored["metrics"]["loss"] == direct.report["metrics"]["loss"]
        assert checkpoints(f["fold"]) == before[f["fold"]]
    # The stored config says which weights cv.json holds (the test leaves "best", as it found it).
    assert f"weights: {choice}" in (cv_dir / "config.yaml").read_text()


def test_best_and_last_weights_differ_here(cv):
    """The premise of the test above: best.pt and last.pt hold different weights and predictions."""
    fold_dir, images = cv["cv_dir"] / "fold-1", fold_test_images(cv["cv_dir"], 1)
    losses = [
        evaluate_checkpoint(
            fold_dir / name,
            options=EvalOptions(device="cpu", workers=0),
            log=lambda _: None,
            images=EvalSet(cv["root"], images, "test", "t"),
        ).report["metrics"]["loss"]
        for name in ("best.pt", "last.pt")
    ]
    assert losses[0] != losses[1]


def test_the_same_command_continues_and_another_config_gets_a_new_folder(cv):
    cfg = validate(
        tiny_config(
            cv["root"],
            cv["base"] / "runs",
            "cv",
            data={"split": {"val": 0.25, "test": 0.0, "group_by": PATIENT}},
            train={"epochs": 2, "ema": True, "ema_decay": 0.5},
            cv={"folds": 3},
        ),
        "t",
    )
    lines: list[str] = []
    assert find_cv_dir(cfg, None, lines.append) == cv["cv_dir"] and not lines
    raw = cfg.to_dict()
    raw["cv"]["weights"], raw["train"]["device"] = "last", "cpu"  # how to test, not what: the same cv
    assert find_cv_dir(validate(raw, "t"), None, lines.append) == cv["cv_dir"]
    raw["train"]["epochs"] = 3
    assert find_cv_dir(validate(raw, "t"), None, lines.append) == cv["base"] / "runs" / "cv-2"
    assert "differs in train.epochs" in lines[-1]


def test_resume_refuses_changes_to_what_was_trained(cv, capsys):
    cv_dir = cv["cv_dir"]
    before = {p: p.stat().st_mtime_ns for p in cv_dir.rglob("*")}
    code, _, err = run_cli(["cv", "--resume", cv_dir, "--folds", "2"], capsys)
    assert_one_line_error(code, err, "was split into 3 folds", cv_dir)
    code, _, err = run_cli(["cv", "--resume", cv_dir, "--set", "train.epochs=5"], capsys)
    assert_one_line_error(code, err, "data.num_workers may change (not train.epochs)")
    code, _, err = run_cli(["cv", "--resume", cv_dir / "fold-2"], capsys)
    assert_one_line_error(code, err, "that is one fold; continue the cross-validation with --resume")
    assert {p: p.stat().st_mtime_ns for p in cv_dir.rglob("*")} == before


# ----------------------------------------------------------------------------- augmented copies


def test_augmented_copies_follow_their_original(tmp_path, capsys):
    """Originals in data.root, 2 copies each in cv.augmented (<stem>_00, <stem>_01); no group_by,
    so each original and its copies are one group, matched by name."""
    originals, augmented = tmp_path / "original", tmp_path / "augmented"
    make_folder(originals, CLASSES, per_class=8)
    for n, path in enumerate(sorted(originals.rglob("*.jpg"))):
        for i in range(2):
            copy = augmented / path.parent.name / f"{path.stem}_{i:02d}.jpg"
            make_image(copy, TINTS[path.parent.name], 1000 + 2 * n + i)
    raw = tiny_config(
        originals,
        tmp_path / "runs",
        "aug",
        data={"split": {"val": 0.25, "test": 0.0}},
        cv={"folds": 2, "augmented": str(augmented)},
        log={"tensorboard": False},
    )
    config = write_config(tmp_path / "aug.yaml", raw)
    code, out, err = run_cli(["cv", "--config", config, "--quiet"], capsys)
    assert code == 0, err
    assert "data.split.group_by is not set, so each image of data.root (with its augmented copies)" in out
    assert "augmented: 32 copies" in out

    cv_dir = tmp_path / "runs" / "aug"
    folds = {r["path"]: int(r["fold"]) for r in read_csv(cv_dir / "folds.csv")}
    assert sorted(folds) == sorted(p.relative_to(originals).as_posix() for p in originals.rglob("*.jpg"))
    for fold in (1, 2):
        split = read_csv(cv_dir / f"fold-{fold}" / "split.csv")
        # The run trains and validates on copies only, in their original's split; no copy of the test fold.
        assert {r["split"] for r in split} == {"train", "val"}
        assert len(split) == 2 * sum(1 for f in folds.values() if f != fold)
        split_of_original = defaultdict(set)
        for r in split:
            original = re.sub(r"_\d\d\.jpg$", ".jpg", r["path"])
            assert folds[original] != fold and (augmented / r["path"]).is_file()
            assert r["group"] == original
            split_of_original[original].add(r["split"])
        assert all(len(s) == 1 for s in split_of_original.values())
        report = json.loads((cv_dir / f"fold-{fold}" / "test_metrics.json").read_text())
        assert report["data"]["root"] == str(originals)
        assert report["data"]["evaluated"] == sum(1 for f in folds.values() if f == fold)
        assert load_ckpt(cv_dir / f"fold-{fold}" / "best.pt")["config"]["data"]["root"] == str(augmented)


def test_copies_match_the_longest_original_name(tmp_path):
    root, copies = tmp_path / "o", tmp_path / "a"
    for name in ("x_1", "x_10", "x_1_2"):
        make_image(root / "cat" / f"{name}.jpg", TINTS["cat"], 0)
    make_image(root / "dog" / "x_1.jpg", TINTS["dog"], 0)
    for name in ("x_1_00", "x_10_00", "x_1_2_00", "x_1"):
        make_image(copies / "cat" / f"{name}.png", TINTS["cat"], 1)
    make_image(copies / "dog" / "x_1_07.jpg", TINTS["dog"], 1)
    data = scan_dataset(root, check=False)
    for s in data.samples:
        s.group = group_of(s.path, None)
    out = match_copies(data.samples, scan_dataset(copies, check=False), data.classes, root)
    assert {k: sorted(c.path for c in v) for k, v in out.items()} == {
        "cat/x_1.jpg": ["cat/x_1.png", "cat/x_1_00.png"],
        "cat/x_10.jpg": ["cat/x_10_00.png"],
        "cat/x_1_2.jpg": ["cat/x_1_2_00.png"],
        "dog/x_1.jpg": ["dog/x_1_07.jpg"],
    }


MSLD = Path(__file__).resolve().parents[2] / "shared" / "data" / "msld"


@pytest.mark.skipif(not (MSLD / "original").is_dir(), reason=f"MSLD data not found at {MSLD}")
def test_msld_folds_keep_patients_and_their_copies_together():
    from semodel.cv import fold_samples, load_folds

    data = {"root": str(MSLD / "original"), "split": {"val": 0.2, "group_by": r"^(N?M\d+)_"}}
    cfg = validate({"data": data, "cv": {"folds": 3, "augmented": str(MSLD / "augmented")}}, "t")
    root, classes, assigned, existing = load_folds(cfg, Path("/nonexistent"), lambda _: None)
    assert not existing and len(assigned) == 228
    augmented = scan_dataset(MSLD / "augmented", check=False)
    copies = match_copies([s for _, s in assigned], augmented, classes, root)
    assert sorted(len(c) for c in copies.values()) == [14] * 228
    fold_of_patient = defaultdict(set)
    for fold, s in assigned:
        fold_of_patient[re.match(r"^(N?M\d+)_", Path(s.path).name).group(1)].add(fold)
    assert len(fold_of_patient) == 162 and all(len(f) == 1 for f in fold_of_patient.values())
    for fold in (1, 2, 3):
        run, test = fold_samples(fold, assigned, copies, cfg, classes)
        test_patients = {s.group for s in test}
        assert not test_patients & {s.group for s in run}  # no copy of a test patient in train or val
        assert not {s.group for s in run if s.split == "train"} & {s.group for s in run if s.split == "val"}
        share = sum(1 for s in test if classes[s.label] == "Monkeypox") / len(test)
        assert abs(share - 102 / 228) < 0.05, (fold, share)


# ----------------------------------------------------------------------------- bad input


def _bad_case(tmp_path: Path, case: str) -> tuple[list[str], str]:
    root = tmp_path / "data"
    make_patients(root)
    changes: dict = {"data": {"split": {"group_by": PATIENT}}}
    args: list[str] = []
    fragment = {
        "one fold": "--folds 1: cross-validation needs at least 2 folds",
        "more folds than patients": "class 'dog' has 8 group(s) (groups by data.split.group_by",
        "ema weights without ema": "cv.weights = 'ema' needs train.ema: true",
        "presplit data": "has train/ and val/ folders (a fixed split)",
        "copy without original": "have no original in",
        "missing augmented folder": "cv.augmented folder not found",
        "neither config nor resume": "give --config FILE",
        "not a cv folder": "not a cross-validation folder",
        "unknown cv key": "unknown key 'cv.fold'; did you mean 'cv.folds'?",
    }[case]
    if case == "one fold":
        args = ["--folds", "1"]
    elif case == "more folds than patients":
        args = ["--folds", "9"]
    elif case == "ema weights without ema":
        changes["cv"] = {"weights": "ema"}
    elif case == "presplit data":
        make_folder(tmp_path / "split" / "train", CLASSES, per_class=2)
        make_folder(tmp_path / "split" / "val", CLASSES, per_class=2)
        changes["data"]["root"] = str(tmp_path / "split")
    elif case == "copy without original":
        make_image(tmp_path / "aug" / "cat" / "P01_cat0_00.jpg", TINTS["cat"], 0)
        make_image(tmp_path / "aug" / "cat" / "P99_cat0_00.jpg", TINTS["cat"], 1)
        make_image(tmp_path / "aug" / "dog" / "P09_dog0_00.jpg", TINTS["dog"], 2)
        changes["cv"] = {"augmented": str(tmp_path / "aug")}
    elif case == "missing augmented folder":
        changes["cv"] = {"augmented": str(tmp_path / "nope")}
    elif case == "unknown cv key":
        changes["cv"] = {"fold": 3}
    config = write_config(tmp_path / "bad.yaml", tiny_config(root, tmp_path / "runs", "bad", **changes))
    if case == "neither config nor resume":
        return ["cv"], fragment
    if case == "not a cv folder":
        return ["cv", "--resume", root], fragment
    return ["cv", "--config", config, *args], fragment


@pytest.mark.parametrize(
    "case",
    [
        "one fold",
        "more folds than patients",
        "ema weights without ema",
        "presplit data",
        "copy without original",
        "missing augmented folder",
        "neither config nor resume",
        "not a cv folder",
        "unknown cv key",
    ],
)
def test_bad_input_is_one_error_line_and_writes_nothing(tmp_path, capsys, case):
    args, fragment = _bad_case(tmp_path, case)
    code, _, err = run_cli(args, capsys)
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "runs").exists()
