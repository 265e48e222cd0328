"""Staged fine-tuning (issue 18): train.freeze and optim.backbone_lr_scale."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers_ckpt import CLASSES, make_folder, run_cli
from helpers_train import assert_same_tensors, load_ckpt, tiny_config, write_config

import semodel.train
from semodel.config import validate
from semodel.models import build_model
from semodel.optim import make_optimizer
from semodel.train import fit, model_part

FREEZE = {
    "data": {"batch_size": 6, "split": {"val": 0.25, "test": 0.0}},
    "train": {"epochs": 3, "deterministic": True, "freeze": {"epochs": 2, "train": ["head"]}},
}


def part_tensors(state: dict[str, torch.Tensor], part: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if model_part(k.rsplit(".", 1)[0]) == part}


def train_with_snapshots(cfg) -> tuple[list[dict[str, torch.Tensor]], list[str]]:
    """Train ``cfg`` in this process; the weights at its start and at each epoch's end, and its log."""
    states, lines = [], []
    real_train_epochs, real_record = semodel.train.train_epochs, semodel.train.record_epoch

    def train_epochs(run):
        states.append(copy.deepcopy(run.model.state_dict()))
        return real_train_epochs(run)

    def record_epoch(run, result):
        states.append(copy.deepcopy(run.model.state_dict()))
        return real_record(run, result)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(semodel.train, "train_epochs", train_epochs)
        mp.setattr(semodel.train, "record_epoch", record_epoch)
        fit(cfg, quiet=True, log=lines.append)
    return states, lines


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory):
    """A 3-epoch run frozen for 2 epochs (head only), with the weights at its start and each epoch's end."""
    base = tmp_path_factory.mktemp("freeze")
    root = make_folder(base / "data", CLASSES, per_class=8)
    states, lines = train_with_snapshots(validate(tiny_config(root, base / "runs", "fz", **FREEZE), "t"))
    return {"base": base, "root": root, "states": states, "lines": lines}


def test_frozen_epochs_leave_the_backbone_bitwise_unchanged(snapshots):
    start, after1, after2, after3 = snapshots["states"]
    for state in (after1, after2):  # weights and BN statistics of the frozen backbone: untouched
        assert_same_tensors(
            part_tensors(start, "backbone"), part_tensors(state, "backbone"), "frozen backbone"
        )
        assert_same_tensors(part_tensors(start, "se"), part_tensors(state, "se"), "frozen SE layers")
    assert not torch.equal(start["fc.weight"], after1["fc.weight"])  # the head learns
    assert not torch.equal(
        after2["layer1.0.conv1.weight"], after3["layer1.0.conv1.weight"]
    )  # then everything
    assert not torch.equal(after2["layer1.0.bn1.running_mean"], after3["layer1.0.bn1.running_mean"])
    assert "epoch 1: only head learns (train.freeze)" in snapshots["lines"]
    assert "epoch 3: everything learns" in snapshots["lines"]


def test_resume_inside_the_frozen_phase_continues_exactly(snapshots, tmp_path, monkeypatch, capsys):
    root = snapshots["root"]
    cfg = validate(tiny_config(root, tmp_path / "runs", "fz", **FREEZE), "t")
    with monkeypatch.context() as mp:  # stop after epoch 1, inside the frozen phase
        mp.setattr(semodel.train, "early_stop", lambda run: True)
        run_dir = fit(cfg, quiet=True, log=lambda _: None)
    assert load_ckpt(run_dir / "last.pt")["epoch"] == 1
    code, out, err = run_cli(["train", "--resume", run_dir / "last.pt", "--quiet"], capsys)
    assert code == 0, err
    resumed = load_ckpt(run_dir / "last.pt")
    assert resumed["epoch"] == 3
    assert_same_tensors(snapshots["states"][-1], resumed["model"], "weights of the straight run")


def test_freeze_with_se_trains_the_se_layers_too(tmp_path):
    root = make_folder(tmp_path / "data", CLASSES, per_class=4)
    sections = copy.deepcopy(FREEZE)
    sections["train"].update(epochs=2, freeze={"epochs": 1, "train": ["head", "se"]})
    start, after1, _ = train_with_snapshots(
        validate(tiny_config(root, tmp_path / "runs", "fzse", **sections), "t")
    )[0]
    assert_same_tensors(part_tensors(start, "backbone"), part_tensors(after1, "backbone"), "frozen backbone")
    changed = [k for k, v in part_tensors(start, "se").items() if not torch.equal(v, after1[k])]
    assert len(changed) == len(part_tensors(start, "se"))  # every SE tensor learned


def test_backbone_lr_scale_gives_the_backbone_its_own_groups(tmp_path):
    cfg = validate(tiny_config(tmp_path, tmp_path, "x", optim={"lr": 0.05, "backbone_lr_scale": 0.1}), "t")
    model = build_model("se_resnet18", 3, stem="cifar")
    optimizer = make_optimizer(cfg, model)
    names = {id(p): n for n, p in model.named_parameters()}
    lrs = [g["lr"] for g in optimizer.param_groups]
    assert lrs == pytest.approx([0.005, 0.005, 0.05, 0.05])
    parts = [
        {model_part(names[id(p)].rsplit(".", 1)[0]) for p in g["params"]} for g in optimizer.param_groups
    ]
    assert parts[0] == parts[1] == {"backbone"} and parts[2] | parts[3] == {"head", "se"}
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.0005, 0.0, 0.0005, 0.0]
    plain = make_optimizer(validate(tiny_config(tmp_path, tmp_path, "y"), "t"), model)
    assert len(plain.param_groups) == 2  # without the scale: the groups as before


def test_freeze_must_leave_epochs_to_train(tmp_path, capsys):
    raw = tiny_config(tmp_path, tmp_path / "runs", "x", train={"epochs": 2, "freeze": {"epochs": 2}})
    code, _, err = run_cli(["train", "--config", write_config(tmp_path / "x.yaml", raw)], capsys)
    assert code == 2 and "freeze.epochs (2) must be less than epochs (2)" in err
    assert not (tmp_path / "runs").exists()


def test_a_run_from_timm_weights_stores_the_width_rule(tmp_path, capsys):
    """timm's SE-ResNet-18 rounds SE widths up to multiples of 8: the run sets model.min_channels: 8
    before building, the SE layers load trained, and best.pt's config rebuilds the same shapes."""
    timm = pytest.importorskip("timm")
    torch.save(timm.create_model("seresnet18", pretrained=False).state_dict(), tmp_path / "timm18.pth")
    root = make_folder(tmp_path / "data", CLASSES, per_class=4)
    raw = tiny_config(root, tmp_path / "runs", "t18", model={"pretrained": str(tmp_path / "timm18.pth")})
    code, out, err = run_cli(["train", "--config", write_config(tmp_path / "t.yaml", raw), "--quiet"], capsys)
    assert code == 0, err
    assert "model options set to fit the pretrained weights" in out and "model.min_channels: 8" in out
    assert "SE layers: trained" in out
    best = load_ckpt(tmp_path / "runs" / "t18" / "best.pt")
    assert best["config"]["model"]["min_channels"] == 8
    assert best["model"]["layer1.0.se.fc1.weight"].shape[0] == 8
    code, _, err = run_cli(["eval", tmp_path / "runs" / "t18" / "best.pt", "--ci", "0"], capsys)
    assert code == 0, err
