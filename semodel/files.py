"""Files: atomic writes (text, JSON, tensors), the one safe ``torch.load``, and run-folder names.

Every file semodel writes appears complete or not at all: it is written to a temp file in the
same folder and renamed over the target, so a crash, a full disk or a kill never leaves half a
file, and the previous version stays until the new one is complete.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import tempfile
import threading
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from semodel.errors import SemodelError, first_line

# What torch.load raises for a file that is corrupt, truncated or not a torch file at all: the
# unpickler meets bytes it cannot parse (UnpicklingError, EOFError, IndexError, KeyError,
# ValueError), the zip reader a bad archive (RuntimeError, BadZipFile), the OS a read error.
UNREADABLE = (
    pickle.UnpicklingError,
    RuntimeError,
    EOFError,
    IndexError,
    KeyError,
    ValueError,
    OSError,
    zipfile.BadZipFile,
)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a text file atomically; a failure is one SemodelError and the old file stays."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        # surrogateescape: a file name that is not valid UTF-8 (os.listdir gives it with surrogate
        # escapes) is written as its original bytes, and read back the same way.
        tmp.write_text(text, encoding="utf-8", errors="surrogateescape")
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise SemodelError(
                f"could not write {path}: {e.strerror or e}; the previous file (if any) is unchanged"
            ) from None
        raise
    return path


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SemodelError(f"{path}: not readable ({first_line(e)})") from None


def refuse_overwrite(output: Path, option: str, inputs: dict[str, Path]) -> None:
    """No command writes over its own input: refuse an ``output`` that is one of ``inputs``
    (by name: ``{"the checkpoint": path}``), also through links or another spelling of the path."""
    if not output.exists():
        return
    for what, path in inputs.items():
        if path.exists() and os.path.samefile(output, path):
            raise SemodelError(f"{option} {output} is {what} itself; choose another file name")


# ----------------------------------------------------------------------------- tensors


def save_atomic(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj)`` to ``path`` atomically: a temp file in the same folder, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            out = _WriteErrors(f)
            try:
                torch.save(obj, out)
            except RuntimeError:
                if out.error is None:
                    raise
                raise out.error from None  # the OSError (disk full, ...) behind torch's bare RuntimeError
            f.flush()
            os.chmod(f.fileno(), 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise SemodelError(
                f"could not write checkpoint {path}: {e.strerror or e}; "
                "the previous file (if any) is unchanged"
            ) from None
        raise
    _fsync_dir(path.parent)
    return path


class BackgroundWriter:
    """Writes (e.g. checkpoints) on one background thread, one at a time, so that training goes on
    while a file is serialised, written and synced.

    ``submit`` waits for the previous write before starting the next; ``wait`` blocks until the
    write in flight is done. Either raises the error of a write that failed (a ``SemodelError``
    such as ``save_atomic``'s "could not write checkpoint ...", or the bug's own exception), in
    the thread that called it. Call ``wait`` before the files are read and before the process ends
    or raises (the thread is not a daemon: an exiting interpreter lets it finish its file).
    ``busy``: seconds the thread has spent writing.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._job: Callable[[], Any] | None = None
        self._error: BaseException | None = None
        self.busy = 0.0

    def submit(self, write: Callable[[], Any]) -> None:
        self.wait()
        self._job = write  # held here only: the thread drops it (and the state it writes) when done
        self._thread = threading.Thread(target=self._run, name="semodel-writer")
        self._thread.start()

    def _run(self) -> None:
        t0 = time.perf_counter()
        write, self._job = self._job, None
        try:
            write()
        except BaseException as e:  # handed to the thread that waits: it decides what the error means
            self._error = e
        finally:
            del write  # the written state is freed here ...
            return_freed_memory()  # ... and its memory handed back
            self.busy += time.perf_counter() - t0

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()  # (a second Ctrl-C here leaves the thread to finish its file)
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error


def return_freed_memory() -> None:
    """Hand the heap memory freed by a checkpoint's CPU copy back to the OS (glibc's malloc_trim).

    glibc keeps freed memory for reuse, and copies of 100+ MB made and freed at every epoch grow a
    process by a few hundred MB (measured: 6 tiny runs in one process, +200 MB without this, +0
    with it). A no-op where the C library has no malloc_trim (macOS, musl).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    import ctypes

    try:
        return ctypes.CDLL(None).malloc_trim  # the C library this process runs on
    except (OSError, AttributeError):
        return None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class _WriteErrors:
    """The file for ``torch.save``, remembering the OSError of a failed write.

    torch's zip writer turns an exception of ``write`` into a RuntimeError that only says
    "unexpected pos 704 vs 598"; the OSError says what happened (no space left, file too large).
    """

    def __init__(self, file: Any) -> None:
        self.file, self.error = file, None

    def write(self, data: bytes) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.file.flush()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temp_files(folder: Path) -> int:
    """Delete the temp files of checkpoint writes that a crash or SIGKILL cut short; their number.

    Only ``save_atomic``'s names for checkpoints (``.last.pt.<random>.tmp``); call it when no
    other process writes checkpoints into ``folder``.
    """
    removed = 0
    for name in ("last.pt", "best.pt"):
        for tmp in Path(folder).glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


def torch_load_weights(path: Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` without torch's warnings (several lines on stderr,
    e.g. about the pickle protocol of a file that it then refuses anyway)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(path, map_location=map_location, weights_only=True)


def refusal_reason(error: Exception) -> str:
    """One line for a file that ``weights_only`` refused, naming what it wanted to load.

    torch's message is a paragraph about its defaults; the line that matters names the global,
    e.g. ``Trying to load unsupported GLOBAL posix.system whose module posix is blocked.``
    """
    lines = [line.strip().removeprefix("WeightsUnpickler error:").strip() for line in str(error).splitlines()]
    lines = [line for line in lines if line]
    detail = next((line for line in lines if "GLOBAL" in line), None)
    # torch < 2.4 puts it at the end of one long line: "... WeightsUnpickler error: Unsupported class x"
    unsupported = (line[line.index("Unsupported") :] for line in lines if "Unsupported" in line)
    detail = detail or next(unsupported, None)
    detail = (detail or (lines[0] if lines else type(error).__name__)).split(" Please use ")[0]
    what = "it holds Python objects, not only tensors and plain data (loading it could run code)"
    return f"{what}: {detail[:200]}"


def read_weights_only(path: Path, what: str, map_location: str | torch.device = "cpu") -> Any:
    """Load a torch file that may come from anyone: plain tensors and data only, never code.

    A file that would run code is refused ("refused to load"); one that cannot be read is
    "not a readable <what>", with the reader's first line.
    """
    try:
        return torch_load_weights(path, map_location)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise SemodelError(f"{path}: refused to load: {refusal_reason(e)}") from None
        raise SemodelError(f"{path}: not a readable {what} (corrupt or truncated: {first_line(e)})") from None
    except UNREADABLE as e:
        raise SemodelError(f"{path}: not a readable {what} (corrupt or truncated: {first_line(e)})") from None


def is_zip_archive(path: Path) -> bool:
    """Every ``torch.save`` since PyTorch 1.6 writes a zip archive; a plain pickle is not read."""
    return zipfile.is_zipfile(path)


# ----------------------------------------------------------------------------- run folders


def run_name(name: str | None, config_path: Path | None, default: str) -> str:
    """A run's folder name: ``log.name``, else the config file's stem, else ``default``."""
    return name or (Path(config_path).stem if config_path else default)


def numbered(base: Path, name: str) -> Iterator[Path]:
    """``base/name``, ``base/name-2``, ``base/name-3``, ...: the folder names a run may take."""
    yield base / name
    n = 2
    while True:
        yield base / f"{name}-{n}"
        n += 1


def make_run_dir(base: Path, name: str) -> Path:
    """Create and return the first of ``numbered(base, name)`` that does not exist yet.

    ``mkdir`` without ``exist_ok`` is the test and the claim in one step, so two runs started
    at the same moment with the same name get two folders.
    """
    candidate = base / name
    try:
        base.mkdir(parents=True, exist_ok=True)
        for candidate in numbered(base, name):
            try:
                candidate.mkdir()
            except FileExistsError:
                continue
            return candidate
    except OSError as e:
        raise SemodelError(
            f"cannot create the run folder {candidate}: {e.strerror or first_line(e)}"
        ) from None
    raise AssertionError("unreachable")  # numbered() never ends
