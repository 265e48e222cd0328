"""One scanner for every command: train, eval, predict, cv and inspect see the same image files.

The rules (``semodel.data.list_images``, docs/training.md "Which files are images"): names that start
with ``.`` are skipped, files and folders alike; only image extensions count, in any case; links
are followed, except a loop and a link up to a folder that holds the one being scanned.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
from helpers_ckpt import make_image, run_cli
from helpers_train import tiny_config, write_config

from semodel.data import list_images, scan_dataset
from semodel.predict import collect_inputs


def tricky_folder(base: Path) -> tuple[Path, set[str]]:
    """A data folder with every case of the rules; returns it and the image paths (relative) to see."""
    root = base / "photos"
    seen = set()

    def image(rel: str, see: bool, seed: int) -> None:
        make_image(root / rel, (60 + 40 * (seed % 5), 200 - 30 * (seed % 4), 90), seed=seed, size=(24, 24))
        if see:
            seen.add(rel)

    for i in range(3):
        image(f"cat/cat_{i}.jpg", True, i)
        image(f"dog/dog_{i}.JPG", True, 10 + i)  # any case
    image("cat/sub/deeper/cat_9.png", True, 20)
    image("cat/.ipynb_checkpoints/cat_0-checkpoint.jpg", False, 21)  # a notebook's copy: hidden folder
    image("cat/.hidden.jpg", False, 22)
    image("dog/._dog_0.JPG", False, 23)  # a macOS resource file
    image(".cache/fox.jpg", False, 24)  # a hidden top-level folder is no class
    (root / "cat" / "notes.txt").write_text("not an image\n")
    # A linked folder inside a class, and a linked class folder: both followed.
    outside = base / "elsewhere"
    make_image(outside / "dog_linked.jpg", (30, 30, 200), seed=30, size=(24, 24))
    os.symlink(outside, root / "dog" / "more")
    seen.add("dog/more/dog_linked.jpg")
    fox_store = base / "fox_store"
    for i in range(4):
        make_image(fox_store / f"fox_{i}.jpg", (200, 120, 20 * i), seed=40 + i, size=(24, 24))
    os.symlink(fox_store, root / "fox")
    seen |= {f"fox/fox_{i}.jpg" for i in range(4)}
    # A loop and a link up to the data root: not followed.
    os.symlink(root / "cat", root / "cat" / "sub" / "loop")
    os.symlink(root, root / "dog" / "up")
    return root, seen


@pytest.fixture(scope="module")
def tricky(tmp_path_factory):
    base = tmp_path_factory.mktemp("scan")
    root, seen = tricky_folder(base)
    return {"base": base, "root": root, "seen": seen}


def test_the_scanner_follows_the_rules(tricky):
    root = tricky["root"]
    data = scan_dataset(root)
    assert data.classes == ["cat", "dog", "fox"]
    assert {s.path for s in data.samples} == tricky["seen"]
    assert data.bad_files == [("cat/notes.txt", "not an image file (.txt)")]
    listing = list_images(root / "cat")
    assert [p.name for p in listing.others] == ["notes.txt"]


def test_every_command_sees_the_same_files(tricky, tmp_path, capsys):
    root, seen = tricky["root"], tricky["seen"]
    config = write_config(
        tmp_path / "scan.yaml",
        tiny_config(root, tmp_path / "runs", "scan", data={"split": {"val": 0.3, "test": 0.3}}),
    )
    # train: split.csv
    code, _, err = run_cli(["train", "--config", config, "--quiet"], capsys)
    assert code == 0, err
    run_dir = tmp_path / "runs" / "scan"
    with open(run_dir / "split.csv", newline="") as f:
        assert {r["path"] for r in csv.DictReader(f)} == seen
    ckpt = run_dir / "best.pt"
    # eval --data: every image evaluated
    code, _, err = run_cli(["eval", ckpt, "--data", root, "-o", tmp_path / "eval.json"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["data"]["evaluated"] == len(seen)
    # predict on the folder, and on a ** pattern: the same files
    paths, problems = collect_inputs([str(root)])
    assert problems == [] and {p.relative_to(root).as_posix() for p in paths} == seen
    pattern_paths, _ = collect_inputs([str(root / "**" / "*")])
    assert sorted(pattern_paths) == sorted(paths)
    code, out, err = run_cli(["predict", root, "--checkpoint", ckpt, "--format", "csv"], capsys)
    assert code == 0, err
    assert {Path(r["path"]).relative_to(root).as_posix() for r in csv.DictReader(out.splitlines())} == seen
    # inspect: every image of every class sampled
    code, _, err = run_cli(
        ["inspect", ckpt, "--data", root, "--out", tmp_path / "insp", "--cams", "0"], capsys
    )
    assert code == 0, err
    counts = json.loads((tmp_path / "insp" / "inspect.json").read_text())["images_per_class"]
    assert sum(counts.values()) == len(seen)
    # cv: folds.csv
    cv_config = write_config(
        tmp_path / "cv.yaml",
        tiny_config(
            root, tmp_path / "runs", "cvscan", cv={"folds": 2}, data={"split": {"val": 0.5, "test": 0.0}}
        ),
    )
    code, _, err = run_cli(["cv", "--config", cv_config, "--quiet"], capsys)
    assert code == 0, err
    with open(tmp_path / "runs" / "cvscan" / "folds.csv", newline="") as f:
        assert {r["path"] for r in csv.DictReader(f)} == seen
