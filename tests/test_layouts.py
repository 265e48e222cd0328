"""The layouts a data folder may have and the scanner's rules (docs/training.md "Folder layouts").

- ``train/ test/``, ``train/ val|valid|validation/ [test/]`` in any case are pre-split: their
  classes are the folders inside; a missing validation folder is carved from train/ by the split's
  rules; a split folder is never a class, and a root mixing split and class folders is an error.
- Run folders (and ``log.out_dir``) inside the data are never data; ``__MACOSX/`` is hidden.
- Every real file is listed once, under the class whose folder holds it; a class folder linked to
  another is an error; broken links, loose images and extra folders are listed with a reason.
- Class names that differ only in case, spaces or Unicode normalization are refused.
- ``data.split.group_by`` matching no file is an error, matching some a warning; training far above
  the images' size is a warning.
"""

from __future__ import annotations

import json
import os
import unicodedata
from pathlib import Path

import pytest
from helpers_ckpt import assert_one_line_error, make_image, run_cli
from helpers_train import (
    one_torch_thread,  # noqa: F401  (autouse fixture: one torch thread)
    read_split,
    tiny_config,
    write_config,
)

from semodel.config import validate
from semodel.data import has_presplit, prepare_dataset, scan_dataset
from semodel.errors import SemodelError


def images(folder: Path, n: int, seed: int = 0, prefix: str = "img", size=(24, 24)) -> list[Path]:
    return [
        make_image(folder / f"{prefix}_{i}.jpg", (40 * (seed % 6), 90, 160), seed * 100 + i, size)
        for i in range(n)
    ]


def presplit(root: Path, folders: dict[str, int], classes=("cat", "dog")) -> Path:
    """``root/<split folder>/<class>/`` with the given number of images per class."""
    for k, (folder, n) in enumerate(folders.items()):
        for c, name in enumerate(classes):
            images(root / folder / name, n, seed=10 * k + c, prefix=f"{folder}_{name}")
    return root


def prepared(root: Path, tmp_path: Path, **split) -> tuple[object, list[str]]:
    cfg = validate(
        {
            "data": {"root": str(root), "split": {"val": 0.25, "test": 0.0, "seed": 0, **split}},
            "log": {"out_dir": str(tmp_path / "runs")},
        },
        "t",
    )
    lines: list[str] = []
    return prepare_dataset(cfg, log=lines.append), lines


# ----------------------------------------------------------------------------- layouts


@pytest.mark.parametrize(
    "train, val, test",
    [
        ("train", None, "test"),
        ("Train", None, "TEST"),
        ("train", "valid", "test"),
        ("TRAIN", "Validation", None),
        ("train", "val", None),
        ("train", "VAL", "Test"),
    ],
)
def test_split_folders_in_any_case_are_a_presplit_layout(tmp_path, train, val, test):
    folders = {train: 8} | ({val: 3} if val else {}) | ({test: 3} if test else {})
    root = presplit(tmp_path / "photos", folders)
    data = scan_dataset(root)
    assert data.classes == ["cat", "dog"]  # never the split folders
    expected = {"train": train} | ({"val": val} if val else {}) | ({"test": test} if test else {})
    assert data.split_folders == expected
    assert has_presplit(root)
    data, lines = prepared(root, tmp_path)
    counts = {split: len(data.split(split)) for split in ("train", "val", "test")}
    assert counts["test"] == (6 if test else 0)
    if val:
        assert counts == {"train": 16, "val": 6, "test": counts["test"]}
        assert not any("no validation folder" in line for line in lines)
        assert all(s.path.startswith(f"{val}/") for s in data.split("val"))
    else:  # carved from train/: stratified, a quarter of each class
        assert counts["val"] == 4 and counts["train"] == 12
        assert all(s.path.startswith(f"{train}/") for s in data.split("val"))
        assert sorted(s.label for s in data.split("val")) == [0, 0, 1, 1]
        note = next(line for line in lines if "no validation folder" in line)
        assert f"4 of the 16 images of {train}/ held out for validation" in note and "seed 0" in note


def test_the_carved_validation_split_keeps_groups_together(tmp_path):
    root = tmp_path / "photos"
    for name, seed in (("cat", 1), ("dog", 2)):
        for patient in range(4):
            for k in range(3):
                make_image(
                    root / "train" / name / f"P{name}{patient}_{k}.jpg",
                    (90, 90, 90),
                    seed * 100 + patient * 10 + k,
                )
        images(root / "test" / name, 2, seed=seed + 5)
    data, lines = prepared(root, tmp_path, group_by=r"^(P\w+?)_")
    val = data.split("val")
    assert val and all(s.path.startswith("train/") for s in val)
    patients = {Path(s.path).name.split("_")[0] for s in val}
    # every image of a validation patient is in val: no patient on both sides
    assert all(Path(s.path).name.split("_")[0] not in patients for s in data.split("train"))
    assert any("grouped by data.split.group_by" in line for line in lines)


def test_config_init_shows_the_classes_of_a_train_test_folder(tmp_path, capsys):
    root = presplit(tmp_path / "photos", {"train": 4, "test": 2})
    code, out, err = run_cli(["config", "init", "--data", root], capsys)
    assert code == 0, err
    assert "2 classes" in out and "cat" in out and "dog" in out
    assert "split into train/ test/" in out
    assert "classes: test, train" not in out


@pytest.mark.parametrize(
    "folders, fragment",
    [
        (["train", "val", "valid"], "val/ and valid/ both hold the val split"),
        (["train", "Test", "test"], "both hold the test split"),
        (["val", "test"], "no train/ folder"),
    ],
)
def test_ambiguous_split_folders_are_refused(tmp_path, folders, fragment):
    root = presplit(tmp_path / "photos", dict.fromkeys(folders, 2))
    with pytest.raises(SemodelError, match=fragment.replace("/", "/")):
        scan_dataset(root)


@pytest.mark.parametrize("split_name", ["train", "Valid", "test"])
def test_a_root_mixing_split_and_class_folders_is_one_line_naming_both(tmp_path, capsys, split_name):
    root = tmp_path / "photos"
    images(root / "cat", 3)
    images(root / "dog", 3, seed=1)
    images(root / split_name / "cat", 3, seed=2)
    if split_name.lower() != "train":
        images(root / "train" / "cat", 3, seed=3)
    raw = tiny_config(root, tmp_path / "runs", "mix")
    code, _, err = run_cli(["train", "--config", write_config(tmp_path / "mix.yaml", raw)], capsys)
    assert_one_line_error(code, err, "mixes split folders")
    assert f"{split_name}/" in err and "cat/" in err and "dog/" in err
    assert not (tmp_path / "runs").exists()


def test_extra_folders_and_loose_images_are_listed_as_skipped(tmp_path):
    root = presplit(tmp_path / "photos", {"train": 4, "test": 2})
    (root / "annotations").mkdir()
    (root / "annotations" / "labels.csv").write_text("a,b\n")
    images(root, 1, prefix="stray")  # an image at the root
    images(root / "train", 1, prefix="loose")  # an image in train/, outside any class folder
    data = scan_dataset(root)
    skipped = dict(data.bad_files)
    assert "not a split folder" in skipped["annotations"]
    assert "at the data root" in skipped["stray_0.jpg"]
    assert "in train/, outside any class folder" in skipped["train/loose_0.jpg"]
    assert all(not s.path.startswith(("annotations", "stray", "train/loose")) for s in data.samples)
    # The same at the root of class folders
    flat = tmp_path / "flat"
    images(flat / "cat", 2)
    images(flat / "dog", 2, seed=1)
    images(flat, 1, prefix="stray")
    assert "at the data root" in dict(scan_dataset(flat).bad_files)["stray_0.jpg"]


def test_macosx_folders_are_skipped_like_hidden_ones(tmp_path):
    root = tmp_path / "photos"
    for name in ("cat", "dog"):
        images(root / name, 2, seed=len(name))
        images(root / "__MACOSX" / name, 2, prefix="._x")  # what a zip made on a Mac holds
        images(root / name / "__MACOSX", 1, prefix="copy")
    data = scan_dataset(root)
    assert data.classes == ["cat", "dog"]
    assert len(data.samples) == 4 and not any("__MACOSX" in s.path for s in data.samples)
    assert not any("__MACOSX" in path for path, _ in data.bad_files)


# ----------------------------------------------------------------------------- runs inside the data


def test_training_twice_inside_the_data_folder_does_not_learn_the_runs(tmp_path, capsys, monkeypatch):
    root = tmp_path / "photos"
    images(root / "a", 6)
    images(root / "b", 6, seed=1)
    monkeypatch.chdir(root)
    args = ["train", "--data", ".", "--image-size", "32", "--epochs", "1", "--set", "log.report=false"]
    for _ in range(2):
        code, out, err = run_cli(args, capsys)
        assert code == 0, err
        assert "classes: a, b " in out, out
    runs = sorted(p.name for p in (root / "runs").iterdir())
    assert len(runs) == 2
    second = read_split(root / "runs" / runs[1])
    assert {row["class"] for row in second} == {"a", "b"}
    assert not any(row["path"].startswith("runs/") for row in second)
    assert "log.out_dir" in out and "runs" in out  # the second start says why runs/ is skipped


def test_a_run_folder_copied_into_a_class_folder_is_not_data(tmp_path):
    root = tmp_path / "photos"
    images(root / "a", 3)
    images(root / "b", 3, seed=1)
    old = root / "a" / "old-run"
    (old / "config.yaml").parent.mkdir(parents=True)
    (old / "config.yaml").write_text("data: {root: x}\n")
    (old / "metrics.json").write_text("{}")
    images(old, 2, prefix="curves")  # its figures
    data = scan_dataset(root)
    assert not any("old-run" in s.path for s in data.samples)
    assert "run folder" in dict(data.bad_files)["a/old-run"]


# ----------------------------------------------------------------------------- links


def test_a_link_into_another_class_lists_each_file_once_under_its_own_class(tmp_path):
    root = tmp_path / "photos"
    images(root / "a", 3)
    images(root / "b", 2, seed=1)
    os.symlink(root / "a", root / "b" / "loop")  # b/loop -> ../a
    os.symlink(root / "a" / "img_0.jpg", root / "b" / "again.jpg")
    data = scan_dataset(root)
    by_class = {c: sorted(s.path for s in data.samples if s.label == i) for i, c in enumerate(data.classes)}
    assert by_class == {
        "a": ["a/img_0.jpg", "a/img_1.jpg", "a/img_2.jpg"],
        "b": ["b/img_0.jpg", "b/img_1.jpg"],
    }
    skipped = dict(data.bad_files)
    assert "a link into a/" in skipped["b/loop/img_0.jpg"] and "a link into a/" in skipped["b/again.jpg"]


def test_one_file_linked_twice_is_listed_once(tmp_path):
    root = tmp_path / "photos"
    images(root / "a", 2)
    images(root / "b", 2, seed=1)
    outside = images(tmp_path / "elsewhere", 1, prefix="x")[0]
    os.symlink(outside, root / "a" / "first.jpg")
    os.symlink(outside, root / "a" / "second.jpg")
    data = scan_dataset(root)
    assert [s.path for s in data.samples if s.label == 0] == ["a/first.jpg", "a/img_0.jpg", "a/img_1.jpg"]
    assert "the same file as a/first.jpg" in dict(data.bad_files)["a/second.jpg"]


@pytest.mark.parametrize("how", ["to another class", "two to one folder", "across splits"])
def test_class_folders_that_are_one_folder_are_refused(tmp_path, how):
    root = tmp_path / "photos"
    if how == "to another class":
        images(root / "a", 2)
        images(root / "b", 2, seed=1)
        os.symlink(root / "a", root / "c")
        fragment = "a/ and c/ are the same folder"
    elif how == "two to one folder":
        images(tmp_path / "store", 2)
        images(root / "a", 2, seed=1)
        os.symlink(tmp_path / "store", root / "b")
        os.symlink(tmp_path / "store", root / "c")
        fragment = "b/ and c/ are the same folder"
    else:
        presplit(root, {"train": 3})
        (root / "test").mkdir()
        os.symlink(root / "train" / "cat", root / "test" / "cat")
        os.symlink(root / "train" / "dog", root / "test" / "dog")
        fragment = "train/cat/ and test/cat/ are the same folder"
    with pytest.raises(SemodelError, match=fragment):
        scan_dataset(root)


def test_a_broken_link_is_listed_with_its_reason(tmp_path):
    root = tmp_path / "photos"
    images(root / "a", 2)
    images(root / "b", 2, seed=1)
    os.symlink(tmp_path / "gone.jpg", root / "a" / "moved.jpg")
    os.symlink(tmp_path / "gone-folder", root / "b" / "more")
    skipped = dict(scan_dataset(root).bad_files)
    assert skipped["a/moved.jpg"] == "broken link (its target is missing)"
    assert skipped["b/more"] == "broken link (its target is missing)"


# ----------------------------------------------------------------------------- class names


@pytest.mark.parametrize(
    "first, second, shown, difference",
    [
        ("Cat", "cat", ["'Cat'", "'cat'"], "case"),
        ("DOG", "dog", ["'DOG'", "'dog'"], "case"),
        ("dog", "dog ", ["'dog'", "'dog '"], "surrounding spaces"),
        (" fox", "fox", ["' fox'", "'fox'"], "surrounding spaces"),
        (
            unicodedata.normalize("NFC", "café"),
            unicodedata.normalize("NFD", "café"),
            ["'caf\\xe9'", "'cafe\\u0301'"],
            "Unicode normalization",
        ),
        (unicodedata.normalize("NFD", "Ärzte"), unicodedata.normalize("NFC", "ärzte"), [], "case"),
    ],
)
def test_class_names_that_merge_or_print_alike_are_refused(
    tmp_path, capsys, first, second, shown, difference
):
    root = tmp_path / "photos"
    images(root / first, 2)
    images(root / second, 2, seed=1)
    images(root / "other", 2, seed=2)
    raw = tiny_config(root, tmp_path / "runs", "names")
    code, _, err = run_cli(["train", "--config", write_config(tmp_path / "n.yaml", raw)], capsys)
    assert_one_line_error(code, err, f"differ only in {difference}")
    for text in shown:
        assert text in err, err


# ----------------------------------------------------------------------------- group_by and image size


def test_group_by_matching_no_file_is_an_error_and_some_a_warning(tmp_path, capsys):
    root = tmp_path / "photos"
    for patient in (1, 2, 3):
        images(root / "a", 2, seed=patient, prefix=f"P{patient}")
    images(root / "b", 6, seed=9, prefix="Q2")
    with pytest.raises(SemodelError, match=r"matches none of the 12 file names"):
        prepared(root, tmp_path, group_by=r"^(patient\d+)_")
    _, lines = prepared(root, tmp_path, group_by=r"^(P\d)_")
    warning = next(line for line in lines if "group_by" in line)
    assert "matches 6 of 12 file names; the other 6" in warning
    # The same before any fold of a cross-validation is written
    raw = tiny_config(root, tmp_path / "runs", "cvrun", data={"split": {"group_by": "^(nobody)_"}})
    code, _, err = run_cli(
        ["cv", "--config", write_config(tmp_path / "cv.yaml", raw), "--folds", "2"], capsys
    )
    assert_one_line_error(code, err, "matches none of the 12 file names")
    assert not (tmp_path / "runs" / "cvrun").exists()


def test_training_far_above_the_images_size_is_a_warning(tmp_path, capsys):
    root = tmp_path / "photos"
    images(root / "a", 4, size=(32, 30))
    images(root / "b", 4, seed=1, size=(30, 34))
    _, lines = prepared(root, tmp_path)  # the default image_size, 224 px
    warning = next(line for line in lines if "upsampled" in line)
    assert "224 px, 7.5x the images' median shorter side (30 px)" in warning
    cfg = validate({"data": {"root": str(root), "image_size": 48, "split": {"val": 0.25, "test": 0.0}}}, "t")
    lines = []
    prepare_dataset(cfg, log=lines.append)
    assert not any("upsampled" in line for line in lines)  # 1.6x: no warning


def test_the_data_line_names_the_image_size(tmp_path, capsys):
    root = tmp_path / "photos"
    images(root / "a", 4)
    images(root / "b", 4, seed=1)
    raw = tiny_config(root, tmp_path / "runs", "size")
    code, out, err = run_cli(["train", "--config", write_config(tmp_path / "s.yaml", raw)], capsys)
    assert code == 0, err
    data_line = next(line for line in out.splitlines() if line.startswith("data: "))
    assert "image_size: 16 px" in data_line
    metrics = json.loads((tmp_path / "runs" / "size" / "metrics.json").read_text())
    assert metrics["epochs"] == 1
