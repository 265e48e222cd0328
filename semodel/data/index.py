"""The file index: one pass over a data folder's images, kept beside the data.

For every image one read gives what every later question needs: whether it decodes (and why
not), its size, a content hash (byte-identical copies) and a perceptual hash that does not
change when the photo is flipped or rotated by a multiple of 90 degrees (near copies; see
``dct_hashes``). The pass runs in worker processes (decoding holds the GIL more than one hopes).

The results are kept in ``.semodel-index.json`` at the data root, or, where that folder is not
writable, in the user's cache folder (``$XDG_CACHE_HOME/semodel/index/``, default ``~/.cache``),
keyed by each file's path, size and modification time: the next start hashes only what changed,
drops what is gone, and a cache from another version, truncated or edited, is ignored and
rebuilt. The file is replaced atomically, so two runs starting at once on one folder each read a
whole index (the last writer's stays).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from semodel.data.images import UNREADABLE, open_image, probe_failure, usable_cpus

INDEX_NAME = ".semodel-index.json"
INDEX_VERSION = 3  # bump whenever what an entry holds, or how a hash is computed, changes
HASH_SIDE = 32  # the grayscale thumbnail the DCT is taken of
HASH_FREQS = 8  # its lowest 8 x 8 frequencies give the 64 bits


@dataclass
class Entry:
    """What the pass knows of one file. ``error``: why it is not a usable image (None if it is);
    ``sha``: a hash of its bytes; ``phash``: the 8 perceptual hashes of its flips and rotations
    (the first is the photo's own), 64-bit integers; ``chash``: the same of the thumbnail's central
    half, which tells apart photos whose borders alone look alike (rotated copies' black corners)."""

    size: int
    mtime_ns: int
    error: str | None = None
    height: int = 0
    width: int = 0
    sha: str = ""
    phash: tuple[int, ...] = ()
    chash: tuple[int, ...] = ()

    def row(self) -> list:
        return [
            self.size, self.mtime_ns, self.error, self.height, self.width, self.sha,
            list(self.phash), list(self.chash),
        ]  # fmt: skip

    @classmethod
    def of_row(cls, row: list) -> Entry:
        size, mtime_ns, error, height, width, sha, phash, chash = row
        if not all(isinstance(v, int) for v in (size, mtime_ns, height, width, *phash, *chash)):
            raise ValueError("not an index row")
        return cls(size, mtime_ns, error, height, width, str(sha), tuple(phash), tuple(chash))


# ----------------------------------------------------------------------------- hashing


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    m = np.cos(np.pi * (2 * np.arange(n)[None, :] + 1) * k / (2 * n)) * np.sqrt(2 / n)
    m[0] /= np.sqrt(2)
    return m


DCT = _dct_matrix(HASH_SIDE)
DCT_CENTRE = _dct_matrix(HASH_SIDE // 2)
# A flip of the image changes the sign of the odd frequencies along its axis; a transpose
# transposes the coefficients. The 8 flips and rotations are these sign patterns, with and
# without the transpose: all 8 hashes come from one DCT.
_ODD = (-1.0) ** np.arange(HASH_FREQS)
SIGNS = np.stack([np.outer(a, b) for a in (np.ones(HASH_FREQS), _ODD) for b in (np.ones(HASH_FREQS), _ODD)])


def dct_hashes(gray: np.ndarray) -> tuple[int, ...]:
    """The DCT hash of a square grayscale thumbnail (float) and of its 7 other flips and
    rotations, the image's own first: 64 bits each, one per low frequency, set where it is above
    the median of the 64 (an even count: the median lies between two of them, so a rounding error
    cannot move a coefficient across it)."""
    dct = DCT if len(gray) == HASH_SIDE else DCT_CENTRE
    c = (dct @ gray @ dct.T)[:HASH_FREQS, :HASH_FREQS]
    variants = (np.stack([c, c.T])[:, None] * SIGNS[None]).reshape(8, -1)
    middle = np.sort(variants, axis=1)[:, 31:33].mean(axis=1, keepdims=True)  # the median of 64
    above = variants > middle
    return tuple(int(v) for v in np.packbits(above, axis=1).view(">u8")[:, 0])


def thumbnail(img: Image.Image) -> np.ndarray:
    img.draft("L", (HASH_SIDE, HASH_SIDE))  # JPEG: decode at reduced scale (every byte is still read)
    # a continuous filter: a box one treats a pixel on a window edge differently from its mirror image
    gray = img.convert("L").convert("F").resize((HASH_SIDE, HASH_SIDE), Image.Resampling.BILINEAR)
    return np.asarray(gray, dtype=np.float64)


def probe(path: Path) -> Entry:
    """One read of ``path``: its stat, content hash, size and perceptual hashes, or its error."""
    st = os.stat(path)
    entry = Entry(st.st_size, st.st_mtime_ns)
    try:
        data = path.read_bytes()
        entry.sha = hashlib.blake2b(data, digest_size=16).hexdigest()
        with open_image(io.BytesIO(data)) as img:
            entry.height, entry.width = img.height, img.width
            gray = thumbnail(img)
            entry.phash = dct_hashes(gray)
            quarter = HASH_SIDE // 4
            entry.chash = dct_hashes(gray[quarter:-quarter, quarter:-quarter])
    except UNREADABLE as e:
        entry.error = probe_failure(e)
        entry.height = entry.width = 0
        entry.phash = entry.chash = ()
    return entry


def _probe_many(paths: Sequence[str]) -> list[list]:
    out = []
    for p in paths:
        try:
            out.append(probe(Path(p)).row())
        except OSError as e:  # gone between the listing and the read
            out.append(Entry(0, 0, probe_failure(e)).row())
    return out


# ----------------------------------------------------------------------------- the cache file


def is_writable(folder: Path) -> bool:
    """Writable by this process and meant to be: root may write anywhere, but a folder without any
    write bit is read-only by intent (a shared data set)."""
    try:
        return os.access(folder, os.W_OK) and bool(os.stat(folder).st_mode & 0o222)
    except OSError:
        return False


def user_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "semodel" / "index"


def index_file(root: Path) -> Path:
    """Where the index of ``root`` is kept: beside the data, else in the user's cache folder."""
    root = Path(root)
    if is_writable(root):
        return root / INDEX_NAME
    key = hashlib.blake2b(os.path.realpath(root).encode("utf-8", "surrogateescape"), digest_size=8)
    return user_cache_dir() / f"{key.hexdigest()}.json"


def read_index(path: Path) -> dict[str, Entry]:
    """The entries of an index file; empty when it is missing, from another version, or damaged."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            stored = json.load(f)
        if not isinstance(stored, dict) or stored.get("version") != INDEX_VERSION:
            return {}
        return {str(p): Entry.of_row(row) for p, row in stored["files"].items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}


def write_index(path: Path, entries: dict[str, Entry]) -> bool:
    """Replace the index file atomically (a temp file of its own, then a rename); False where it
    cannot be written (the run goes on without it)."""
    payload = {"version": INDEX_VERSION, "files": {p: e.row() for p, e in entries.items()}}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as f:
            json.dump(payload, f, separators=(",", ":"))
        os.replace(tmp, path)
        return True
    except OSError:
        if "tmp" in locals():
            Path(tmp).unlink(missing_ok=True)
        return False


# ----------------------------------------------------------------------------- the pass


@dataclass
class Index:
    """The index of a data folder's images: an entry per path (relative, POSIX), where it is kept,
    and how many entries this pass had to make (the rest came from the cache)."""

    entries: dict[str, Entry]
    file: Path
    probed: int
    saved: bool


def current(entry: Entry | None, st: os.stat_result) -> bool:
    return entry is not None and entry.size == st.st_size and entry.mtime_ns == st.st_mtime_ns


def build_index(
    root: Path, paths: Sequence[str], workers: int | None = None, progress: bool = False
) -> Index:
    """The entries of ``paths`` (relative to ``root``): from the cache where a file's size and
    modification time are unchanged, else read now in ``workers`` processes (``progress``: a bar
    on the terminal while they are read); the cache is then rewritten with exactly these paths."""
    root = Path(root)
    file = index_file(root)
    cached = read_index(file)
    entries: dict[str, Entry] = {}
    todo: list[str] = []
    for p in paths:
        try:
            st = os.stat(root / p)
        except OSError as e:
            entries[p] = Entry(0, 0, probe_failure(e))
            continue
        if current(cached.get(p), st):
            entries[p] = cached[p]
        else:
            todo.append(p)
    bar = None
    if progress and len(todo) >= 500:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc=f"reading {len(todo)} images once", unit="img", leave=False)
    try:
        rows = probe_all(root, todo, workers, bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    for p, row in zip(todo, rows, strict=True):
        entries[p] = Entry.of_row(row)
    changed = bool(todo) or set(cached) != set(entries)
    saved = write_index(file, entries) if changed else True
    return Index({p: entries[p] for p in paths}, file, len(todo), saved)


def probe_all(
    root: Path, paths: Sequence[str], workers: int | None, advance: Callable[[int], object] | None
) -> list[list]:
    """Rows for ``paths``, read in chunks by a pool of processes (in this process when few)."""
    full = [str(root / p) for p in paths]
    workers = workers or usable_cpus()
    if workers <= 1 or len(full) < 64:
        return _probe_many(full)
    chunk = max(16, min(256, len(full) // (workers * 8) or 16))
    chunks = [full[i : i + chunk] for i in range(0, len(full), chunk)]
    rows: list[list] = []
    with ProcessPoolExecutor(workers) as pool:
        for part in pool.map(_probe_many, chunks):
            rows += part
            if advance is not None:
                advance(len(part))
    return rows
