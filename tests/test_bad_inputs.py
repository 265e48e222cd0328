"""Bad input: one table of inputs that must fail cleanly, or (odd image formats) simply work.

Every row of ``ROWS`` runs through the CLI entry point: in-process through ``semodel.cli.main``,
the rows marked ``real_process`` as ``python -m semodel`` in a real process. An error row must give
its exit code, exactly one ``error:`` line on stderr that holds the row's fragment (the problem)
and its ``names`` (the file, folder or key), no traceback and no Python warning. A "works" row
must exit 0 with its fragment in the output and no ``error:`` line.

One real 1-epoch training run (``runs/earlier``, with its data folder ``data`` and its config) is
made before the rows, and snapshotted: after every row, every file under it must be unchanged
(the same names, sizes, mtimes, ctimes and inodes, and the same bytes for every file under
1 MiB; the last test compares every byte of the checkpoints too), and the file that the
code-running pickles would create must not exist.

docs/reliability.md shows this table (section "Bad input", between the ``bad-input-table`` markers);
``test_docs_show_this_table`` checks that it is exactly ``markdown_table()``. After changing
``ROWS``, rewrite the docs block with::

    python tests/test_bad_inputs.py
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import shlex
import signal
import struct
import subprocess
import sys
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_ckpt import make_folder, make_image, run_cli
from helpers_train import alias_bomb, tiny_config, write_config
from PIL import Image

from semodel.data import check_image, load_rgb, scan_dataset
from semodel.predict import collect_inputs
from semodel.preprocess import preprocess_image

TABLE_PAGE = Path(__file__).resolve().parent.parent / "docs" / "reliability.md"
START, END = "<!-- bad-input-table:start -->", "<!-- bad-input-table:end -->"
CLASSES = ["cat", "dog", "fox"]
# How the docs table shows the placeholders of a command (they stand for absolute paths in the test).
SHOWN = {"{run}": "runs/earlier", "{data}": "data"}
MIB = 1 << 20


@dataclass
class World:
    base: Path  # everything of this module
    data: Path  # the earlier run's data folder
    runs: Path  # log.out_dir of the earlier run, and of the failing train rows
    run: Path  # runs/earlier
    config: Path  # the earlier run's YAML
    sentinel: Path  # what the code-running pickles would create


@dataclass(frozen=True)
class Row:
    id: str
    input: str  # what is bad (the table's "input")
    command: str  # after ``semodel``; {run}, {data} are placeholders, other names are made by ``make``
    make: Callable[[Path, World], None]  # makes the row's files in its folder (the current folder)
    code: int  # expected exit code; 0: works
    fragment: str  # in the one error: line (or, code 0, in the output)
    names: tuple[str, ...] = ()  # paths or keys the error line must name (placeholders allowed)
    real_process: bool = False  # run as `python -m semodel` in a real process
    works: str = ""  # code 0: what the table says after "works"


# ----------------------------------------------------------------------------- files for the rows


def nothing(folder: Path, world: World) -> None:
    pass


def config_file(
    changes: dict | None = None, name: str = "bad.yaml", drop: dict[str, list[str]] | None = None
) -> Callable[[Path, World], None]:
    """A tiny training config (the earlier run's data, log.out_dir beside it) with ``changes``
    merged in and the keys ``drop`` ({section: [key, ...]}) left out."""

    def make(folder: Path, world: World) -> None:
        raw = tiny_config(world.data, world.runs, "bad", **(changes or {}))
        for section, keys in (drop or {}).items():
            for key in keys:
                raw[section].pop(key)
        write_config(folder / name, raw)

    return make


def text_file(name: str, content: str | bytes) -> Callable[[Path, World], None]:
    def make(folder: Path, world: World) -> None:
        path = folder / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())

    return make


def data_config(root: str, build: Callable[[Path], None], **changes) -> Callable[[Path, World], None]:
    """``bad.yaml`` training on ``root`` (relative to the row's folder), made by ``build``."""

    def make(folder: Path, world: World) -> None:
        build(folder / root)
        raw = tiny_config(Path(root), world.runs, "bad", **changes)
        write_config(folder / "bad.yaml", raw)

    return make


def classes(*names: str, per_class: int = 4) -> Callable[[Path], None]:
    return lambda root: make_folder(root, list(names), per_class=per_class)


def empty_folder(root: Path) -> None:
    root.mkdir(parents=True)


def with_empty_class(root: Path) -> None:
    make_folder(root, CLASSES)
    (root / "emu").mkdir()


def with_class_of_non_images(root: Path) -> None:
    make_folder(root, CLASSES)
    (root / "emu").mkdir()
    (root / "emu" / "notes.txt").write_text("not an image\n")
    (root / "emu" / "photo.jpg").write_text("a text file with an image name\n")


def good_jpeg(folder: Path, name: str = "photo.jpg") -> Path:
    return make_image(folder / name, (200, 60, 60), seed=5, size=(24, 20))


def truncated_jpeg(path: Path) -> None:
    data = good_jpeg(path.parent, "whole.jpg").read_bytes()
    path.write_bytes(data[: len(data) * 3 // 4])
    (path.parent / "whole.jpg").unlink()


def data_with(extra: Callable[[Path], None]) -> Callable[[Path], None]:
    """The three classes, plus ``extra(root)``."""

    def build(root: Path) -> None:
        make_folder(root, CLASSES)
        extra(root)

    return build


# Image formats that must work: file name -> how to save it.
def _pixels(seed: int, size=(20, 24)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def _palette_with_transparency(rgb: Image.Image, path: Path) -> None:
    rgb.convert("P").save(path, transparency=0)


FORMATS: dict[str, Callable[[Image.Image, Path], None]] = {
    "gray.jpg": lambda im, p: im.convert("L").save(p),
    "rgba.png": lambda im, p: im.convert("RGBA").save(p),
    "gray_alpha.png": lambda im, p: im.convert("LA").save(p),
    "gray16.png": lambda im, p: Image.fromarray(np.asarray(im.convert("L"), dtype=np.uint16) * 257).save(p),
    "cmyk.jpg": lambda im, p: im.convert("CMYK").save(p),
    "palette.png": lambda im, p: im.convert("P").save(p),
    "palette_alpha.png": _palette_with_transparency,
    "bilevel.png": lambda im, p: im.convert("1").save(p),
    # Not in the table (one predict row each above is enough), but loaded by the direct test:
    "gray16.tif": lambda im, p: Image.fromarray(np.asarray(im.convert("L"), dtype=np.uint16) * 257).save(p),
    "cmyk.tif": lambda im, p: im.convert("CMYK").save(p),
    "int32.tif": lambda im, p: im.convert("I").save(p),
    "float.tif": lambda im, p: im.convert("F").save(p),
    "palette.gif": lambda im, p: im.convert("P").save(p),
}
# The mode PIL must open each file in (so that the test really covers that kind of file).
MODES = {
    "gray.jpg": "L",
    "rgba.png": "RGBA",
    "gray_alpha.png": "LA",
    "gray16.png": "I;16",
    "cmyk.jpg": "CMYK",
    "palette.png": "P",
    "palette_alpha.png": "P",
    "bilevel.png": "1",
    "gray16.tif": "I;16",
    "cmyk.tif": "CMYK",
    "int32.tif": "I",
    "float.tif": "F",
    "palette.gif": "P",
}


def format_image(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    FORMATS[path.name](Image.fromarray(_pixels(seed)), path)
    return path


def one_format(name: str) -> Callable[[Path, World], None]:
    return lambda folder, world: format_image(folder / name)


def formats_folder(root: Path) -> None:
    """cat/ dog/ fox/, each with one file of every format (a class's tint in its pixels)."""
    for ci, c in enumerate(CLASSES):
        for fi, name in enumerate(FORMATS):
            format_image(root / c / name, seed=ci * 100 + fi)


def png_header(width: int, height: int, idat: bytes = b"") -> bytes:
    """A grayscale PNG that claims ``width`` x ``height`` pixels, with ``idat`` as its data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def header_bomb(folder: Path, world: World) -> None:
    """30000 x 30000 claimed (900 M pixels, 2.7 GB as RGB), 12 bytes of data."""
    (folder / "bomb.png").write_bytes(png_header(30000, 30000, zlib.compress(b"\0" * 16)))


def real_bomb(folder: Path, world: World) -> None:
    """13000 x 13000 black pixels, all of them really there: 169 M pixels in a 170 kB file.

    Below twice PIL's limit, where PIL only warns and then decodes it (0.5 GB as RGB, 2 GB as floats).
    """
    side = 13000
    packer = zlib.compressobj(9)
    row = b"\0" * (side + 1)  # filter byte + pixels
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    (folder / "bomb.png").write_bytes(png_header(side, side, idat))


def bomb_in_data(root: Path) -> None:
    (root / "dog" / "bomb.png").write_bytes(png_header(30000, 30000, zlib.compress(b"\0" * 16)))


def symlink_loops(root: Path) -> None:
    """A link from a class folder to itself and one to the data root (which holds the other classes)."""
    make_folder(root, CLASSES)
    os.symlink(".", root / "cat" / "loop")
    os.symlink("..", root / "cat" / "up")
    os.symlink("../dog", root / "dog" / "self")


# ----------------------------------------------------------------------------- checkpoints


class RunsCode:
    """A pickle that runs ``touch SENTINEL`` (os.system) when loaded: what a malicious checkpoint holds."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.sentinel))}",))


class ExecsCode(RunsCode):
    """The same with ``exec`` of Python source that writes the sentinel."""

    def __reduce__(self):
        return (exec, (f"open({str(self.sentinel)!r}, 'w').write('ran')",))


def code_checkpoint(name: str, how: str) -> Callable[[Path, World], None]:
    """A checkpoint with a semodel header whose weights are an object that runs code on load."""

    def make(folder: Path, world: World) -> None:
        state = {
            "semodel": {"format_version": 1},
            "config": {},
            "classes": CLASSES,
            "preprocess": {},
            "model": RunsCode(world.sentinel),
        }
        if how == "zip":
            torch.save(state, folder / name)
        elif how == "zip-protocol-4":
            torch.save({**state, "model": ExecsCode(world.sentinel)}, folder / name, pickle_protocol=4)
        else:  # a plain pickle file, as torch.save wrote before PyTorch 1.6
            (folder / name).write_bytes(pickle.dumps({**state, "model": ExecsCode(world.sentinel)}))

    return make


def truncated_checkpoint(folder: Path, world: World) -> None:
    data = (world.run / "best.pt").read_bytes()
    (folder / "half.pt").write_bytes(data[: len(data) // 2])


def other_program(folder: Path, world: World) -> None:
    torch.save({"epoch": 3, "state_dict": {"weight": torch.zeros(2, 2)}}, folder / "other.pt")


def plain_state_dict(folder: Path, world: World) -> None:
    torch.save(torch.nn.Linear(4, 2).state_dict(), folder / "weights.pth")


def pretrained_config(weights: Callable[[Path, World], None]) -> Callable[[Path, World], None]:
    def make(folder: Path, world: World) -> None:
        weights(folder, world)
        write_config(
            folder / "bad.yaml",
            tiny_config(world.data, world.runs, "bad", model={"pretrained": str(folder / "evil.pt")}),
        )

    return make


def edited_checkpoint(edit: Callable[[dict], None]) -> Callable[[Path, World], None]:
    """``edited.pt``: the earlier run's best.pt (weights and what eval reads) with ``edit`` applied."""

    def make(folder: Path, world: World) -> None:
        state = torch.load(world.run / "best.pt", weights_only=True)
        kept = ("semodel", "config", "classes", "preprocess", "model", "ema", "epoch", "run_dir")
        state = {k: v for k, v in state.items() if k in kept}  # no optimizer: small and quick
        edit(state)
        torch.save(state, folder / "edited.pt")

    return make


def set_in(*keys: str, value) -> Callable[[dict], None]:
    def edit(state: dict) -> None:
        node = state
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value

    return edit


def delete_in(*keys: str) -> Callable[[dict], None]:
    def edit(state: dict) -> None:
        node = state
        for key in keys[:-1]:
            node = node[key]
        del node[keys[-1]]

    return edit


def absurd_image_size(state: dict) -> None:
    state["config"]["data"]["image_size"] = 100_000
    state["preprocess"].update(image_size=100_000, resize=114_286)


def with_file_in_the_way(folder: Path, world: World) -> None:
    (folder / "runs").write_text("a file where the run folder's parent should be\n")
    write_config(folder / "bad.yaml", tiny_config(world.data, folder / "runs", "bad"))


def with_hidden_only_class(root: Path) -> None:
    make_folder(root, CLASSES)
    for i in range(2):  # notebook copies only
        make_image(
            root / "emu" / ".ipynb_checkpoints" / f"emu_{i}-checkpoint.jpg", (90, 90, 200), seed=70 + i
        )


def with_predict_folder(*files: str) -> Callable[[Path, World], None]:
    def make(folder: Path, world: World) -> None:
        (folder / "photos").mkdir()
        for name in files:
            (folder / "photos" / name).write_text("not an image\n")

    return make


# ----------------------------------------------------------------------------- the table

BEST, LAST = "{run}/best.pt", "{run}/last.pt"

ROWS: list[Row] = [
    # --- the config file
    Row(
        "yaml-tab",
        "malformed YAML: a tab in the indentation",
        "train --config bad.yaml",
        text_file("bad.yaml", "data:\n  root: data\n\tbatch_size: 4\n"),
        2,
        "malformed YAML at line 3",
        ("bad.yaml",),
        real_process=True,
    ),
    Row(
        "yaml-unclosed",
        "malformed YAML: `data: {root: x` (unclosed brace)",
        "config show --config bad.yaml",
        text_file("bad.yaml", "data: {root: x\n"),
        2,
        "malformed YAML at line 2",
        ("bad.yaml",),
    ),
    Row(
        "yaml-list",
        "YAML that is a list, not a mapping",
        "train --config bad.yaml",
        text_file("bad.yaml", "- data\n- model\n"),
        2,
        "the top level must be a mapping",
        ("bad.yaml", "list"),
    ),
    Row(
        "yaml-string",
        "YAML that is a plain string",
        "train --config bad.yaml",
        text_file("bad.yaml", "just some words\n"),
        2,
        "the top level must be a mapping",
        ("bad.yaml", "str"),
    ),
    Row(
        "yaml-binary",
        "a binary file as the config",
        "train --config bad.yaml",
        text_file("bad.yaml", b"\xff\xfe\x00\x01\x89PNG"),
        2,
        "not a text file",
        ("bad.yaml",),
    ),
    Row(
        "config-missing",
        "a config file that does not exist",
        "train --config nope.yaml",
        nothing,
        2,
        "config file not found",
        ("nope.yaml",),
    ),
    Row(
        "unknown-key",
        "misspelled key `optim: {lrr: 0.1}`",
        "train --config bad.yaml",
        config_file({"optim": {"lrr": 0.1}}),
        2,
        "unknown key 'optim.lrr'; did you mean 'optim.lr'?",
        ("bad.yaml",),
    ),
    Row(
        "unknown-section",
        "misspelled section `trian:`",
        "train --config bad.yaml",
        config_file({"trian": {"epochs": 3}}),
        2,
        "unknown key 'trian'; did you mean 'train'?",
        ("bad.yaml",),
    ),
    Row(
        "unknown-nested",
        "unknown key `data: {split: {validation: 0.2}}`",
        "train --config bad.yaml",
        config_file({"data": {"split": {"validation": 0.2}}}),
        2,
        "unknown key 'data.split.validation'",
        ("bad.yaml", "valid keys in section 'data.split'"),
    ),
    Row(
        "type-int",
        "wrong type `train: {epochs: many}`",
        "train --config bad.yaml",
        config_file({"train": {"epochs": "many"}}),
        2,
        "train.epochs = 'many': Input should be a valid integer",
        ("bad.yaml",),
    ),
    Row(
        "type-list",
        "wrong type `data: {image_size: [32, 32]}`",
        "train --config bad.yaml",
        config_file({"data": {"image_size": [32, 32]}}),
        2,
        "data.image_size = [32, 32]",
        ("bad.yaml",),
    ),
    Row(
        "type-section",
        "a value where a section belongs: `optim: 0.1`",
        "train --config bad.yaml",
        config_file({"optim": 0.1}),
        2,
        "optim = 0.1: Input should be a valid dictionary",
        ("bad.yaml",),
    ),
    Row(
        "type-bool",
        "wrong type `train: {ema: maybe}`",
        "train --config bad.yaml",
        config_file({"train": {"ema": "maybe"}}),
        2,
        "train.ema = 'maybe': Input should be a valid boolean",
        ("bad.yaml",),
    ),
    Row(
        "negative-lr",
        "negative learning rate `optim: {lr: -0.1}`",
        "train --config bad.yaml",
        config_file({"optim": {"lr": -0.1}}),
        2,
        "optim.lr = -0.1: Input should be greater than 0",
        ("bad.yaml",),
    ),
    Row(
        "infinite-lr",
        "infinite learning rate `optim: {lr: .inf}`",
        "train --config bad.yaml",
        config_file({"optim": {"lr": float("inf")}}),
        2,
        "optim.lr = inf: Input should be a finite number",
        ("bad.yaml",),
    ),
    Row(
        "zero-epochs",
        "zero epochs `train: {epochs: 0}`",
        "train --config bad.yaml",
        config_file({"train": {"epochs": 0}}),
        2,
        "train.epochs = 0: Input should be greater than or equal to 1",
        ("bad.yaml",),
    ),
    Row(
        "fractions",
        "split fractions that leave nothing to train on `{val: 0.6, test: 0.5}`",
        "train --config bad.yaml",
        config_file({"data": {"split": {"val": 0.6, "test": 0.5}}}),
        2,
        "val + test = 1.1 leaves nothing to train on",
        ("bad.yaml", "data.split"),
    ),
    Row(
        "no-val",
        "no validation split `data: {split: {val: 0}}`",
        "train --config bad.yaml",
        config_file({"data": {"split": {"val": 0.0}}}),
        2,
        "val must be > 0",
        ("bad.yaml", "data.split"),
    ),
    Row(
        "scale-reversed",
        "crop scale range reversed `augment: {scale: [0.9, 0.2]}`",
        "train --config bad.yaml",
        config_file({"data": {"augment": {"scale": [0.9, 0.2]}}}),
        2,
        "need 0 < low <= high <= 1",
        ("bad.yaml", "data.augment.scale"),
    ),
    Row(
        "no-data-root",
        "no `data.root`",
        "train --config bad.yaml",
        config_file(drop={"data": ["root"]}),
        2,
        "missing required key 'data.root'",
        ("bad.yaml",),
    ),
    # --- --set
    Row(
        "set-type",
        "`--set` with a value of the wrong type",
        "train --config good.yaml --set optim.lr=fast",
        config_file(name="good.yaml"),
        2,
        "optim.lr = 'fast': Input should be a valid number",
        ("good.yaml", "--set optim.lr=fast"),
    ),
    Row(
        "set-type-resume",
        "`--set` of the wrong type when resuming the earlier run",
        f"train --resume {LAST} --set train.epochs=3.5",
        nothing,
        2,
        "train.epochs = 3.5: Input should be a valid integer",
        (LAST,),
    ),
    Row(
        "set-unknown",
        "`--set` of an unknown key",
        "config show --config good.yaml --set optim.lrr=0.1",
        config_file(name="good.yaml"),
        2,
        "unknown key 'optim.lrr'; did you mean 'optim.lr'?",
        ("good.yaml",),
    ),
    Row(
        "set-below-value",
        "`--set` below a value",
        "train --config good.yaml --set optim.lr.max=1",
        config_file(name="good.yaml"),
        2,
        "'optim.lr' is not a section",
        ("--set 'optim.lr.max=1'",),
    ),
    Row(
        "set-no-value",
        "`--set` without `=`",
        "train --config good.yaml --set optim.lr",
        config_file(name="good.yaml"),
        2,
        "expected KEY=VALUE",
        ("--set 'optim.lr'",),
    ),
    # --- the data folder
    Row(
        "data-missing",
        "`data.root` that does not exist",
        "train --config bad.yaml",
        data_config("photos", lambda root: None),
        2,
        "data folder not found",
        ("photos",),
    ),
    Row(
        "data-is-file",
        "`data.root` that is a file",
        "train --config bad.yaml",
        data_config("photos", lambda root: root.write_text("x")),
        2,
        "data root is not a folder",
        ("photos",),
    ),
    Row(
        "data-empty",
        "an empty data folder",
        "train --config bad.yaml",
        data_config("photos", empty_folder),
        2,
        "no class folders found",
        ("photos",),
    ),
    Row(
        "one-class",
        "a data folder with one class",
        "train --config bad.yaml",
        data_config("photos", classes("cat")),
        2,
        "found one class (cat); a classifier needs at least two",
        ("photos",),
    ),
    Row(
        "empty-class",
        "a class folder without image files",
        "train --config bad.yaml",
        data_config("photos", with_empty_class),
        2,
        "class folder(s) without image files: emu",
        ("photos",),
    ),
    Row(
        "class-of-non-images",
        "a class whose files are not images",
        "train --config bad.yaml",
        data_config("photos", with_class_of_non_images),
        2,
        "class 'emu' has no readable image",
        ("photos",),
    ),
    Row(
        "non-image-in-data",
        "a text file named `.jpg` among the images",
        "eval {run}/best.pt --data photos",
        data_config("photos", data_with(lambda root: (root / "dog" / "notes.jpg").write_text("hello"))),
        0,
        "photos/dog/notes.jpg: not an image",
        works="the file is skipped and named in a warning",
    ),
    Row(
        "truncated-in-data",
        "a truncated JPEG among the images",
        "eval {run}/best.pt --data photos",
        data_config("photos", data_with(lambda root: truncated_jpeg(root / "fox" / "cut.jpg"))),
        0,
        "photos/fox/cut.jpg: cannot decode (image file is truncated",
        works="the file is skipped and named in a warning",
    ),
    Row(
        "symlink-loops",
        "symlink loops in the data folder (`cat/loop -> .`, `cat/up -> ..`)",
        "train --config bad.yaml",
        data_config("photos", symlink_loops, log={"tensorboard": False}),
        0,
        "train/val/test: 9/3/0",
        works="each image once, the loops are not followed",
    ),
    Row(
        "symlink-loops-glob",
        "a `**` pattern over a folder with symlink loops",
        "predict 'photos/**/*.jpg' --checkpoint {run}/best.pt",
        data_config("photos", symlink_loops),
        0,
        "photos/fox/fox_3.jpg",
        real_process=True,
        works="each image once, the loops are not followed",
    ),
    Row(
        "bomb-in-data",
        "a decompression bomb (PNG claiming 30000 x 30000) among the images",
        "eval {run}/best.pt --data photos",
        data_config("photos", data_with(bomb_in_data)),
        0,
        "photos/dog/bomb.png: too many pixels (decompression bomb guard)",
        works="the file is skipped and named in a warning",
    ),
    # --- images given to predict
    Row(
        "not-an-image",
        "a text file named `.jpg`",
        "predict notes.jpg --checkpoint {run}/best.pt",
        text_file("notes.jpg", "hello\n"),
        1,
        "not an image (unknown file format)",
        ("notes.jpg",),
    ),
    Row(
        "truncated-jpeg",
        "a truncated JPEG",
        "predict cut.jpg --checkpoint {run}/best.pt",
        lambda folder, world: truncated_jpeg(folder / "cut.jpg"),
        1,
        "corrupt image (image file is truncated",
        ("cut.jpg",),
    ),
    Row(
        "bomb-header",
        "decompression bomb: a PNG that claims 30000 x 30000 pixels",
        "predict bomb.png --checkpoint {run}/best.pt",
        header_bomb,
        1,
        "too many pixels (decompression bomb guard)",
        ("bomb.png",),
        real_process=True,
    ),
    Row(
        "bomb-real",
        "decompression bomb: 13000 x 13000 real pixels in 170 kB",
        "predict bomb.png --checkpoint {run}/best.pt",
        real_bomb,
        1,
        "too many pixels (decompression bomb guard)",
        ("bomb.png",),
        real_process=True,
    ),
    Row(
        "predict-no-images",
        "predict on a folder without images",
        "predict photos --checkpoint {run}/best.pt",
        with_predict_folder("readme.txt", "labels.csv"),
        1,
        "no image files in this folder",
        ("photos",),
    ),
    Row(
        "predict-empty-glob",
        "predict on a pattern that matches nothing",
        "predict 'photos/*.png' --checkpoint {run}/best.pt",
        with_predict_folder(),
        1,
        "no image file matches this pattern",
        ("photos/*.png",),
    ),
    # --- image formats that must work
    *[
        Row(
            f"format-{name.split('.')[0].replace('_', '-')}",
            what,
            f"predict {name} --checkpoint {BEST}",
            one_format(name),
            0,
            name,
            works="read as 8-bit RGB",
        )
        for name, what in [
            ("gray.jpg", "grayscale JPEG"),
            ("rgba.png", "RGBA PNG"),
            ("gray_alpha.png", "grayscale PNG with alpha"),
            ("gray16.png", "16-bit grayscale PNG"),
            ("cmyk.jpg", "CMYK JPEG"),
            ("palette.png", "palette PNG"),
            ("palette_alpha.png", "palette PNG with a transparent colour"),
            ("bilevel.png", "1-bit PNG"),
        ]
    ],
    Row(
        "formats-train",
        "a data folder of all those formats (and 16-bit/CMYK/32-bit/float TIFF, GIF)",
        "train --config bad.yaml",
        data_config("photos", formats_folder, log={"tensorboard": False}),
        0,
        "done in",
        works="trains",
    ),
    Row(
        "formats-eval",
        "the same folder to eval",
        "eval {run}/best.pt --data photos",
        data_config("photos", formats_folder),
        0,
        "all images of photos: 39 images",
        works="all 39 images evaluated",
    ),
    # --- checkpoints
    Row(
        "ckpt-truncated",
        "a truncated checkpoint",
        "eval half.pt",
        truncated_checkpoint,
        2,
        "not a readable checkpoint",
        ("half.pt",),
    ),
    Row(
        "ckpt-truncated-resume",
        "a truncated checkpoint to resume from",
        "train --resume half.pt",
        truncated_checkpoint,
        2,
        "not a readable checkpoint",
        ("half.pt",),
    ),
    Row(
        "ckpt-other-program",
        "a checkpoint of another program (`torch.save` of its own dict)",
        "predict {data}/cat/cat_0.jpg --checkpoint other.pt",
        other_program,
        2,
        "not a semodel checkpoint",
        ("other.pt",),
    ),
    Row(
        "ckpt-state-dict",
        "a bare state_dict",
        "eval weights.pth",
        plain_state_dict,
        2,
        "not a semodel checkpoint",
        ("weights.pth",),
    ),
    Row(
        "ckpt-text",
        "a text file as the checkpoint",
        "export notes.pt",
        text_file("notes.pt", "hello\n"),
        2,
        "not a readable checkpoint",
        ("notes.pt",),
    ),
    Row(
        "ckpt-code",
        "a checkpoint whose pickle would run `os.system` on load",
        "eval evil.pt",
        code_checkpoint("evil.pt", "zip"),
        2,
        "refused to load",
        ("evil.pt", "system"),
        real_process=True,
    ),
    Row(
        "ckpt-code-protocol-4",
        "the same with `exec`, pickle protocol 4, to resume from",
        "train --resume evil.pt",
        code_checkpoint("evil.pt", "zip-protocol-4"),
        2,
        "refused to load",
        ("evil.pt",),
    ),
    Row(
        "ckpt-code-legacy",
        "the same as a plain (pre-1.6) pickle file, to resume from",
        "train --resume evil.pt",
        code_checkpoint("evil.pt", "legacy"),
        2,
        "not a readable checkpoint",
        ("evil.pt", "not a PyTorch zip archive"),
    ),
    Row(
        "ckpt-code-pretrained",
        "the same as `model.pretrained`",
        "train --config bad.yaml",
        pretrained_config(code_checkpoint("evil.pt", "zip")),
        2,
        "refused to load",
        ("evil.pt", "system"),
    ),
    Row(
        "ckpt-code-predict",
        "the same for predict",
        "predict {data}/cat/cat_0.jpg --checkpoint evil.pt",
        code_checkpoint("evil.pt", "zip"),
        2,
        "refused to load",
        ("evil.pt",),
    ),
    Row("ckpt-folder", "a folder as the checkpoint", "eval {run}", nothing, 2, "is a folder", ("{run}",)),
    Row(
        "classes-eval",
        "a checkpoint for 3 classes, data with 4",
        "eval {run}/best.pt --data photos",
        data_config("photos", classes("bee", "cat", "dog", "fox", per_class=2)),
        2,
        "class folders do not match the checkpoint's classes",
        ("photos", "not in checkpoint: bee"),
    ),
    Row(
        "classes-resume",
        "resume the 3-class run on data with 4 classes",
        f"train --resume {LAST} --set data.root=photos",
        data_config("photos", classes("bee", "cat", "dog", "fox", per_class=2)),
        2,
        "the run was trained on the classes cat, dog, fox",
        ("photos", "bee, cat, dog, fox"),
    ),
    Row(
        "classes-resume-fewer",
        "resume the 3-class run on data with 2 classes",
        f"train --resume {LAST} --set data.root=photos",
        data_config("photos", classes("cat", "dog")),
        2,
        "the run was trained on the classes cat, dog, fox",
        ("photos",),
    ),
    Row(
        "num-classes",
        "`model.num_classes: 4` for data with 3 classes",
        "train --config bad.yaml",
        config_file({"model": {"num_classes": 4}}),
        2,
        "model.num_classes is 4 but",
        ("{data}",),
    ),
    # --- round two: YAML, outputs over inputs, resume, run folders, edited checkpoints
    Row(
        "yaml-duplicate-key",
        "a config with a second `optim:` block",
        "train --config bad.yaml",
        text_file(
            "bad.yaml", "data:\n  root: photos\noptim:\n  lr: 0.1\ntrain:\n  epochs: 1\noptim:\n  name: sgd\n"
        ),
        2,
        "key 'optim' appears twice (lines 3 and 7)",
        ("bad.yaml",),
    ),
    Row(
        "yaml-alias-bomb",
        'a "billion laughs" config (9 levels of aliases as `data.root`)',
        "config show --config bad.yaml",
        text_file("bad.yaml", alias_bomb()),
        2,
        "data.root = [[[[[[[[[['lol', 'lol'",
        ("bad.yaml", "Input should be a valid string"),
    ),
    Row(
        "yaml-deep",
        "a config nested 20000 levels deep",
        "config show --config bad.yaml",
        text_file("bad.yaml", "data: " + "[" * 20000 + "]" * 20000 + "\n"),
        2,
        "malformed YAML: nested too deeply",
        ("bad.yaml",),
    ),
    Row(
        "yaml-huge",
        "a 2 MB config file",
        "train --config bad.yaml",
        text_file("bad.yaml", "# padding\n" * 200_000),
        2,
        "is not a config file (at most 1,048,576 bytes)",
        ("bad.yaml",),
    ),
    Row(
        "eval-output-is-checkpoint",
        "`eval -o` naming the checkpoint itself",
        f"eval {BEST} -o {BEST}",
        nothing,
        2,
        "is the checkpoint itself",
        (BEST,),
    ),
    Row(
        "resume-best",
        "`--resume best.pt` (an earlier epoch)",
        f"train --resume {BEST}",
        nothing,
        2,
        "continue the run from",
        (BEST, LAST),
    ),
    Row(
        "resume-other-model",
        "resume with `--set model.name=` another model",
        f"train --resume {LAST} --set model.name=se_resnet34",
        nothing,
        2,
        "its training state does not fit the configured run",
        (LAST,),
    ),
    Row(
        "out-dir-file",
        "`log.out_dir` where a file is in the way",
        "train --config bad.yaml",
        with_file_in_the_way,
        2,
        "cannot create the run folder",
        ("runs/bad",),
    ),
    Row(
        "log-name-too-long",
        "a `log.name` longer than the file system allows",
        "train --config bad.yaml",
        config_file({"log": {"name": "n" * 300}}),
        2,
        "cannot create the run folder",
        ("File name too long",),
    ),
    Row(
        "out-dir-virtual",
        "`log.out_dir` on a virtual file system (`/proc`)",
        "train --config bad.yaml",
        config_file({"log": {"out_dir": "/proc/semodel-runs"}}),
        2,
        "cannot create the run folder /proc/semodel-runs/bad",
    ),
    Row(
        "hidden-only-class",
        "a class folder whose only images are in `.ipynb_checkpoints/`",
        "train --config bad.yaml",
        data_config("photos", with_hidden_only_class),
        2,
        "class folder(s) without image files: emu",
        ("photos", "hidden files and folders are skipped"),
    ),
    Row(
        "ckpt-extra-key",
        "a checkpoint whose stored config has an unknown key",
        "eval edited.pt --data {data}",
        edited_checkpoint(set_in("config", "model", "colour", value="red")),
        2,
        "unknown key 'model.colour'",
        ("edited.pt (stored config)",),
    ),
    Row(
        "ckpt-no-model-name",
        "a checkpoint whose stored config lacks `model.name`",
        "eval edited.pt --data {data}",
        edited_checkpoint(delete_in("config", "model", "name")),
        0,
        "all images of",
        works="the schema's default (se_resnet18, as trained) fits the weights",
    ),
    Row(
        "ckpt-no-resize",
        "a checkpoint whose preprocessing lacks `resize`",
        "predict {data}/cat/cat_0.jpg --checkpoint edited.pt",
        edited_checkpoint(delete_in("preprocess", "resize")),
        2,
        "is not the one its config implies",
        ("edited.pt",),
    ),
    Row(
        "ckpt-list-for-mapping",
        "a checkpoint whose stored `model` section is a list",
        "export edited.pt -o x.onnx",
        edited_checkpoint(set_in("config", "model", value=[1, 2])),
        2,
        "model = [1, 2]: Input should be a valid dictionary",
        ("edited.pt",),
    ),
    Row(
        "ckpt-absurd-size",
        "a checkpoint edited to 100000 px images",
        "inspect edited.pt --data {data} --out out",
        edited_checkpoint(absurd_image_size),
        2,
        "data.image_size = 100000: Input should be less than or equal to 2048",
        ("edited.pt",),
    ),
    Row(
        "ckpt-weights-other-model",
        "a checkpoint whose stored model name does not fit its weights",
        "eval edited.pt --data {data}",
        edited_checkpoint(set_in("config", "model", "name", value="se_resnet34")),
        2,
        "weights do not fit se_resnet34 as configured: ",
        ("missing (layer1.2.conv1.weight",),
    ),
]


def markdown_table(rows: list[Row] = ROWS) -> str:
    """The docs table: input, command, outcome; one line per row."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    def shown(command: str) -> str:
        for placeholder, text in SHOWN.items():
            command = command.replace(placeholder, text)
        return f"`semodel {command}`"

    lines = ["| input | command | outcome |", "|---|---|---|"]
    for row in rows:
        if row.code == 0:
            outcome = f"works: {row.works}"
        else:
            outcome = f"exit {row.code}, `error: ...{row.fragment}...`"
        lines.append(f"| {cell(row.input)} | {cell(shown(row.command))} | {cell(outcome)} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread (small models on 2 cores; see test_train.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    """The earlier run: a real 1-epoch training run whose files no bad input may change."""
    from semodel.train import train_from_cli

    base = tmp_path_factory.mktemp("bad_inputs")
    data = make_folder(base / "data", CLASSES, per_class=4)
    config = write_config(base / "earlier.yaml", tiny_config(data, base / "runs", "earlier"))
    run = train_from_cli(config, [], None, quiet=True)
    assert run == base / "runs" / "earlier"
    return World(base, data, base / "runs", run, config, base / "SENTINEL")


def snapshot(world: World, every_byte: bool = False) -> dict[str, tuple]:
    """Per file and folder of the earlier run, its data and its config: stat and content.

    Content is the bytes of files under 1 MiB; with ``every_byte`` also a hash of the larger
    ones (the checkpoints: 90 MB each, too slow to read after every row; their mtime, ctime and
    inode change with any write or replacement).
    """
    out: dict[str, tuple] = {}
    for top in (world.run, world.data, world.config):
        for path in [top, *sorted(top.rglob("*"))] if top.is_dir() else [top]:
            st = path.lstat()
            if path.is_dir():
                out[str(path)] = ("folder", st.st_ino)
                continue
            if st.st_size < MIB:
                content = path.read_bytes()
            else:
                content = hashlib.blake2b(path.read_bytes()).hexdigest() if every_byte else None
            out[str(path)] = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, content)
    return out


@pytest.fixture(scope="module")
def before(world: World) -> dict[str, dict[str, tuple]]:
    return {"stat": snapshot(world), "bytes": snapshot(world, every_byte=True)}


# ----------------------------------------------------------------------------- running a row


def resolve(text: str, world: World) -> str:
    return text.replace("{run}", str(world.run)).replace("{data}", str(world.data))


PYTHON_WARNING = re.compile(r"^\S.*:\d+: \w*Warning: ")


def check_output(row: Row, code: int, out: str, err: str, world: World) -> None:
    where = f"{row.id}: exit {code}\nstdout:\n{out[-2000:]}\nstderr:\n{err[-3000:]}"
    assert "Traceback" not in out + err, where
    assert not any(PYTHON_WARNING.match(line) for line in err.splitlines()), where
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == row.code, where
    if row.code == 0:
        assert errors == [], where
        assert row.fragment in out + err, where
        return
    assert len(errors) == 1, where
    assert row.fragment in errors[0], where
    for name in row.names:
        assert resolve(name, world) in errors[0], where


# ``python -m semodel ARGS``, and at exit the process's own peak memory (VmHWM, Linux) into the
# file $SEMODEL_TEST_PEAK. (RUSAGE_CHILDREN's ru_maxrss cannot be used: Linux folds the spawning
# process's peak into the child's at exec, so it grows with the test process, not the child.)
LAUNCH = """
import atexit, os, runpy, sys

def peak():
    try:
        with open("/proc/self/status") as status:
            kib = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return
    with open(os.environ["SEMODEL_TEST_PEAK"], "w") as out:
        out.write(kib)

atexit.register(peak)
sys.argv[0] = "semodel"
runpy.run_module("semodel", run_name="__main__", alter_sys=True)
"""


def run_real_process(args: list[str], peak_file: Path) -> tuple[int, str, str]:
    """``python -m semodel ARGS`` as a user runs it (Python warnings not silenced)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env["SEMODEL_TEST_PEAK"] = str(peak_file)
    proc = subprocess.run(
        [sys.executable, "-c", LAUNCH, *args], capture_output=True, text=True, timeout=120, env=env
    )
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_bad_input(row: Row, world: World, before, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "row"
    folder.mkdir()
    monkeypatch.chdir(folder)
    row.make(folder, world)
    args = [resolve(a, world) for a in shlex.split(row.command)]
    if row.real_process:
        peak_file = tmp_path / "peak_kib"
        code, out, err = run_real_process(args, peak_file)
        # No image decoded at full size: the process stays far below the 2.7 GB an RGB bomb needs.
        if peak_file.exists():  # (Linux: /proc/self/status)
            peak = int(peak_file.read_text())
            assert 0 < peak < 1536 * 1024, f"{row.id}: peak memory {peak // 1024} MiB"
    else:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            code, out, err = run_cli(args, capsys)
        # What a user would see on stderr between the lines (pytest records warnings instead).
        noisy = [
            f"{w.category.__name__}: {str(w.message)[:200]}"
            for w in caught
            if issubclass(w.category, (UserWarning, RuntimeWarning))
        ]
        assert noisy == [], f"{row.id}: warnings {noisy}"
    check_output(row, code, out, err, world)
    assert not world.sentinel.exists(), f"{row.id}: a pickle ran code"
    assert snapshot(world) == before["stat"], f"{row.id}: a file of the earlier run changed"


# ----------------------------------------------------------------------------- around the table


def test_table_covers_the_issue():
    ids = {row.id for row in ROWS}
    assert len(ROWS) >= 25 and len(ids) == len(ROWS)
    assert sum(row.real_process for row in ROWS) >= 2
    assert any(row.code == 0 and row.id.startswith("format-") for row in ROWS)


def test_docs_show_this_table():
    text = TABLE_PAGE.read_text(encoding="utf-8")
    assert START in text and END in text, "docs/reliability.md has no bad-input-table markers"
    block = text.split(START, 1)[1].split(END, 1)[0]
    assert block == "\n" + markdown_table(), "the docs table is stale: run `python tests/test_bad_inputs.py`"


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_odd_formats_load_as_rgb(name, tmp_path):
    path = format_image(tmp_path / name, seed=3)
    with Image.open(path) as img:
        assert img.mode == MODES[name]
    assert check_image(path) is None
    image = load_rgb(path)
    assert image.mode == "RGB" and image.size == (20, 24)
    preprocess = {"image_size": 16, "resize": 18, "mean": [0.5] * 3, "std": [0.25] * 3}
    assert preprocess_image(image, preprocess).shape == (3, 16, 16)


def test_16_bit_keeps_its_range(tmp_path):
    """16-bit values are scaled to 8 bits, not clipped at 255 (which would make every pixel white)."""
    path = tmp_path / "ramp16.png"
    Image.fromarray(np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)).save(path)
    values = np.asarray(load_rgb(path))[..., 0].ravel()
    assert values.min() == 0 and values.max() == 255 and len(set(values.tolist())) > 50


def _too_slow(signum, frame):
    raise TimeoutError("collect_inputs did not finish in 30 s")


def test_symlink_loops_give_each_file_once_with_its_class(tmp_path):
    root = tmp_path / "photos"
    symlink_loops(root)
    data = scan_dataset(root)
    assert sorted((s.path, data.classes[s.label]) for s in data.samples) == sorted(
        (f"{c}/{c}_{i}.jpg", c) for c in CLASSES for i in range(4)
    )
    signal.signal(signal.SIGALRM, _too_slow)
    signal.alarm(30)  # glob's `**` followed the loops for ever
    try:
        paths, problems = collect_inputs([str(root / "**" / "*.jpg"), str(root)])
    finally:
        signal.alarm(0)
    assert problems == [] and len(paths) == 12 and len({p.resolve() for p in paths}) == 12


def test_nothing_of_the_earlier_run_changed_byte_for_byte(world, before):
    """After all the rows (this test runs last): every byte, checkpoints included."""
    assert snapshot(world, every_byte=True) == before["bytes"]
    assert not world.sentinel.exists()


# ----------------------------------------------------------------------------- the docs table


def update_readme() -> None:
    text = TABLE_PAGE.read_text(encoding="utf-8")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    TABLE_PAGE.write_text(f"{head}{START}\n{markdown_table()}{END}{tail}", encoding="utf-8")
    print(f"updated the bad-input table in {TABLE_PAGE} ({len(ROWS)} rows)")


if __name__ == "__main__":
    update_readme()
