"""Training with several processes: DistributedDataParallel on CPU (gloo), 2 processes, tiny data.

One story, two launches (each start of torch.distributed.run costs seconds):

1. A 2-process run (torch.distributed.run + a test wrapper around ``semodel``) trains epoch 1;
   then rank 1 raises a SemodelError in epoch 2. The job must end (no hang) with a non-zero
   exit and rank 1's message, leaving epoch 1's checkpoint. The wrapper also saves, on each
   rank, the weights that rank validates with.
2. ``semodel train --nproc 2 --resume last.pt`` finishes the run.

A 1-process run in this process, with the same batch and ``accum_steps: 2``, is the reference:
EpochBatchSampler gives W processes with batch B exactly the micro-batches of one process with
batch B and ``accum_steps`` W, and DDP's gradient average equals accumulation's, so the
*parameters* agree (here to the bit, as halving is exact in floating point; the test allows
1e-5, for other thread counts). BatchNorm's running statistics do not: under DDP rank 0's see
only rank 0's micro-batches (DDP copies rank 0's buffers to the others at every forward), under
accumulation they see all of them. They do not enter the training forward pass (BN normalises
with the batch's own statistics in training), so the parameters are compared, not the buffers.
Random augmentation is off (square 16 px images, crop scale 1, no flip), so that the two runs see
the same pixels. Epoch 1 runs the fused SE tail of the residual blocks (semodel/models/fused.py)
at these small sizes too, in both runs, so DDP's gradient hooks are tested with it; epoch 2 (the
resume) runs the plain ops, as small tensors do by default.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers_ckpt import TINTS, make_image, run_cli
from helpers_train import (
    assert_same_tensors,
    load_ckpt,
    one_torch_thread,  # noqa: F401  (autouse fixture: one torch thread)
    read_split,
    tiny_config,
    write_config,
)

import semodel.cli
import semodel.models.fused as fused
from semodel.config import validate
from semodel.models import build_model
from semodel.train import fit, train_from_cli

CLASSES = ["cat", "dog", "fox"]
TIMEOUT = 120  # seconds per launch; a hang fails the test instead of blocking the suite
# 12 training images, batch 3: 4 batches per epoch, 2 per rank (no padding); 2 optimizer steps
# per epoch either way. 9 validation images: 5 on rank 0, 4 on rank 1.
PER_CLASS = {"train": 4, "val": 3}
SETTINGS = {
    "data": {"batch_size": 3, "augment": {"scale": [1.0, 1.0], "hflip": 0.0}},
    "optim": {"name": "sgd", "lr": 0.01},
    "schedule": {"name": "constant", "warmup_epochs": 0},  # the lr does not depend on train.epochs
    "train": {"epochs": 2, "deterministic": True},
}
# Runs under torch.distributed.run in place of `python -m semodel`: saves the weights each rank
# validates with, and makes one rank fail in a given epoch.
WRAPPER = """
import os

import torch

import semodel.cli
import semodel.models.fused
import semodel.train
from semodel.errors import SemodelError

semodel.models.fused.MIN_FUSED_ELEMENTS = 0  # the fused SE tail at every size, as on a GPU
rank = int(os.environ["RANK"])
real_predict_probs = semodel.train.predict_probs
epochs = []


def predict_probs(model, *args, **kwargs):
    epochs.append(len(epochs) + 1)
    if os.environ.get("FAIL_RANK") == str(rank) and os.environ.get("FAIL_EPOCH") == str(epochs[-1]):
        raise SemodelError(f"injected failure on rank {rank} in epoch {epochs[-1]}")
    path = os.path.join(os.environ["WEIGHTS_DIR"], f"epoch{epochs[-1]}_rank{rank}.pt")
    torch.save(model.state_dict(), path)
    return real_predict_probs(model, *args, **kwargs)


semodel.train.predict_probs = predict_probs
semodel.cli.main()
"""


def make_data(root: Path) -> Path:
    """root/{train,val}/<class>/*.jpg, square 16 px images (so that a crop of scale 1 is the whole image)."""
    for split, n in PER_CLASS.items():
        for ci, name in enumerate(CLASSES):
            for i in range(n):
                seed = (split == "val") * 1000 + ci * 100 + i
                make_image(root / split / name / f"{name}_{i}.jpg", TINTS[name], seed, size=(16, 16))
    return root


def launch(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **env}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)


def largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    """The 2-process run that fails in epoch 2 on rank 1, then its resume with --nproc 2."""
    base = tmp_path_factory.mktemp("ddp")
    root = make_data(base / "data")
    config = write_config(base / "ddp.yaml", tiny_config(root, base / "runs", "ddp", **SETTINGS))
    wrapper = base / "wrapper.py"
    wrapper.write_text(WRAPPER)
    weights = base / "weights"
    weights.mkdir()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    failed = launch(
        [*torchrun, str(wrapper), "train", "--config", str(config), "--quiet"],
        base,
        WEIGHTS_DIR=str(weights),
        FAIL_RANK="1",
        FAIL_EPOCH="2",
    )
    run_dir = base / "runs" / "ddp"
    after_failure = sorted(p.name for p in run_dir.iterdir())
    epoch1 = load_ckpt(run_dir / "last.pt")
    resume = ["--resume", str(run_dir / "last.pt"), "--quiet"]
    resumed = launch([sys.executable, "-m", "semodel", "train", "--nproc", "2", *resume], base)
    return {
        "base": base,
        "root": root,
        "run_dir": run_dir,
        "weights": weights,
        "failed": failed,
        "after_failure": after_failure,
        "epoch1": epoch1,
        "resumed": resumed,
    }


@pytest.fixture(scope="module")
def single(ddp):
    """The reference: 1 process, batch 3, accum_steps 2; 1 epoch, then resumed to 2 (in this process)."""
    raw = tiny_config(ddp["root"], ddp["base"] / "single-runs", "single", **SETTINGS)
    raw["train"] = {**raw["train"], "epochs": 1, "accum_steps": 2}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fused, "MIN_FUSED_ELEMENTS", 0)  # as the wrapper's epoch 1
        run_dir = fit(validate(raw, "single"), quiet=True, log=lambda _: None)
    epoch1 = load_ckpt(run_dir / "last.pt")
    train_from_cli(None, ["train.epochs=2"], run_dir / "last.pt", quiet=True)
    return {"epoch1": epoch1, "epoch2": load_ckpt(run_dir / "last.pt")}


def test_a_failure_on_one_rank_ends_the_job_with_its_message(ddp):
    failed = ddp["failed"]  # the launch's timeout has not expired: nobody hung in a collective
    assert failed.returncode != 0, failed.stderr[-3000:]
    message = "error: [rank 1 of 2] injected failure on rank 1 in epoch 2"
    assert message in failed.stderr, failed.stderr[-3000:]
    # Epoch 1 finished and was saved by rank 0 alone; the failed epoch 2 left no trace.
    assert ddp["epoch1"]["epoch"] == 1 and ddp["epoch1"]["world_size"] == 2
    assert len(ddp["epoch1"]["rng_ranks"]) == 2  # each rank's RNG state, for the resume
    events = [n for n in ddp["after_failure"] if n.startswith("events.out.tfevents.")]
    assert len(events) == 1
    others = sorted(set(ddp["after_failure"]) - set(events))
    assert others == ["best.pt", "config.yaml", "last.pt", "split.csv"]  # no metrics.json: the run failed
    assert sorted(p.name for p in (ddp["base"] / "runs").iterdir()) == ["ddp"]  # rank 1 made no folder
    assert failed.stdout.count("epoch 1/2") == 1  # only rank 0 prints


def test_ranks_validate_with_identical_weights(ddp):
    saved = ddp["epoch1"]["model"]
    rank0 = torch.load(ddp["weights"] / "epoch1_rank0.pt", weights_only=True)
    rank1 = torch.load(ddp["weights"] / "epoch1_rank1.pt", weights_only=True)
    # Bit-identical, BatchNorm running statistics included; and what rank 0 saved.
    assert_same_tensors(rank0, rank1, "rank 0 vs rank 1 after epoch 1")
    assert_same_tensors(rank0, saved, "rank 0 vs last.pt")


def test_resume_with_two_processes_finishes_the_run(ddp):
    resumed, run_dir = ddp["resumed"], ddp["run_dir"]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count(f"resuming {run_dir} at epoch 2") == 1
    assert resumed.stdout.count("epoch 2/2") == 1 and "processes: 2 x batch 3" in resumed.stdout
    last = load_ckpt(run_dir / "last.pt")
    assert last["epoch"] == 2 and last["world_size"] == 2
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert metrics["history"][0]["val"] == ddp["epoch1"]["metrics"]
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 2  # one per launch, rank 0's
    assert sorted(p.name for p in (ddp["base"] / "runs").iterdir()) == ["ddp"]  # the same folder


def test_validation_metrics_cover_the_whole_set_and_equal_a_single_process_eval(ddp, tmp_path, capsys):
    run_dir = ddp["run_dir"]
    last = load_ckpt(run_dir / "last.pt")
    metrics = last["metrics"]
    val_rows = [r for r in read_split(run_dir) if r["split"] == "val"]
    # Every validation image exactly once (9 images on 2 ranks: no padding duplicates).
    assert metrics["n"] == len(val_rows) == 9
    assert [metrics["per_class"][c]["support"] for c in CLASSES] == [3, 3, 3]
    assert [sum(row) for row in metrics["confusion_matrix"]] == [3, 3, 3]

    # The 2-process checkpoint on one CPU process: `semodel eval` of the same weights on the same images.
    out = tmp_path / "eval.json"
    args = ["eval", run_dir / "last.pt", "--split", "val", "--device", "cpu", "--output", out]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    single = json.loads(out.read_text())["metrics"]
    assert single["confusion_matrix"] == metrics["confusion_matrix"]
    assert single["per_class"].keys() == metrics["per_class"].keys()
    for name in CLASSES:
        assert single["per_class"][name] == pytest.approx(metrics["per_class"][name], abs=1e-6), name
    floats = [k for k, v in metrics.items() if isinstance(v, float)]
    assert {"acc", "balanced_acc", "f1_macro", "auc", "loss"} <= set(floats)
    assert {k: single[k] for k in floats} == pytest.approx({k: metrics[k] for k in floats}, abs=1e-5)


def test_two_processes_equal_one_process_with_the_same_global_batch(ddp, single):
    names = {name for name, _ in build_model("se_resnet18", num_classes=3, stem="cifar").named_parameters()}
    two_procs = {1: ddp["epoch1"], 2: load_ckpt(ddp["run_dir"] / "last.pt")}  # epoch 2: after the resume
    one_proc = {1: single["epoch1"], 2: single["epoch2"]}

    def params(state):
        return {k: v for k, v in state["model"].items() if k in names}

    moved = largest_difference(params(one_proc[1]), params(one_proc[2]))  # by epoch 2's training
    for epoch in (1, 2):
        apart = largest_difference(params(two_procs[epoch]), params(one_proc[epoch]))
        assert apart < 1e-5 and moved > 1e-3, f"epoch {epoch}: {apart:.2e} apart (epoch 2 moved {moved:.2e})"
        for key in ("epoch", "global_step", "step_in_epoch"):
            assert two_procs[epoch]["progress"][key] == one_proc[epoch]["progress"][key], key


def test_nproc_relaunches_the_same_command_through_torch_distributed_run(monkeypatch, capsys):
    launched = []

    class FakeProcess:
        def __init__(self, command):
            launched.append(command)

        def wait(self):
            return 1

    monkeypatch.setattr(subprocess, "Popen", FakeProcess)
    monkeypatch.delenv("RANK", raising=False)
    args = ["--config", "x.yaml", "--set", "optim.lr=0.1", "-s", "train.epochs=3", "--nproc", "4", "-q"]
    code, _, err = run_cli(["train", *args], capsys)
    assert launched == [
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=4",
            "-m",
            "semodel",
            "train",
            "--config",
            "x.yaml",
            "--set",
            "optim.lr=0.1",
            "--set",
            "train.epochs=3",
            "--quiet",
        ]
    ]
    assert code == 1 and "error: training with 4 processes failed (exit code 1)" in err

    # Under torchrun, --nproc would start processes from every process: refused.
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = run_cli(["train", "--resume", "runs/x/last.pt", "--nproc", "2"], capsys)
    assert code == 2 and "--nproc starts its own processes" in err
    assert len(launched) == 1
    assert semodel.cli._process_name() == "[rank 0 of 2] "
