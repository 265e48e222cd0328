"""The file index (semodel.data.index): one read of every image, kept beside the data or in the user's
cache folder, reused by path, size and modification time, rebuilt where it cannot be trusted."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest
from helpers_ckpt import make_image
from PIL import Image

from semodel.data import scan_dataset
from semodel.data.index import INDEX_NAME, build_index, index_file, probe, read_index

MSLD = Path(__file__).resolve().parents[2] / "shared" / "data" / "msld"


def folder(root: Path, per_class: int = 3) -> list[str]:
    paths = []
    for c, name in enumerate(("a", "b")):
        for i in range(per_class):
            make_image(root / name / f"{name}{i}.jpg", (50 + 80 * c, 90, 120), seed=10 * c + i, size=(40, 30))
            paths.append(f"{name}/{name}{i}.jpg")
    return paths


def distance(a: int, b: int) -> int:
    return bin(a ^ b).count("1")


def photo(tmp_path: Path) -> Image.Image:
    real = sorted((MSLD / "original").glob("*/*.jpg"))
    if real:
        return Image.open(real[7]).convert("RGB").resize((150, 110))
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.uniform(0, 255, (6, 8, 3)), np.ones((19, 19, 1)))[:110, :150]
    return Image.fromarray(smooth.astype(np.uint8))


def test_the_perceptual_hash_knows_every_flip_and_rotation(tmp_path):
    img = photo(tmp_path)
    img.save(tmp_path / "own.png")
    own = probe(tmp_path / "own.png")
    assert len(own.phash) == 8 and (own.height, own.width) == (110, 150)
    for t in Image.Transpose:
        img.transpose(t).save(tmp_path / f"{t.name}.png")
        turned = probe(tmp_path / f"{t.name}.png")
        # the turned photo's own hash is one of the original's eight (up to resampling: 2 bits)
        assert min(distance(turned.phash[0], h) for h in own.phash) <= 2, t.name
    # another photo is far from all eight
    other = Image.fromarray(np.asarray(img)[:, ::-1].transpose(1, 0, 2)[::3, ::2].copy()).resize((150, 110))
    Image.fromarray(255 - np.asarray(other)).save(tmp_path / "other.png")
    assert min(distance(probe(tmp_path / "other.png").phash[0], h) for h in own.phash) > 10


def test_byte_copies_share_the_content_hash(tmp_path):
    paths = folder(tmp_path)
    (tmp_path / "a" / "copy.jpg").write_bytes((tmp_path / paths[0]).read_bytes())
    entries = build_index(tmp_path, [*paths, "a/copy.jpg"]).entries
    assert entries["a/copy.jpg"].sha == entries[paths[0]].sha
    assert len({e.sha for e in entries.values()}) == len(paths)


def test_a_second_pass_reads_only_what_changed(tmp_path):
    paths = folder(tmp_path)
    first = build_index(tmp_path, paths)
    assert first.probed == 6 and first.saved and first.file == tmp_path / INDEX_NAME
    again = build_index(tmp_path, paths)
    assert again.probed == 0 and again.entries == first.entries
    make_image(tmp_path / paths[1], (0, 0, 0), seed=99, size=(50, 20))  # changed: new size and time
    os.utime(tmp_path / paths[1], ns=(1, 1))
    third = build_index(tmp_path, paths[1:])  # and one file gone from the listing
    assert third.probed == 1 and third.entries[paths[1]].width == 50
    assert set(read_index(tmp_path / INDEX_NAME)) == set(paths[1:])  # the gone one dropped


@pytest.mark.parametrize(
    "damage",
    ["truncated", "garbage", "another version", "edited row", "empty", "a list"],
)
def test_a_damaged_index_is_ignored_and_rebuilt(tmp_path, damage):
    paths = folder(tmp_path)
    good = build_index(tmp_path, paths)
    file = tmp_path / INDEX_NAME
    text = file.read_text()
    file.write_text(
        {
            "truncated": text[: len(text) // 2],
            "garbage": "\x00\xff not json",
            "another version": json.dumps({"version": 999, "files": json.loads(text)["files"]}),
            "edited row": text.replace('"a/a0.jpg":[', '"a/a0.jpg":["x",', 1),
            "empty": "",
            "a list": "[1, 2, 3]",
        }[damage],
        errors="surrogateescape",
    )
    rebuilt = build_index(tmp_path, paths)
    assert rebuilt.probed == 6 and rebuilt.entries == good.entries
    assert read_index(file) == good.entries


def test_unreadable_files_are_entries_with_their_reason(tmp_path):
    paths = folder(tmp_path)
    (tmp_path / "a" / "broken.jpg").write_bytes((tmp_path / paths[0]).read_bytes()[:200])
    (tmp_path / "b" / "text.png").write_text("not an image")
    entries = build_index(tmp_path, [*paths, "a/broken.jpg", "b/text.png", "b/gone.jpg"]).entries
    assert entries["a/broken.jpg"].error.startswith("cannot decode")
    assert entries["b/text.png"].error == "not an image"
    assert entries["b/gone.jpg"].error == "file not found"
    skipped = dict(scan_dataset(tmp_path).bad_files)
    assert skipped["a/broken.jpg"].startswith("cannot decode") and skipped["b/text.png"] == "not an image"


def test_a_read_only_data_folder_keeps_its_index_in_the_user_cache(tmp_path, monkeypatch):
    data = tmp_path / "shared"
    paths = folder(data)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for d in (data, data / "a", data / "b"):
        d.chmod(0o555)
    try:
        index = build_index(data, paths)
        assert index.file.parent == tmp_path / "cache" / "semodel" / "index" and index.saved
        assert not (data / INDEX_NAME).exists()
        assert build_index(data, paths).probed == 0  # found again there
        assert index_file(data) == index.file
    finally:
        for d in (data, data / "a", data / "b"):
            d.chmod(0o755)


def _build(root: str, paths: list[str], queue) -> None:
    queue.put(build_index(Path(root), paths, workers=1).probed)


def test_two_starts_at_once_both_get_a_whole_index(tmp_path):
    paths = folder(tmp_path, per_class=20)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_build, args=(str(tmp_path), paths, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    probed = sorted(queue.get(timeout=5) for _ in procs)
    # each read all 40 (or, started after the other finished, none: it found a whole index)
    assert probed in ([40, 40], [0, 40])
    assert set(read_index(tmp_path / INDEX_NAME)) == set(paths)  # one writer's whole file
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_the_pass_in_processes_equals_the_pass_in_one(tmp_path):
    paths = folder(tmp_path, per_class=40)
    one = build_index(tmp_path, paths, workers=1).entries
    (tmp_path / INDEX_NAME).unlink()
    two = build_index(tmp_path, paths, workers=2).entries
    assert one == two


def test_training_twice_reads_each_image_once(tmp_path, capsys):
    from helpers_ckpt import run_cli
    from helpers_train import tiny_config, write_config

    paths = folder(tmp_path / "data", per_class=6)
    raw = tiny_config(tmp_path / "data", tmp_path / "runs", "twice")
    config = write_config(tmp_path / "t.yaml", raw)
    code, _, err = run_cli(["train", "--config", config], capsys)
    assert code == 0, err
    file = tmp_path / "data" / INDEX_NAME
    assert set(read_index(file)) == set(paths)
    stamp = file.stat().st_mtime_ns
    code, _, err = run_cli(["train", "--config", config], capsys)
    assert code == 0, err
    assert file.stat().st_mtime_ns == stamp  # nothing read again, nothing rewritten
