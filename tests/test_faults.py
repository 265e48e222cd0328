"""Faults during training: SIGKILL at random moments, a full disk while writing a checkpoint, an
image that vanishes after the scan, a DataLoader worker that dies.

The kill loop is ``scripts/kill_resume.py`` in reduced form (3 kills, 2 epochs); run it in full
with ``python scripts/kill_resume.py --kills 20``. Everything that could hang runs in a subprocess
with a timeout.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers_ckpt import assert_one_line_error, make_folder, run_cli
from helpers_train import (
    load_ckpt,
    one_torch_thread,  # noqa: F401  (autouse fixture: one torch thread)
    tiny_config,
    write_config,
)

import semodel.train

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
TIMEOUT = 180
MORE_EPOCH = ["--set", "train.epochs=2", "--quiet"]  # resume a 1-epoch run for one more


def kill_resume():
    """scripts/kill_resume.py as a module (scripts/ is no package)."""
    if "kill_resume" not in sys.modules:
        spec = importlib.util.spec_from_file_location("kill_resume", SCRIPTS / "kill_resume.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["kill_resume"] = module  # before running it: its dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules["kill_resume"]


def run_semodel(args: list[str], wrapper: str = "", limit_file_size: int | None = None):
    """``semodel ARGS`` in a fresh process (after running ``wrapper``, a test-only patch), with a timeout."""

    def limits() -> None:
        # A "disk" that takes no file larger than this: writes beyond it fail with EFBIG.
        if limit_file_size is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_size, limit_file_size))

    code = (
        f"import sys\n{wrapper}\nimport semodel.cli\nsys.argv = ['semodel', *sys.argv[1:]]\n"
        "semodel.cli.main()\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=env,
        preexec_fn=limits,
    )


def files(run_dir: Path) -> dict[str, bytes]:
    return {name: (run_dir / name).read_bytes() for name in ("last.pt", "best.pt")}


def temp_files(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if p.name.endswith(".tmp"))


# ----------------------------------------------------------------------------- SIGKILL and resume


def test_sigkill_at_random_moments_corrupts_nothing_and_resume_is_exact(tmp_path):
    """Reference run, then 3 SIGKILLs aimed at a checkpoint write, a training step and validation."""
    script = kill_resume()
    lines: list[str] = []
    report = script.kill_loop(
        tmp_path,
        kills=3,
        seed=0,
        epochs=2,
        aims=["save", "train", "val"],
        tensorboard=False,
        say=lines.append,
    )
    log = "\n".join(lines)
    assert len(report.kills) == 3 and not report.completed_early, log
    assert report.corrupted == 0, log
    assert all(k.checkpoints or k.start == "fresh" for k in report.kills), log
    assert report.final_rc == 0, log
    assert report.differences == [], log  # every tensor of last.pt and best.pt, metrics.json
    assert report.leftover_temp_files == [], log
    assert report.ok
    assert report.summary() == "kills survived: 3 / corrupted checkpoints: 0 / final weights match: yes"


def test_kill_loop_helpers():
    script = kill_resume()
    trace = [
        (0.0, "+", "startup"),
        (1.0, "-", "startup"),
        (1.0, "+", "train 1"),
        (2.0, "-", "train 1"),
        (2.0, "+", "save last.pt 1"),
    ]
    assert script.landed_in(trace) == "save last.pt 1"
    assert script.landed_in(trace[:4]) == "between phases (after train 1)"
    assert script.landed_in([]) == "startup"
    assert script.category("between phases (after train 1)", [".last.pt.abc.tmp"]) == "checkpoint write"
    assert script.category("val 2", []) == "validation"
    trace += [(2.5, "-", "save last.pt 1"), (2.5, "+", "val 1"), (2.6, "-", "val 1")]
    durations = script.phase_durations(trace)
    assert durations["train"] == 1.0 and durations["save"] == 0.5 and durations["val"] == pytest.approx(0.1)


def test_stale_checkpoint_temp_files_are_removed_on_resume(one_epoch, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(one_epoch, run_dir)
    stale = [run_dir / ".last.pt.k1ll3d.tmp", run_dir / ".best.pt.x9x9x9.tmp"]
    for path in stale:
        path.write_bytes(b"PK\x03\x04 half a checkpoint")
    (run_dir / "notes.tmp").write_text("not ours")
    code, out, err = run_cli(["train", "--resume", run_dir / "last.pt", *MORE_EPOCH], capsys)
    assert code == 0, err
    assert "removed 2 unfinished checkpoint temp file(s)" in out
    assert temp_files(run_dir) == ["notes.tmp"]
    assert load_ckpt(run_dir / "last.pt")["epoch"] == 2


# ----------------------------------------------------------------------------- full disk, I/O errors


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory):
    """A finished 1-epoch run (last.pt, best.pt); tests copy its folder before touching it."""
    base = tmp_path_factory.mktemp("faults")
    root = make_folder(base / "data", per_class=4)
    config = write_config(base / "one.yaml", tiny_config(root, base / "runs", "one", train={"epochs": 1}))
    return semodel.train.train_from_cli(config, [], None, quiet=True)


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _half_written_then_no_space(obj, f, *args, **kwargs):
    f.write(b"PK\x03\x04" + bytes(4096))
    _no_space()


@pytest.mark.parametrize("fault", ["torch.save", "os.fsync", "os.replace"])
def test_full_disk_while_writing_a_checkpoint_keeps_the_previous_one(
    fault, one_epoch, tmp_path, monkeypatch, capsys
):
    run_dir = tmp_path / "run"
    shutil.copytree(one_epoch, run_dir)
    before = files(run_dir)
    if fault == "torch.save":
        monkeypatch.setattr(torch, "save", _half_written_then_no_space)
    elif fault == "os.fsync":
        monkeypatch.setattr(os, "fsync", _no_space)
    else:
        real_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            if str(dst).endswith(".pt"):
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            return real_replace(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, "replace", replace)
    code, out, err = run_cli(["train", "--resume", run_dir / "last.pt", *MORE_EPOCH], capsys)
    assert_one_line_error(code, err, "error: could not write checkpoint", run_dir)
    reason = "Input/output error" if fault == "os.replace" else "No space left on device"
    assert reason in err and f"resume with: semodel train --resume {run_dir / 'last.pt'}" in err, err
    assert files(run_dir) == before  # byte for byte
    assert temp_files(run_dir) == []
    monkeypatch.undo()
    if fault == "os.fsync":  # once there is room again, the run goes on from last.pt
        code, out, err = run_cli(["train", "--resume", run_dir / "last.pt", *MORE_EPOCH], capsys)
        assert code == 0, err
        assert load_ckpt(run_dir / "last.pt")["epoch"] == 2


def test_real_write_error_from_the_kernel_keeps_the_previous_checkpoint(one_epoch, tmp_path):
    """RLIMIT_FSIZE makes the kernel fail the checkpoint's writes (EFBIG) part-way, inside torch.save.

    torch's writer reports that as a bare RuntimeError ("unexpected pos ..."); semodel must still
    say what happened, in one line, and keep the previous files.
    """
    run_dir = tmp_path / "run"
    shutil.copytree(one_epoch, run_dir)
    before = files(run_dir)
    # The checkpoints have 135 MB; the rest of the run folder fits.
    result = run_semodel(["train", "--resume", run_dir / "last.pt", *MORE_EPOCH], limit_file_size=8 << 20)
    assert_one_line_error(result.returncode, result.stderr, "error: could not write checkpoint", run_dir)
    assert "File too large" in result.stderr, result.stderr
    assert files(run_dir) == before
    assert temp_files(run_dir) == []


# ----------------------------------------------------------------------------- vanishing images, dead workers


@pytest.mark.parametrize("cache", ["auto", "none"])  # decoded once at the start, or read every epoch
def test_image_deleted_after_the_scan_is_skipped(cache, tmp_path, monkeypatch, capsys):
    root = make_folder(tmp_path / "data", per_class=4)
    raw = tiny_config(root, tmp_path / "runs", "gone", data={"cache": cache}, train={"epochs": 2})
    config = write_config(tmp_path / "gone.yaml", raw)
    real_prepare = semodel.train.prepare_dataset
    deleted = []

    def prepare_then_delete(*args, **kwargs):
        data = real_prepare(*args, **kwargs)
        for split in ("train", "val"):  # gone between the scan (and split.csv) and the first read
            path = data.root / data.split(split)[0].path
            path.unlink()
            deleted.append(path)
        return data

    monkeypatch.setattr(semodel.train, "prepare_dataset", prepare_then_delete)
    code, out, err = run_cli(["train", "--config", config, "--quiet"], capsys)
    assert code == 0, err
    for path in deleted:
        assert f"warning: skipping {path}: " in err, err
    assert "Traceback" not in err
    run_dir = tmp_path / "runs" / "gone"
    assert (run_dir / "metrics.json").exists() and load_ckpt(run_dir / "last.pt")["epoch"] == 2


# The train transform, wrapped to end the DataLoader worker process that runs it at its N-th image.
DIE_IN_WORKER = """
import os, signal, semodel.data
from torch.utils.data import get_worker_info
real = semodel.data.train_transform
def train_transform(cfg):
    inner, calls = real(cfg), [0]
    def transform(image):
        if get_worker_info() is not None:
            calls[0] += 1
            if calls[0] == {at}:
                {how}
        return inner(image)
    return transform
semodel.data.train_transform = train_transform
"""


@pytest.mark.parametrize("how", ["sigkill", "exit"])
def test_dataloader_worker_that_dies_ends_the_run_with_a_clear_message(how, tmp_path):
    root = make_folder(tmp_path / "data", per_class=4)  # 9 training images: 1 step per epoch
    # DataLoader workers decode the uncached path's images (data.cache decodes them in the main process)
    raw = tiny_config(
        root, tmp_path / "runs", "w", data={"num_workers": 1, "cache": "none"}, train={"epochs": 2}
    )
    config = write_config(tmp_path / "w.yaml", raw)
    run_dir = tmp_path / "runs" / "w"
    if how == "sigkill":  # killed (as by the OOM killer) at the first image of epoch 2: last.pt has epoch 1
        wrapper = DIE_IN_WORKER.format(at=10, how="os.kill(os.getpid(), signal.SIGKILL)")
    else:  # exits at its first image: no checkpoint yet
        wrapper = DIE_IN_WORKER.format(at=1, how="os._exit(1)")
    result = run_semodel(["train", "--config", config, "--quiet"], wrapper)
    assert_one_line_error(result.returncode, result.stderr, "a data loader worker process died")
    if how == "sigkill":
        # torch words it "is killed by signal: Killed" or "exited unexpectedly", by which check sees it first
        assert "is killed by signal" in result.stderr or "exited unexpectedly" in result.stderr, result.stderr
        assert (
            f"{run_dir / 'last.pt'} is kept; resume with: semodel train --resume {run_dir / 'last.pt'}"
            in result.stderr
        ), result.stderr
        assert load_ckpt(run_dir / "last.pt")["epoch"] == 1  # (resuming it is what the kill loop tests)
    else:
        assert "exited unexpectedly" in result.stderr, result.stderr
        assert "no checkpoint had been written yet" in result.stderr, result.stderr


def test_checkpoint_file_mode_follows_the_umask(tmp_path):
    """The temp file behind the atomic write is made 0600; the checkpoint gets the usual mode."""
    import stat

    from semodel.checkpoint import save_checkpoint

    old = os.umask(0o027)
    try:
        path = save_checkpoint({"x": 1}, tmp_path / "a.pt")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_text_files_are_written_atomically(tmp_path, monkeypatch):
    """config.yaml, split.csv, metrics.json and eval's JSON share one atomic writer: a failed
    write is one clear error, the previous file is kept and no temp file is left."""
    import errno

    from semodel.errors import SemodelError
    from semodel.files import write_text_atomic

    path = write_text_atomic(tmp_path / "metrics.json", "old\n")

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(SemodelError, match="could not write .*metrics.json: No space left on device"):
        write_text_atomic(path, "new\n")
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]
