"""semodel train on tiny generated ImageFolders: the run folder, checkpoints, TensorBoard, exact
resume, splits, data checks, class balancing, mixing, NaN handling.

Every run is an se_resnet18 (cifar stem) on 16 px images with 1-2 optimizer steps per epoch,
so that an epoch takes about a second on 2 CPU cores.
"""

from __future__ import annotations

import io
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from helpers_ckpt import assert_one_line_error, make_folder, make_image, run_cli
from helpers_train import (
    all_finite,
    as_logged,
    assert_same_tensors,
    events,
    load_ckpt,
    one_torch_thread,  # noqa: F401  (autouse fixture: one torch thread)
    read_split,
    scalar_series,
    split_counts,
    tiny_config,
    write_config,
)
from PIL import Image

import semodel
import semodel.loaders
import semodel.train
from semodel.checkpoint import build_from_checkpoint
from semodel.config import load_config, validate
from semodel.data import prepare_dataset, write_split_csv
from semodel.files import make_run_dir, run_name
from semodel.preprocess import preprocess_of
from semodel.train import fit, train_from_cli

CLASSES = ["cat", "dog", "fox"]
# Scalars logged once per epoch (step = epoch).
EPOCH_SCALARS = [
    "train/loss",
    "train/acc",
    "val/loss",
    "val/acc",
    "val/balanced_acc",
    "val/f1_macro",
    "val/auc",
    "lr",
    "perf/images_per_s",
    "perf/epoch_time_s",
]


# ----------------------------------------------------------------------------- one straight run


# 8 images per class: 4 train, 2 val, 2 test. Batch 6: 2 optimizer steps per epoch; warm-up is the
# first step. So epoch 1's learning rates (warm-up, then cosine at progress 0) do not depend on
# train.epochs, and a 1-epoch run resumed with --set train.epochs=3 must equal a 3-epoch run.
STRAIGHT = {
    "data": {"batch_size": 6, "split": {"val": 0.25, "test": 0.25}},
    "schedule": {"warmup_epochs": 0.5},
    "train": {"epochs": 3, "ema": True, "ema_decay": 0.5, "deterministic": True},
}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """3 epochs straight, deterministic, EMA on, with a test split: runs/det."""
    base = tmp_path_factory.mktemp("train")
    root = make_folder(base / "data", CLASSES, per_class=8)
    raw = tiny_config(root, base / "runs", "det", **STRAIGHT)
    config_path = write_config(base / "det.yaml", raw)
    run_dir = train_from_cli(config_path, [], None, quiet=True)
    return {
        "base": base,
        "root": root,
        "raw": raw,
        "config_path": config_path,
        "run_dir": run_dir,
        "cfg": load_config(config_path),
    }


def test_run_folder_holds_config_split_events_checkpoints_metrics(straight):
    run_dir = straight["run_dir"]
    assert run_dir == straight["base"] / "runs" / "det"
    names = sorted(p.name for p in run_dir.iterdir())
    event_files = [n for n in names if n.startswith("events.out.tfevents.")]
    assert len(event_files) == 1, names
    # Nothing else: no temp files left by the atomic writes.
    assert sorted(set(names) - set(event_files)) == [
        "best.pt",
        "config.yaml",
        "last.pt",
        "metrics.json",
        "split.csv",
        "test_predictions.csv",
    ]

    # config.yaml: the resolved config (defaults filled in), which loads back and validates.
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["optim"]["momentum"] == 0.9 and saved["model"]["reduction"] == 16  # defaults written out
    assert validate(saved, "config.yaml") == straight["cfg"]

    # split.csv: every image exactly once, stratified 4 / 2 / 2 per class.
    rows = read_split(run_dir)
    images = sorted(p.relative_to(straight["root"]).as_posix() for p in straight["root"].rglob("*.jpg"))
    assert sorted(r["path"] for r in rows) == images
    for split, n in [("train", 4), ("val", 2), ("test", 2)]:
        assert split_counts(rows, split, CLASSES) == [n, n, n], split

    # metrics.json: the best epoch, its validation metrics, the test metrics of the best weights.
    metrics = json.loads((run_dir / "metrics.json").read_text())
    best = load_ckpt(run_dir / "best.pt")
    assert metrics["epochs"] == 3 and len(metrics["history"]) == 3
    assert metrics["best"] == best["best"]
    assert metrics["best"]["metric"] == "val_acc" and metrics["best"]["value"] == best["metrics"]["acc"]
    assert metrics["val"] == best["metrics"] and metrics["val"]["n"] == 6
    assert metrics["test"]["n"] == 6 and 0 <= metrics["test"]["acc"] <= 1


# The checkpoint format, frozen: a change to it must change this set, semodel/checkpoint.py's
# docstring, and (if old files no longer load) checkpoint.FORMAT_VERSION, deliberately.
# last.pt: everything resume needs. best.pt: what eval, predict, export, inspect and cv read, with
# one set of weights (the selected ones) and no training state.
LAST_KEYS = {
    "semodel", "config", "classes", "preprocess", "model", "ema", "epoch", "progress", "best", "metrics",
    "history", "optimizer", "scheduler", "scaler", "rng", "rng_ranks", "world_size", "run_dir", "data_root",
}  # fmt: skip
BEST_KEYS = {
    "semodel", "config", "classes", "preprocess", "model", "ema", "selected", "epoch", "best", "metrics",
    "history", "run_dir", "data_root", "calibration",
}  # fmt: skip
CHECKPOINT_KEYS = {"last.pt": LAST_KEYS, "best.pt": BEST_KEYS}


@pytest.mark.parametrize("name", ["last.pt", "best.pt"])
def test_checkpoint_key_set_is_frozen(straight, name):
    from semodel import checkpoint

    state = load_ckpt(straight["run_dir"] / name)
    assert set(state) == CHECKPOINT_KEYS[name]
    if name == "last.pt":
        assert set(state["progress"]) == {
            "epoch", "step_in_epoch", "global_step", "best_value", "best_epoch", "stale_epochs"
        }  # fmt: skip
    # Every key is documented in the module that owns the format.
    documented = set(re.findall(r"^    (\w+(?:, \w+)*) {2,}", checkpoint.__doc__, flags=re.M))
    assert {k for line in documented for k in line.split(", ")} == LAST_KEYS | BEST_KEYS


@pytest.mark.parametrize("name", ["last.pt", "best.pt"])
def test_checkpoints_load_weights_only_and_hold_everything(straight, name):
    state = load_ckpt(straight["run_dir"] / name)  # weights_only=True: tensors and plain data only
    cfg = straight["cfg"]
    assert state["semodel"]["version"] == semodel.__version__
    assert state["config"] == cfg.to_dict()
    assert validate(state["config"], name) == cfg
    # The classes come from the folder names: model.num_classes was never given.
    assert cfg.model.num_classes is None
    assert state["classes"] == CLASSES
    assert state["model"]["fc.weight"].shape[0] == len(CLASSES)
    assert state["preprocess"] == preprocess_of(cfg)

    assert all_finite(state["model"])
    model = build_from_checkpoint(state)
    x = torch.randn(2, 3, cfg.data.image_size, cfg.data.image_size)
    with torch.no_grad():
        assert model(x).shape == (2, len(CLASSES))
    if name == "best.pt":  # slim: the selected (EMA) weights once, no training state
        assert state["selected"] == "ema" and state["epoch"] == state["best"]["epoch"]
        last = load_ckpt(straight["run_dir"] / "last.pt")
        assert state["model"].keys() == state["ema"].keys()
        assert all(torch.equal(state["model"][k], state["ema"][k]) for k in state["model"])
        if state["epoch"] == last["epoch"]:
            assert_same_tensors(state["ema"], last["ema"], "best.pt's weights are last.pt's EMA")
        return

    progress = state["progress"]
    best = load_ckpt(straight["run_dir"] / "best.pt")
    assert state["epoch"] == progress["epoch"] == 3 and best["epoch"] == best["best"]["epoch"]
    assert progress["global_step"] == 2 * progress["epoch"]  # 2 optimizer steps per epoch
    assert progress["step_in_epoch"] == 0
    assert state["best"]["metric"] == "val_acc"
    assert state["best"]["value"] == progress["best_value"]
    assert state["best"]["epoch"] == progress["best_epoch"]

    # EMA weights: same tensors as the model, different values (decay 0.5).
    assert state["ema"] is not None and state["ema"].keys() == state["model"].keys()
    assert not torch.equal(state["ema"]["fc.weight"], state["model"]["fc.weight"])
    # Optimizer (SGD momentum buffers for every parameter), scheduler at the step count, scaler.
    optimizer = state["optimizer"]
    n_params = sum(len(g["params"]) for g in optimizer["param_groups"])
    assert len(optimizer["state"]) == n_params
    assert all("momentum_buffer" in s for s in optimizer["state"].values())
    assert state["scheduler"]["last_epoch"] == progress["global_step"]
    assert "scaler" in state  # None: no fp16 grad scaler on CPU
    # RNG states to continue the random streams exactly.
    rng = state["rng"]
    assert isinstance(rng["python"], list) and len(rng["python"]) == 625
    assert isinstance(rng["numpy"], torch.Tensor) and isinstance(rng["torch"], torch.Tensor)


def test_tensorboard_scalars_one_per_epoch_and_match_metrics(straight):
    run_dir = straight["run_dir"]
    acc = events(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    series = {tag: scalar_series(acc, tag) for tag in EPOCH_SCALARS}
    for tag, values in series.items():
        assert sorted(values) == [1, 2, 3], tag
        assert all(math.isfinite(v) for v in values.values()), tag
    for entry in metrics["history"]:
        epoch = entry["epoch"]
        assert series["train/loss"][epoch] == as_logged(entry["train"]["loss"])
        assert series["train/acc"][epoch] == as_logged(entry["train"]["acc"])
        for key in ("loss", "acc", "balanced_acc", "f1_macro", "auc"):
            assert series[f"val/{key}"][epoch] == as_logged(entry["val"][key]), (key, epoch)
    assert all(v > 0 for v in series["perf/images_per_s"].values())
    assert all(v > 0 for v in series["perf/epoch_time_s"].values())
    last = load_ckpt(run_dir / "last.pt")
    assert series["lr"][3] == as_logged(last["optimizer"]["param_groups"][0]["lr"])
    assert series["lr"][1] > series["lr"][2] > series["lr"][3]  # cosine decay after the warm-up step

    # The best epoch is the first with the highest val/acc, and it is what best.pt and metrics.json hold.
    val_acc = series["val/acc"]
    best_epoch = max(val_acc, key=lambda e: (val_acc[e], -e))
    best = load_ckpt(run_dir / "best.pt")
    assert metrics["best"]["epoch"] == best["epoch"] == best_epoch
    assert val_acc[best_epoch] == as_logged(metrics["val"]["acc"]) == as_logged(best["metrics"]["acc"])


def test_tensorboard_images_and_hparams(straight):
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = events(straight["run_dir"])
    cfg = straight["cfg"]
    confusion = acc.Images("val/confusion_matrix")
    assert [e.step for e in confusion] == [1, 2, 3]
    for event in confusion:
        image = Image.open(io.BytesIO(event.encoded_image_string))
        assert image.format == "PNG" and min(image.size) > 50
    samples = acc.Images("train/augmented_samples")
    assert len(samples) == 1
    grid = Image.open(io.BytesIO(samples[0].encoded_image_string))
    # make_grid of the first batch: up to 8 per row, 2 px padding around each image.
    n, size = cfg.data.batch_size, cfg.data.image_size
    columns, rows = min(8, n), math.ceil(n / 8)
    assert grid.size == (columns * (size + 2) + 2, rows * (size + 2) + 2)

    content = acc.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"} <= set(
        content
    )
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = start.session_start_info.hparams
    assert hparams["optim.lr"].number_value == pytest.approx(cfg.optim.lr)
    assert hparams["train.epochs"].number_value == cfg.train.epochs
    assert hparams["model.name"].string_value == cfg.model.name
    metrics = json.loads((straight["run_dir"] / "metrics.json").read_text())
    assert scalar_series(acc, "hparam/acc") == {0: as_logged(metrics["test"]["acc"])}


# ----------------------------------------------------------------------------- resume


@pytest.fixture(scope="module")
def one_epoch(straight):
    """The same run for 1 epoch (train.epochs=1) on a copy of the data: it lands in runs/det-2.

    A pristine copy of its folder is kept in ``stash`` for tests that resume it elsewhere.
    """
    base = straight["base"]
    root = base / "data-copy"
    shutil.copytree(straight["root"], root)
    raw = tiny_config(root, base / "runs", "det", **STRAIGHT)
    config_path = write_config(base / "det-k.yaml", raw)
    run_dir = train_from_cli(config_path, ["train.epochs=1"], None, quiet=True)
    stash = base / "stash" / run_dir.name
    shutil.copytree(run_dir, stash)
    return {"root": root, "run_dir": run_dir, "stash": stash}


def test_run_folder_gets_a_suffix_when_taken(straight, one_epoch, tmp_path):
    # Through training: the same log.name again.
    assert one_epoch["run_dir"] == straight["base"] / "runs" / "det-2"
    assert (straight["run_dir"] / "last.pt").exists()  # the first run is untouched
    # And the rule itself: -2, -3, ...; the name defaults to the config file's name.
    (tmp_path / "runs" / "exp").mkdir(parents=True)
    (tmp_path / "runs" / "exp" / "keep.txt").write_text("mine")
    assert make_run_dir(tmp_path / "runs", "exp") == tmp_path / "runs" / "exp-2"
    assert make_run_dir(tmp_path / "runs", "exp") == tmp_path / "runs" / "exp-3"
    assert (tmp_path / "runs" / "exp" / "keep.txt").read_text() == "mine"
    assert run_name(None, Path("configs/recipe.yaml"), "run") == "recipe"
    assert run_name("exp", Path("configs/recipe.yaml"), "run") == "exp"
    assert run_name(None, None, "run") == "run"


def test_resume_gives_bit_identical_weights_in_the_same_folder(straight, one_epoch, capsys):
    run_dir = one_epoch["run_dir"]
    split_before = (run_dir / "split.csv").read_bytes()
    assert load_ckpt(run_dir / "last.pt")["epoch"] == 1
    # A new image appears: the resumed run must keep its split (a fresh split would take it in).
    make_image(one_epoch["root"] / "cat" / "cat_new.jpg", (200, 60, 60), seed=999)

    code, out, err = run_cli(
        ["train", "--resume", run_dir / "last.pt", "--set", "train.epochs=3", "--quiet"], capsys
    )
    assert code == 0, err
    assert f"resuming {run_dir} at epoch 2" in out
    assert sorted(p.name for p in (straight["base"] / "runs").iterdir()) == ["det", "det-2"]  # no det-3
    assert (run_dir / "split.csv").read_bytes() == split_before
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["epochs"] == 3

    straight_last, resumed_last = load_ckpt(straight["run_dir"] / "last.pt"), load_ckpt(run_dir / "last.pt")
    assert resumed_last["progress"] == straight_last["progress"]
    assert_same_tensors(straight_last["model"], resumed_last["model"], "model weights")
    assert_same_tensors(straight_last["ema"], resumed_last["ema"], "EMA weights")
    for index, s in straight_last["optimizer"]["state"].items():
        assert torch.equal(s["momentum_buffer"], resumed_last["optimizer"]["state"][index]["momentum_buffer"])
    assert straight_last["scheduler"] == resumed_last["scheduler"]

    straight_best, resumed_best = load_ckpt(straight["run_dir"] / "best.pt"), load_ckpt(run_dir / "best.pt")
    assert resumed_best["best"] == straight_best["best"]
    assert_same_tensors(straight_best["model"], resumed_best["model"], "best weights")
    straight_metrics = json.loads((straight["run_dir"] / "metrics.json").read_text())
    resumed_metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (
        resumed_metrics["val"] == straight_metrics["val"]
        and resumed_metrics["test"] == straight_metrics["test"]
    )
    # The history covers the epochs before the resume too.
    assert [h["epoch"] for h in resumed_metrics["history"]] == [1, 2, 3]
    assert [h["val"] for h in resumed_metrics["history"]] == [h["val"] for h in straight_metrics["history"]]

    # One TensorBoard stream: the resumed run's events continue the first ones, one value per epoch.
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 2
    straight_events, resumed_events = events(straight["run_dir"]), events(run_dir)
    for tag in ("train/loss", "train/acc", "val/acc", "val/loss", "val/f1_macro"):
        assert scalar_series(resumed_events, tag) == scalar_series(straight_events, tag), tag
    # The lr logged after epoch 1 ended the 1-epoch schedule (0); after the resume it follows the 3-epoch one.
    resumed_lr, straight_lr = scalar_series(resumed_events, "lr"), scalar_series(straight_events, "lr")
    assert resumed_lr[1] == 0.0 and {e: resumed_lr[e] for e in (2, 3)} == {e: straight_lr[e] for e in (2, 3)}


def test_resume_remembers_the_best_metric(one_epoch, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "det-2"
    shutil.copytree(one_epoch["stash"], run_dir)
    before = load_ckpt(run_dir / "best.pt")
    assert before["epoch"] == 1

    # Every epoch after the resume scores 0 validation accuracy: none is better than epoch 1.
    real_metrics = semodel.train.classification_metrics

    def worse(*args, **kwargs):
        metrics = real_metrics(*args, **kwargs)
        metrics["acc"] = 0.0
        return metrics

    monkeypatch.setattr(semodel.train, "classification_metrics", worse)
    code, out, err = run_cli(
        ["train", "--resume", run_dir / "last.pt", "--set", "train.epochs=3", "--quiet"], capsys
    )
    assert code == 0, err
    # best.pt still holds epoch 1's selection, as the first run wrote it (the end of the run writes
    # it again with the calibration, which epoch 1's validation gives as before).
    after, first = load_ckpt(run_dir / "best.pt"), load_ckpt(one_epoch["stash"] / "best.pt")
    assert after.keys() == first.keys()
    for key in ("model", "ema"):
        assert_same_tensors(after[key], first[key], f"best.pt {key}")
    for key in after.keys() - {"model", "ema"}:
        assert after[key] == first[key], key
    last = load_ckpt(run_dir / "last.pt")
    assert last["epoch"] == 3
    assert last["best"] == {"metric": "val_acc", "value": before["best"]["value"], "epoch": 1}
    assert last["progress"]["stale_epochs"] == 2
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["best"]["epoch"] == 1 and metrics["val"] == before["metrics"]


def test_resume_takes_optimizer_overrides(one_epoch, tmp_path, capsys):
    run_dir = tmp_path / "det-2"
    shutil.copytree(one_epoch["stash"], run_dir)
    before = load_ckpt(run_dir / "last.pt")
    assert {g["initial_lr"] for g in before["optimizer"]["param_groups"]} == {0.05}
    code, _, err = run_cli(
        [
            "train",
            "--resume",
            run_dir / "last.pt",
            "--quiet",
            "--set",
            "train.epochs=2",
            "--set",
            "optim.lr=0.001",
            "--set",
            "optim.weight_decay=0.01",
        ],
        capsys,
    )
    assert code == 0, err
    after = load_ckpt(run_dir / "last.pt")
    assert after["scheduler"]["base_lrs"] == [0.001, 0.001]
    assert [g["initial_lr"] for g in after["optimizer"]["param_groups"]] == [0.001, 0.001]
    # decay on weights, none on norm weights and biases
    assert [g["weight_decay"] for g in after["optimizer"]["param_groups"]] == [0.01, 0.0]
    assert after["optimizer"]["state"], "the momentum buffers came back from the checkpoint"


# ----------------------------------------------------------------------------- splits


def _prepare(tmp_path: Path, root: Path, resume: bool = False, **split):
    cfg = validate(tiny_config(root, tmp_path / "runs", "s", data={"split": split}), "test")
    run_dir = tmp_path / "runs" / "s"
    run_dir.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    split_file = run_dir / "split.csv"
    data = prepare_dataset(cfg, split_file if resume else None, log=lines.append)
    if data.split_file is None:  # a new split: written as a run writes it
        write_split_csv(data, split_file)
    return data, run_dir, lines


def test_split_is_stratified_by_class(tmp_path):
    sizes = {"cat": 20, "dog": 12, "fox": 8}
    root = tmp_path / "data"
    for k, (name, n) in enumerate(sizes.items()):
        make_folder(root, [name], per_class=n, seed=k)  # a seed each: other pictures, not tinted copies
    data, run_dir, _ = _prepare(tmp_path, root, val=0.2, test=0.25, seed=3)
    rows = read_split(run_dir)
    assert [(r["split"], r["path"]) for r in rows] == [(s.split, s.path) for s in data.samples]
    for name, n in sizes.items():
        val, test = round(n * 0.2), round(n * 0.25)
        assert [split_counts(rows, s, [name])[0] for s in ("train", "val", "test")] == [
            n - val - test,
            val,
            test,
        ]
    # Another seed: the same shares, other files.
    _, run_dir2, _ = _prepare(tmp_path / "other", root, val=0.2, test=0.25, seed=4)
    rows2 = read_split(run_dir2)
    assert all(
        split_counts(rows2, s, CLASSES) == split_counts(rows, s, CLASSES) for s in ("train", "val", "test")
    )
    assert [r["split"] for r in rows2] != [r["split"] for r in rows]


def _patient_folder(root: Path) -> dict[str, str]:
    """Two classes, 3 images per patient, patient P17 in both classes; file name -> patient."""
    patients = {}
    plan = [("mpox", f"P{i:02d}", 3) for i in range(1, 9)] + [("other", f"P{i:02d}", 3) for i in range(9, 17)]
    plan += [("mpox", "P17", 2), ("other", "P17", 1)]
    seed = 0
    for cls, patient, n in plan:
        for k in range(n):
            name = f"{patient}_{cls}{k}.jpg"
            make_image(root / cls / name, (200, 60, 60) if cls == "mpox" else (60, 200, 60), seed)
            patients[name] = patient
            seed += 1
    return patients


def test_group_by_keeps_every_group_in_one_split(tmp_path):
    root = tmp_path / "data"
    patients = _patient_folder(root)

    def splits_per_patient(rows):
        out: dict[str, set[str]] = {}
        for r in rows:
            out.setdefault(patients[Path(r["path"]).name], set()).add(r["split"])
        return out

    # Without group_by the files of a patient scatter (so this data can show the difference).
    _, run_dir, _ = _prepare(tmp_path / "plain", root, val=0.25, test=0.25, seed=0)
    assert any(len(s) > 1 for s in splits_per_patient(read_split(run_dir)).values())

    _, run_dir, _ = _prepare(tmp_path / "grouped", root, val=0.25, test=0.25, seed=0, group_by=r"^(P\d+)_")
    rows = read_split(run_dir)
    per_patient = splits_per_patient(rows)
    assert all(len(s) == 1 for s in per_patient.values()), per_patient
    assert {r["group"] for r in rows} == set(patients.values())
    assert all(r["group"] == patients[Path(r["path"]).name] for r in rows)
    # Still stratified: per class, val and test hold their share of its files to within one group.
    totals = {c: sum(1 for r in rows if r["class"] == c) for c in ("mpox", "other")}
    for split, share in (("val", 0.25), ("test", 0.25)):
        counts = split_counts(rows, split, ["mpox", "other"])
        for cls, count in zip(["mpox", "other"], counts, strict=True):
            assert 0 < count and abs(count - round(totals[cls] * share)) <= 3, (split, cls, count)


def test_train_and_val_subfolders_are_used_as_the_split(tmp_path):
    root = tmp_path / "data"
    for split, n, seed in [("train", 3, 0), ("val", 2, 1), ("test", 1, 2)]:
        make_folder(root / split, ["cat", "dog"], per_class=n, seed=seed)
    data, run_dir, _ = _prepare(tmp_path, root, val=0.5, test=0.3, group_by="^(cat|dog)")
    assert data.classes == ["cat", "dog"]
    rows = read_split(run_dir)
    assert len(rows) == 12
    assert all(r["split"] == r["path"].split("/")[0] for r in rows)
    assert [split_counts(rows, s, ["cat", "dog"]) for s in ("train", "val", "test")] == [
        [3, 3],
        [2, 2],
        [1, 1],
    ]


def test_split_csv_is_reused_on_resume(tmp_path):
    root = make_folder(tmp_path / "data", CLASSES, per_class=6)
    _, run_dir, _ = _prepare(tmp_path, root)
    rows = read_split(run_dir)
    # Edit the stored split (one train file to val) and add a new image to the folder.
    moved = next(r for r in rows if r["split"] == "train")
    moved["split"] = "val"
    with open(run_dir / "split.csv", "w", newline="") as f:
        f.write(
            "split,class,group,path\n"
            + "".join(f"{r['split']},{r['class']},{r['group']},{r['path']}\n" for r in rows)
        )
    make_image(root / "dog" / "dog_new.jpg", (60, 200, 60), seed=77)

    data, _, _ = _prepare(tmp_path, root, resume=True)
    assert [(s.path, s.split, data.classes[s.label]) for s in data.samples] == [
        (r["path"], r["split"], r["class"]) for r in rows
    ]


# ----------------------------------------------------------------------------- classes and files


def test_model_num_classes_must_agree_with_the_data(tmp_path, capsys):
    root = make_folder(tmp_path / "data", CLASSES, per_class=4)
    config = write_config(
        tmp_path / "exp.yaml", tiny_config(root, tmp_path / "runs", "n", model={"num_classes": 4})
    )
    code, _, err = run_cli(["train", "--config", config], capsys)
    assert_one_line_error(code, err, "model.num_classes is 4 but", root)
    assert "3 classes (cat, dog, fox)" in err
    # Agreeing is fine.
    cfg = validate(tiny_config(root, tmp_path / "runs", "n", model={"num_classes": 3}), "t")
    assert prepare_dataset(cfg, log=lambda _: None).classes == CLASSES


def test_empty_class_folder_is_a_clear_error(tmp_path, capsys):
    root = make_folder(tmp_path / "data", CLASSES, per_class=4)
    (root / "emu").mkdir()
    config = write_config(tmp_path / "exp.yaml", tiny_config(root, tmp_path / "runs", "e"))
    code, _, err = run_cli(["train", "--config", config], capsys)
    assert_one_line_error(code, err, "class folder(s) without image files: emu", root)
    # A class whose every file is unreadable is no better.
    (root / "emu" / "broken.jpg").write_text("not an image")
    code, _, err = run_cli(["train", "--config", config], capsys)
    assert_one_line_error(code, err, "class 'emu' has no readable image", root)


def test_unreadable_images_are_skipped_listed_and_training_completes(tmp_path, capsys):
    root = make_folder(tmp_path / "data", CLASSES, per_class=4)
    good = (root / "dog" / "dog_0.jpg").read_bytes()
    bad = {
        root / "cat" / "notes.jpg": b"this is text, not a JPEG\n",
        root / "dog" / "truncated.jpg": good[: len(good) * 2 // 3],
        root / "fox" / "empty.png": b"",
    }
    for path, content in bad.items():
        path.write_bytes(content)
    config = write_config(
        tmp_path / "exp.yaml",
        tiny_config(root, tmp_path / "runs", "bad", data={"split": {"val": 0.25, "test": 0.25}}),
    )
    code, out, err = run_cli(["train", "--config", config, "--quiet"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    warning = next(i for i, line in enumerate(lines) if line.startswith("warning: skipping"))
    assert lines[warning].startswith("warning: skipping 3 file(s)")
    listed = lines[warning + 1 : warning + 4]
    assert sorted(line.split(":")[0].strip() for line in listed) == sorted(str(p) for p in bad)
    assert "epoch 1/1" in out  # found before training, which then ran
    run_dir = tmp_path / "runs" / "bad"
    rows = read_split(run_dir)
    assert len(rows) == 12 and not {r["path"] for r in rows} & {p.relative_to(root).as_posix() for p in bad}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs"] == 1 and metrics["test"]["n"] == 3


# ----------------------------------------------------------------------------- balancing, mixing


@pytest.mark.parametrize(
    "balance, mixing",
    [("sampler", {"mixup": 1.0}), ("loss", {"cutmix": 1.0, "mixup": 1.0})],
)
def test_class_balancing_and_mixing_run(tmp_path, monkeypatch, balance, mixing):
    root = tmp_path / "data"
    for name, n in [("cat", 8), ("dog", 4), ("fox", 4)]:  # train 6 / 3 / 3 after a 25% val split
        make_folder(root, [name], per_class=n)
    cfg = validate(tiny_config(root, tmp_path / "runs", "bal", data={"balance": balance, **mixing}), "t")

    samplers, losses = [], []

    class RecordingSampler(semodel.loaders.EpochBatchSampler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            samplers.append(self)

    real_cross_entropy = torch.nn.functional.cross_entropy

    def recording_cross_entropy(logits, target, *args, **kwargs):
        if in_step:  # the training loss (not evaluation's, nor the calibration's fit)
            losses.append((target.detach().clone(), kwargs.get("weight")))
        return real_cross_entropy(logits, target, *args, **kwargs)

    in_step, real_forward_backward = [], semodel.train.forward_backward

    def recording_forward_backward(*args, **kwargs):
        in_step.append(True)
        try:
            return real_forward_backward(*args, **kwargs)
        finally:
            in_step.pop()

    monkeypatch.setattr(semodel.train, "forward_backward", recording_forward_backward)
    monkeypatch.setattr(semodel.loaders, "EpochBatchSampler", RecordingSampler)
    monkeypatch.setattr(semodel.train.F, "cross_entropy", recording_cross_entropy)
    run_dir = fit(cfg, quiet=True, log=lambda _: None)

    rows = read_split(run_dir)
    counts = torch.tensor(split_counts(rows, "train", CLASSES), dtype=torch.float)
    assert counts.tolist() == [6, 3, 3]
    labels = torch.tensor([CLASSES.index(r["class"]) for r in rows if r["split"] == "train"])
    (sampler,) = samplers
    assert losses, "no training loss computed"
    if balance == "sampler":
        # Each image drawn with probability 1 / (its class's count): every class equally likely.
        assert torch.allclose(sampler.weights, 1 / counts[labels])
        assert torch.allclose(torch.zeros(3).index_add_(0, labels, sampler.weights), torch.ones(3))
        assert all(weight is None for _, weight in losses)
    else:
        assert sampler.weights is None
        expected = counts.sum() / (len(counts) * counts)  # inverse frequency, mean 1 over images
        assert all(torch.allclose(weight, expected) for _, weight in losses)
    # Mixed batches: soft targets (rows of class probabilities), some of them truly mixed.
    targets = torch.cat([t for t, _ in losses])
    assert targets.dtype.is_floating_point and targets.shape[1] == len(CLASSES)
    assert torch.allclose(targets.sum(1), torch.ones(len(targets)))
    assert (targets.max(1).values < 1 - 1e-6).any()

    last = load_ckpt(run_dir / "last.pt")
    assert last["epoch"] == 1 and all_finite(last["model"])
    assert (run_dir / "metrics.json").exists()


# ----------------------------------------------------------------------------- NaN


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    root = make_folder(tmp_path / "data", CLASSES, per_class=4)
    config = write_config(
        tmp_path / "exp.yaml", tiny_config(root, tmp_path / "runs", "nan", train={"epochs": 3})
    )

    # The model's output turns NaN from the second training batch on (epoch 2: one batch per epoch).
    real_build = semodel.train.build_model
    training_calls = []

    def build_model(*args, **kwargs):
        model = real_build(*args, **kwargs)

        def poison(module, inputs, output):
            if module.training:
                training_calls.append(1)
                if len(training_calls) >= 2:
                    return output * float("nan")
            return output

        model.register_forward_hook(poison)
        return model

    monkeypatch.setattr(semodel.train, "build_model", build_model)
    code, out, err = run_cli(["train", "--config", config, "--quiet"], capsys)
    assert_one_line_error(code, err, "loss became nan in epoch 2")
    assert "last good checkpoint is kept" in err
    run_dir = tmp_path / "runs" / "nan"
    for name in ("last.pt", "best.pt"):
        state = load_ckpt(run_dir / name)
        assert state["epoch"] == 1 and all_finite(state["model"]), name
        assert math.isfinite(state["metrics"]["loss"]), name
    assert not (run_dir / "metrics.json").exists()


def test_diverging_run_stops_and_saves_no_broken_weights(tmp_path, capsys):
    root = make_folder(tmp_path / "data", CLASSES, per_class=4)
    config = write_config(
        tmp_path / "exp.yaml",
        tiny_config(root, tmp_path / "runs", "div", optim={"name": "sgd", "lr": 1e30}, train={"epochs": 3}),
    )
    code, _, err = run_cli(["train", "--config", config, "--quiet"], capsys)
    assert_one_line_error(code, err, "loss became")
    assert "nan" in err or "inf" in err
    assert "optim.lr" in err  # says what to try
    # Whatever checkpoint exists holds finite weights that give a finite validation loss.
    for path in (tmp_path / "runs" / "div").glob("*.pt"):
        state = load_ckpt(path)
        assert all_finite(state["model"]) and math.isfinite(state["metrics"]["loss"]), path.name


# ----------------------------------------------------------------------------- Ctrl-C


def test_ctrl_c_saves_last_pt_and_prints_the_resume_command(tmp_path):
    """SIGINT during training: the step finishes, last.pt is written, the printed command resumes."""
    import os
    import signal
    import subprocess
    import sys

    root = make_folder(tmp_path / "data", CLASSES, per_class=8)
    raw = tiny_config(root, tmp_path / "runs", "ctrlc", train={"epochs": 200}, data={"batch_size": 2})
    config = write_config(tmp_path / "ctrlc.yaml", raw)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "semodel", "train", "--config", str(config), "--quiet"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        for line in proc.stdout:  # wait until epoch 1 is done and saved, then interrupt epoch 2
            if line.startswith("epoch 1/200"):
                break
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    run_dir = tmp_path / "runs" / "ctrlc"
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert "finishing the current step" in err
    hint = f"semodel train --resume {run_dir / 'last.pt'}"  # log.out_dir is absolute here
    assert f"resume with: {hint}" in out
    last = load_ckpt(run_dir / "last.pt")
    assert last["epoch"] == 1 and last["progress"]["step_in_epoch"] >= 1  # saved inside epoch 2

    # The printed command, as a user would paste it (with a shorter schedule to finish quickly).
    args = hint.split()[1:] + ["--set", "train.epochs=2", "--quiet"]
    result = subprocess.run(
        [sys.executable, "-m", "semodel", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "resuming" in result.stdout and "at epoch 2" in result.stdout
    assert load_ckpt(run_dir / "last.pt")["epoch"] == 2
