"""Issue 19: the run's time budget, background checkpoint writes, the fused optimizer, the slim best.pt.

One tiny run (2 epochs, EMA, a test split) serves most tests; the figures themselves are measured
by ``scripts/bench_endtoend.py`` (docs/performance.md), not here.
"""

from __future__ import annotations

import collections
import csv
import errno
import inspect
import io
import json
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch
from helpers_ckpt import assert_one_line_error, make_folder, run_cli
from helpers_train import (
    assert_same_tensors,
    load_ckpt,
    one_torch_thread,  # noqa: F401  (autouse fixture: one torch thread)
    tiny_config,
    write_config,
)

import semodel.data
import semodel.data.cache
import semodel.data.loading
import semodel.train
from semodel.checkpoint import (
    best_state,
    build_from_checkpoint,
    load_checkpoint,
    load_resumable,
    save_checkpoint,
)
from semodel.config import load_config, validate
from semodel.errors import SemodelError
from semodel.files import BackgroundWriter
from semodel.loaders import KeptBatches
from semodel.models import build_model
from semodel.optim import fast_kernels, make_optimizer, param_groups
from semodel.timing import PARTS, Budget, timed


def finished_run(base: Path, cache: str) -> dict:
    """A finished 2-epoch run with EMA and a test split, with the images it decoded and the sizes of
    its evaluation passes."""
    root = make_folder(base / "data", per_class=8)
    raw = tiny_config(
        root,
        base / "runs",
        "speed",
        data={"split": {"val": 0.25, "test": 0.25, "seed": 0}, "cache": cache},
        train={"epochs": 2, "ema": True, "ema_decay": 0.5},
    )
    config = write_config(base / "speed.yaml", raw)
    lines: list[str] = []
    reads: list[str] = []  # every image the run decoded, in order
    scored: list[int] = []  # the images of each evaluation pass (validation, calibration, test)
    real_load, real_predict = semodel.data.load_rgb, semodel.train.predict_probs

    def counting_load(path, *args, **kwargs):
        reads.append(Path(path).relative_to(root).as_posix())
        return real_load(path, *args, **kwargs)

    def counting_predict(*args, **kwargs):
        probs, targets, loss = real_predict(*args, **kwargs)
        scored.append(len(targets))
        return probs, targets, loss

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(semodel.data.loading, "load_rgb", counting_load)  # the loaders' ImageList
        mp.setattr(semodel.data.cache, "load_rgb", counting_load)  # data.cache's decoding
        mp.setattr(semodel.train, "predict_probs", counting_predict)
        run_dir = semodel.train.fit(load_config(config, []), config, log=lines.append)
    return {"run_dir": run_dir, "root": root, "log": lines, "base": base, "reads": reads, "scored": scored}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished run with the defaults (data.cache: auto, here ram); tests copy its folder before
    changing it."""
    return finished_run(tmp_path_factory.mktemp("speed"), "auto")


@pytest.fixture(scope="module")
def uncached_run(tmp_path_factory):
    return finished_run(tmp_path_factory.mktemp("uncached"), "none")


# ----------------------------------------------------------------------------- the time budget


@pytest.mark.parametrize("cached", [True, False])
def test_time_budget_parts_add_up_to_the_wall_time_and_are_in_metrics_json(cached, run, uncached_run):
    run = run if cached else uncached_run
    metrics = json.loads((run["run_dir"] / "metrics.json").read_text())
    budget = metrics["time_budget"]
    assert set(budget) == {*PARTS, "other", "wall", "checkpoint_background"}
    parts = sum(budget[p] for p in PARTS)
    assert parts + budget["other"] == pytest.approx(budget["wall"], abs=0.01)
    assert budget["other"] <= 0.1 * budget["wall"] + 0.2  # the parts account for (almost) everything
    # validation: its forward passes; its batches (decoded in the first epoch without the cache; with
    # it, slices of a tensor: well under a millisecond here) and its metrics apart
    for part in PARTS:
        assert budget[part] >= 0, part
        assert budget[part] > 0 or (cached and part == "val_data"), part
    assert budget["checkpoint_background"] > 0  # the files were written on the writer thread
    assert budget["wall"] >= metrics["wall_time_s"] - 0.1  # (finish_run's figure, taken before its end)
    assert any(line.startswith("time budget: ") for line in run["log"]), run["log"]


def test_budget_counts_blocks_remainders_and_loader_waits():
    budget = Budget()
    with budget.part("final_test"):
        with budget.part("checkpoint"):  # a part inside a part: counted once, to the inner one
            budget.add("checkpoint", 5.0)
    assert budget.seconds["checkpoint"] >= 5.0 and budget.seconds["final_test"] < 1.0
    budget.seconds["checkpoint"] -= 5.0
    with budget.part("validation"):
        pass
    since = budget.mark()
    for _ in timed([1, 2, 3], budget):
        budget.add("ema", 0.0)
    budget.rest_to("train_step", since)
    budget.fill("startup")
    report = budget.report()
    assert report["wall"] == pytest.approx(sum(report[p] for p in PARTS) + report["other"], abs=0.01)
    assert report["data_wait"] >= 0 and report["train_step"] >= 0
    assert "time budget: " in budget.summary()


# ----------------------------------------------------------------------------- background checkpoint writes


def test_background_writer_hands_its_error_to_the_waiting_thread_once():
    writer = BackgroundWriter()

    def fail():
        raise SemodelError("could not write checkpoint x.pt: No space left on device")

    writer.submit(fail)
    with pytest.raises(SemodelError, match="No space left"):
        writer.wait()
    writer.wait()  # reported once
    done = []
    writer.submit(lambda: done.append(1))
    writer.wait()
    assert done == [1] and writer.busy > 0


def test_checkpoint_being_written_in_the_background_is_never_half_there(tmp_path, monkeypatch):
    path = save_checkpoint({"epoch": 1, "w": torch.zeros(1000)}, tmp_path / "last.pt")
    before = path.read_bytes()
    halfway, release = threading.Event(), threading.Event()
    real_save = torch.save

    def slow_save(obj, f, *args, **kwargs):  # writes half, waits, writes the rest
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        halfway.set()
        release.wait(30)
        f.write(data[len(data) // 2 :])

    monkeypatch.setattr(torch, "save", slow_save)
    writer = BackgroundWriter()
    writer.submit(lambda: save_checkpoint({"epoch": 2, "w": torch.ones(1000)}, path))
    assert halfway.wait(30)
    assert path.read_bytes() == before  # meanwhile: the previous file, whole
    release.set()
    writer.wait()
    assert torch.load(path, weights_only=True)["epoch"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_failed_background_write_stops_the_run_with_one_line_and_keeps_the_last_good_file(
    tmp_path, monkeypatch, capsys
):
    root = make_folder(tmp_path / "data", per_class=4)
    config = write_config(
        tmp_path / "w.yaml",
        tiny_config(root, tmp_path / "runs", "w", train={"epochs": 3, "monitor": "val_loss"}),
    )
    real_save = semodel.train.save_checkpoint
    epochs_trained = []
    real_train = semodel.train.train_one_epoch

    def save(state, path):
        if path.name == "last.pt" and state["epoch"] == 2:  # epoch 2's last.pt: the disk is full
            raise SemodelError(f"could not write checkpoint {path}: {os.strerror(errno.ENOSPC)}")
        return real_save(state, path)

    def train_one_epoch(run, epoch, interrupt):
        epochs_trained.append(epoch)
        return real_train(run, epoch, interrupt)

    monkeypatch.setattr(semodel.train, "save_checkpoint", save)
    monkeypatch.setattr(semodel.train, "train_one_epoch", train_one_epoch)
    code, out, err = run_cli(["train", "--config", config, "--quiet"], capsys)
    run_dir = tmp_path / "runs" / "w"
    assert_one_line_error(code, err, "could not write checkpoint", run_dir / "last.pt")
    assert f"resume with: semodel train --resume {run_dir / 'last.pt'}" in err
    assert epochs_trained == [1, 2, 3]  # found when epoch 3's state is saved: one epoch later at most
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == 1
    assert not (run_dir / "metrics.json").exists()
    assert not [t for t in threading.enumerate() if t.name == "semodel-writer"]


# ----------------------------------------------------------------------------- the optimizer


def fused_on_cpu(optimizer: type) -> bool:
    from torch.utils import _foreach_utils

    devices = getattr(_foreach_utils, "_get_fused_kernels_supported_devices", list)()
    return "cpu" in devices and "fused" in inspect.signature(optimizer).parameters


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_optimizer_uses_fused_kernels_where_the_device_has_them(name):
    cfg = validate({"data": {"root": "x"}, "optim": {"name": name, "lr": 0.01, "momentum": 0.9}}, "t")
    torch.manual_seed(0)
    model = build_model("se_resnet18", 3, stem="cifar")
    optimizer = make_optimizer(cfg, model)
    kind = torch.optim.AdamW if name == "adamw" else torch.optim.SGD
    if fused_on_cpu(kind):
        assert optimizer.defaults["fused"] is True
    else:
        assert not optimizer.defaults.get("fused")
    assert fast_kernels(kind, [torch.zeros(2, dtype=torch.long)]) in ({}, {"foreach": True})  # not fused

    # The same step as PyTorch's per-tensor loop.
    reference = build_model("se_resnet18", 3, stem="cifar")
    reference.load_state_dict(model.state_dict())
    groups = param_groups(reference, cfg.optim.weight_decay, cfg.optim.lr)
    if name == "adamw":
        loop = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), foreach=False)
    else:
        loop = torch.optim.SGD(
            groups, lr=cfg.optim.lr, momentum=0.9, nesterov=cfg.optim.nesterov, foreach=False
        )
    x = torch.randn(4, 3, 16, 16)
    for m, opt in ((model, optimizer), (reference, loop)):
        m.train()
        m(x).logsumexp(1).mean().backward()  # one step: Adam magnifies rounding in later gradients
        opt.step()
    for (key, a), b in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), key


def test_ema_matches_averaged_model_and_syncs_nothing_per_step():
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from semodel.optim import EMA

    torch.manual_seed(0)
    model = build_model("se_resnet18", 3, stem="cifar")
    ema = EMA(model, 0.9)
    plain = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        model(torch.randn(4, 3, 16, 16)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.update_parameters(model)
        plain.update_parameters(model)
    mine, theirs = ema.module.state_dict(), plain.module.state_dict()
    for key, value in mine.items():
        if value.is_floating_point():
            assert torch.allclose(value, theirs[key], rtol=1e-6, atol=1e-7), key
        else:  # BatchNorm's counters: the model's (AveragedModel blends integers, to no use)
            assert torch.equal(value, model.state_dict()[key]), key
    assert int(ema.n_averaged) == 3


# ----------------------------------------------------------------------------- the slim best.pt


@pytest.mark.parametrize("cached", [True, False])
def test_validation_images_are_decoded_once_per_run(cached, run, uncached_run):
    """Two epochs of validation and the calibration pass read each validation image once; the
    training images once per run with data.cache, else once per epoch; the test images once."""
    done = run if cached else uncached_run
    assert any("data.cache: decoded" in line for line in done["log"]) == cached
    rows = list(csv.DictReader((done["run_dir"] / "split.csv").open()))
    by_split = {split: [r["path"] for r in rows if r["split"] == split] for split in ("train", "val", "test")}
    reads = collections.Counter(done["reads"])
    assert {path: reads[path] for path in by_split["val"]} == dict.fromkeys(by_split["val"], 1)
    assert {path: reads[path] for path in by_split["test"]} == dict.fromkeys(by_split["test"], 1)
    epochs = 1 if cached else 2
    assert {path: reads[path] for path in by_split["train"]} == dict.fromkeys(by_split["train"], epochs)


def test_calibration_reuses_the_best_epochs_validation_predictions(run):
    """Two validation passes and the test pass, no third validation pass for the calibration; and
    what it fitted on is what best.pt's weights give on the validation split scored afresh."""
    from semodel.analysis import fit_calibration
    from semodel.loaders import eval_loader
    from semodel.runtime import predict_probs

    rows = list(csv.DictReader((run["run_dir"] / "split.csv").open()))
    n_val, n_test = (sum(r["split"] == split for r in rows) for split in ("val", "test"))
    assert run["scored"] == [n_val, n_val, n_test]
    best = load_ckpt(run["run_dir"] / "best.pt")
    model = build_from_checkpoint(best).to(memory_format=torch.channels_last)  # as train.channels_last
    split = semodel.data.read_split_csv(run["run_dir"] / "split.csv", best["classes"])
    samples = [s for s in split if s.split == "val"]
    loader = eval_loader(run["root"], samples, best["preprocess"], 64)  # the run's validation batches
    probs, targets, _ = predict_probs(model, loader, torch.device("cpu"), None, True)
    assert targets.tolist() == [s.label for s in samples]
    fresh = fit_calibration(probs, targets, None)
    assert best["calibration"] == fresh
    metrics = json.loads((run["run_dir"] / "metrics.json").read_text())
    assert metrics["calibration"] == fresh


def test_kept_batches_are_the_loaders_read_once_and_only_whole_passes_within_the_limit():
    class Loader:
        def __init__(self):
            self.passes = 0

        def __len__(self):
            return 3

        def __iter__(self):
            self.passes += 1
            for i in range(3):
                yield torch.full((2, 4), float(i)), torch.tensor([i, i])  # 48 bytes a batch

    loader = Loader()
    kept = KeptBatches(loader, limit=1000)
    first = list(kept)
    partial = KeptBatches(Loader(), limit=1000)
    next(iter(partial))  # a pass that stops early keeps nothing
    assert partial.kept is None
    second = list(kept)
    assert loader.passes == 1 and len(kept) == 3 and len(second) == 3
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    small = KeptBatches(Loader(), limit=100)  # the third batch passes the limit: read every pass
    assert [int(b[1][0]) for b in small] == [0, 1, 2] == [int(b[1][0]) for b in small]
    assert small.loader.passes == 2 and small.kept is None and small.too_large


def test_best_pt_is_slim_and_holds_the_selected_weights(run):
    run_dir = run["run_dir"]
    best, last = load_ckpt(run_dir / "best.pt"), load_ckpt(run_dir / "last.pt")
    assert (run_dir / "best.pt").stat().st_size < 0.45 * (run_dir / "last.pt").stat().st_size
    assert best["selected"] == "ema" and "optimizer" not in best and "rng" not in best
    assert_same_tensors(best["model"], best["ema"], "best.pt keeps one set of weights")
    if best["epoch"] == last["epoch"]:
        assert_same_tensors(best["ema"], last["ema"], "the EMA weights")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert best["metrics"] == metrics["val"] and best["history"] == metrics["history"][: best["epoch"]]
    assert best_state({**last, "ema": None})["selected"] == "model"  # without EMA: the raw weights


def old_best(run, tmp_path):
    """The run folder with a best.pt as semodel wrote it before: last.pt's keys (raw and EMA weights)."""
    run_dir = tmp_path / "old"
    shutil.copytree(run["run_dir"], run_dir)
    shutil.copy(run_dir / "last.pt", run_dir / "best.pt")
    return run_dir


@pytest.mark.parametrize("which", ["slim", "old"])
def test_best_pt_loads_in_eval_predict_and_export(which, run, tmp_path, capsys):
    run_dir = run["run_dir"] if which == "slim" else old_best(run, tmp_path)
    ckpt = run_dir / "best.pt"
    code, out, err = run_cli(["eval", ckpt, "--split", "test", "-o", tmp_path / "e.json"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["weights"] == "ema"
    image = next((run["root"] / "cat").iterdir())
    code, out, err = run_cli(["predict", image, "--checkpoint", ckpt, "--format", "json"], capsys)
    assert code == 0, err
    code, out, err = run_cli(["export", ckpt, "-f", "torchscript", "-o", tmp_path / "m.pt"], capsys)
    assert code == 0, err
    code, out, err = run_cli(
        ["export", ckpt, "-f", "torchscript", "-o", tmp_path / "raw.pt", "--no-ema"], capsys
    )
    if which == "old":
        assert code == 0, err  # the old file still has the raw weights
    else:
        assert_one_line_error(code, err, "holds only the EMA weights the run selected")


@pytest.mark.parametrize("which", ["slim", "old"])
def test_best_pt_as_pretrained_weights(which, run, tmp_path):
    from semodel.models.pretrained import read_state_dict_file

    run_dir = run["run_dir"] if which == "slim" else old_best(run, tmp_path)
    weights = read_state_dict_file(str(run_dir / "best.pt"))
    state = load_ckpt(run_dir / "best.pt")
    assert_same_tensors(weights, state["model"], "model.pretrained reads 'model'")


def test_resume_from_a_slim_best_pt_is_refused(run, tmp_path, capsys):
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(run["run_dir"] / "best.pt", alone / "best.pt")  # no last.pt beside it
    with pytest.raises(SemodelError, match="holds no training state"):
        load_resumable(alone / "best.pt")
    code, _, err = run_cli(["train", "--resume", alone / "best.pt"], capsys)
    assert_one_line_error(code, err, "holds no training state")
    assert "model.pretrained" in err


# ----------------------------------------------------------------------------- the end-to-end benchmark


def test_bench_endtoend_times_semodel_the_reference_and_eval(tmp_path, capsys):
    """scripts/bench_endtoend.py on a tiny folder: each side in its own process, the ratio, the
    time budget, each epoch's validation and eval on the same images (the figures themselves are
    docs/performance.md's; here only that the harness runs and its parts add up)."""
    import importlib.util
    import sys

    root = make_folder(tmp_path / "data", per_class=8)
    config = write_config(
        tmp_path / "bench.yaml",
        tiny_config(root, tmp_path / "runs", "bench", data={"split": {"val": 0.25, "test": 0.25, "seed": 0}}),
    )
    path = os.path.join(os.path.dirname(__file__), "..", "scripts", "bench_endtoend.py")
    spec = importlib.util.spec_from_file_location("bench_endtoend", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_endtoend"] = bench
    spec.loader.exec_module(bench)
    out = tmp_path / "e2e.json"
    argv = [str(root), "--config", str(config), "--image-size", "16", "--epochs", "2", "--threads", "1"]
    assert bench.main([*argv, "--workdir", str(tmp_path / "work"), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ratio reference / semodel: " in printed and "validation per epoch: " in printed
    (row,) = json.loads(out.read_text())["rounds"]
    semodel_side, reference, scored = row["semodel"], row["reference"], row["eval"]
    budget = semodel_side["budget"]
    assert sum(budget[p] for p in PARTS) + budget["other"] == pytest.approx(budget["wall"], abs=0.01)
    assert len(semodel_side["validations"]) == 2 and all(v > 0 for v in semodel_side["validations"])
    assert reference["wall"] > 0 and set(reference["parts"]) >= {"train_step", "validation", "final_test"}
    rows = list(csv.DictReader((Path(semodel_side["run_dir"]) / "split.csv").open()))
    assert scored["images"] == sum(r["split"] == "val" for r in rows) > 0
