"""Copies and leaks (semodel.data.duplicates): the near-copy search against all pairs, clusters of
exact and flipped copies, the split keeping them together, leaks across split folders and label
conflicts, each with its message, its setting and its place in metrics.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers_ckpt import assert_one_line_error, run_cli
from helpers_train import (
    one_torch_thread,  # noqa: F401  (autouse fixture: one torch thread)
    tiny_config,
    write_config,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from semodel.config import validate
from semodel.data import prepare_dataset, scan_dataset
from semodel.data.duplicates import find_copies, near_pairs, popcount
from semodel.errors import SemodelError


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 60), bits=st.integers(0, 8))
def test_the_banded_search_finds_exactly_the_pairs_all_pairs_would(seed, n, bits):
    rng = np.random.default_rng(seed)
    variants = rng.integers(0, 2**63, size=(n, 8), dtype=np.uint64) * np.uint64(2) + rng.integers(
        0, 2, size=(n, 8), dtype=np.uint64
    )
    # plant near copies: some images' own hash a few bits from another's variant
    for i in range(0, n - 1, 3):
        flips = rng.choice(64, size=int(rng.integers(0, bits + 3)), replace=False)
        mask = np.uint64(sum(1 << int(b) for b in flips))
        variants[i + 1, 0] = variants[i, int(rng.integers(0, 8))] ^ mask
    own = variants[:, 0].copy()
    expected = {
        (min(i, j), max(i, j))
        for i in range(n)
        for j in range(n)
        if i != j and (popcount(own[i] ^ variants[j]) <= bits).any()
    }
    assert {tuple(p) for p in near_pairs(own, variants, bits).tolist()} == expected


def photo(seed: int, size=(48, 40)) -> Image.Image:
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (4, 5, 3))
    big = np.kron(coarse, np.ones((size[1] // 4 + 1, size[0] // 5 + 1, 1)))[: size[1], : size[0]]
    return Image.fromarray((big + rng.normal(0, 6, big.shape)).clip(0, 255).astype(np.uint8))


def with_copies(root: Path, per_class: int = 6, copies: int = 2) -> dict[str, list[str]]:
    """root/<class>/p<k>.png and, for each, flipped / rotated copies p<k>_c<j>.png (PNG: lossless)."""
    clusters = {}
    turns = [Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.ROTATE_90, Image.Transpose.FLIP_TOP_BOTTOM]
    for c, name in enumerate(("cat", "dog")):
        for k in range(per_class):
            img = photo(100 * c + k)
            (root / name).mkdir(parents=True, exist_ok=True)
            img.save(root / name / f"p{k}.png")
            members = [f"{name}/p{k}.png"]
            for j in range(copies):
                img.transpose(turns[j % 3]).save(root / name / f"p{k}_c{j}.png")
                members.append(f"{name}/p{k}_c{j}.png")
            clusters[f"{name}{k}"] = members
    return clusters


def test_exact_and_flipped_copies_form_one_cluster_each(tmp_path):
    expected = with_copies(tmp_path)
    (tmp_path / "cat" / "byte.png").write_bytes((tmp_path / "cat" / "p0.png").read_bytes())
    expected["cat0"].append("cat/byte.png")
    copies = find_copies(scan_dataset(tmp_path).index.entries)
    assert sorted(map(sorted, copies.clusters)) == sorted(map(sorted, expected.values()))
    assert copies.exact == 1


def config(root: Path, tmp_path: Path, **data) -> object:
    raw = {"root": str(root), "split": {"val": 0.25, "test": 0.25, "seed": 0}, **data}
    return validate({"data": raw, "log": {"out_dir": str(tmp_path / "runs")}}, "t")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_default_split_keeps_copies_together_and_ignore_does_not(tmp_path, seed):
    clusters = with_copies(tmp_path / "photos", per_class=8)
    lines: list[str] = []
    cfg = config(tmp_path / "photos", tmp_path, split={"val": 0.25, "test": 0.25, "seed": seed})
    data = prepare_dataset(cfg, log=lines.append)
    split_of = {s.path: s.split for s in data.samples}
    assert all(len({split_of[p] for p in members}) == 1 for members in clusters.values())
    assert any(
        "16 clusters of exact or flipped/rotated copies (48 images) kept in one split" in x for x in lines
    )
    assert data.leaks.counts == {"test-train": 0, "val-train": 0, "test-val": 0}
    cfg = config(
        tmp_path / "photos", tmp_path, split={"val": 0.25, "test": 0.25, "seed": seed, "duplicates": "ignore"}
    )
    lines = []
    data = prepare_dataset(cfg, log=lines.append)
    split_of = {s.path: s.split for s in data.samples}
    crossing = sum(len({split_of[p] for p in members}) > 1 for members in clusters.values())
    assert crossing > 0 and data.leaks.counts["test-train"] > 0
    assert any(x.startswith("note: copies across the splits:") for x in lines)


def leaky_folder(root: Path) -> int:
    """train/ val/ test/ folders; 3 test images are flipped copies of training images."""
    for c, name in enumerate(("cat", "dog")):
        for k in range(6):
            (root / "train" / name).mkdir(parents=True, exist_ok=True)
            photo(10 * c + k).save(root / "train" / name / f"t{k}.png")
        for k in range(2):
            (root / "val" / name).mkdir(parents=True, exist_ok=True)
            photo(700 + 10 * c + k).save(root / "val" / name / f"v{k}.png")
        for k in range(3):
            (root / "test" / name).mkdir(parents=True, exist_ok=True)
            photo(500 + 10 * c + k).save(root / "test" / name / f"own{k}.png")
    for k in range(3):
        photo(k).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(root / "test" / "cat" / f"leak{k}.png")
    return 3


def test_leaks_across_split_folders_are_counted_and_shown(tmp_path, capsys):
    leaked = leaky_folder(tmp_path / "photos")
    raw = tiny_config(tmp_path / "photos", tmp_path / "runs", "leaky", train={"epochs": 1})
    code, out, err = run_cli(["train", "--config", write_config(tmp_path / "l.yaml", raw)], capsys)
    assert code == 0, err
    warning = next(line for line in out.splitlines() if "copies across the splits" in line)
    assert warning.startswith("warning: ") and f"{leaked} of 9 test images have a copy in train" in warning
    assert "test/cat/leak0.png ~ train/cat/t0.png" in warning
    facts = json.loads((tmp_path / "runs" / "leaky" / "metrics.json").read_text())["data"]
    assert facts["leakage"]["test-train"]["images"] == leaked and facts["leakage"]["test-train"]["of"] == 9
    assert facts["copies"]["clusters"] == 3


def test_leakage_error_stops_before_anything_is_written(tmp_path, capsys):
    leaky_folder(tmp_path / "photos")
    raw = tiny_config(tmp_path / "photos", tmp_path / "runs", "stop", data={"leakage": "error"})
    code, _, err = run_cli(["train", "--config", write_config(tmp_path / "s.yaml", raw)], capsys)
    assert_one_line_error(code, err, "copies across the splits: 3 of 9 test images have a copy in train")
    assert not (tmp_path / "runs").exists()
    raw["data"]["leakage"] = "ignore"
    lines: list[str] = []
    prepare_dataset(validate(raw, "t"), log=lines.append)
    assert not any("copies across" in line for line in lines)


def test_a_photo_in_two_classes_is_a_label_conflict(tmp_path, capsys):
    root = tmp_path / "photos"
    with_copies(root, per_class=4, copies=0)
    (root / "dog" / "also_cat.png").write_bytes((root / "cat" / "p1.png").read_bytes())
    lines: list[str] = []
    data = prepare_dataset(config(root, tmp_path), log=lines.append)
    assert data.conflicts == [["cat/p1.png", "dog/also_cat.png"]]
    warning = next(line for line in lines if "label conflict" in line)
    assert "cat/p1.png = dog/also_cat.png" in warning and warning.startswith("warning: ")
    with pytest.raises(SemodelError, match="1 photo\\(s\\) are in two class folders"):
        prepare_dataset(config(root, tmp_path, conflicts="error"), log=lines.append)


def test_cross_validation_keeps_copies_in_one_fold(tmp_path):
    from semodel.cv import load_folds

    clusters = with_copies(tmp_path / "photos", per_class=6)
    cfg = validate({"data": {"root": str(tmp_path / "photos")}, "cv": {"folds": 3}}, "t")
    lines: list[str] = []
    _, _, assigned, existing = load_folds(cfg, tmp_path / "cv", lines.append)
    fold_of = {s.path: fold for fold, s in assigned}
    assert not existing and sorted(set(fold_of.values())) == [1, 2, 3]
    assert all(len({fold_of[p] for p in members}) == 1 for members in clusters.values())
    assert any(
        "12 clusters of exact or flipped/rotated copies (36 images) kept in one fold each" in x for x in lines
    )


def test_eval_of_a_leaky_run_repeats_the_warning(tmp_path, capsys):
    leaky_folder(tmp_path / "photos")
    raw = tiny_config(tmp_path / "photos", tmp_path / "runs", "leaky")
    code, _, err = run_cli(["train", "--config", write_config(tmp_path / "l.yaml", raw)], capsys)
    assert code == 0, err
    best = tmp_path / "runs" / "leaky" / "best.pt"
    code, out, err = run_cli(["eval", best, "--ci", "0", "--device", "cpu"], capsys)
    assert code == 0, err
    assert "warning: copies across the splits: 3 of 9 test images have a copy in train" in out + err
    code, out, err = run_cli(["eval", best, "--ci", "0", "--device", "cpu", "--split", "val"], capsys)
    assert code == 0, err
    assert "copies across the splits" not in out + err  # val has none


def test_a_resumed_run_keeps_its_leak_counts(tmp_path, capsys):
    leaky_folder(tmp_path / "photos")
    raw = tiny_config(tmp_path / "photos", tmp_path / "runs", "leaky", train={"epochs": 1})
    code, _, err = run_cli(["train", "--config", write_config(tmp_path / "l.yaml", raw)], capsys)
    assert code == 0, err
    run_dir = tmp_path / "runs" / "leaky"
    args = ["train", "--resume", run_dir / "last.pt", "--set", "train.epochs=2", "--quiet"]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    facts = json.loads((run_dir / "metrics.json").read_text())
    assert facts["epochs"] == 2
    assert facts["data"]["leakage"]["test-train"]["images"] == 3 and facts["data"]["copies"]["clusters"] == 3
