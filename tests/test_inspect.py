"""semodel inspect: excitation statistics against a hand-made computation on the gated model,
learned widths, Grad-CAM grid, TensorBoard figures, site selection, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from helpers_ckpt import assert_one_line_error, make_folder, run_cli
from helpers_train import (
    events,
    load_ckpt,
    one_torch_thread,  # noqa: F401  (autouse fixture: one torch thread)
    tiny_config,
    write_config,
)
from PIL import Image

from semodel.data import eval_transform, load_rgb
from semodel.inspection import attention_sites, default_sites, site_stats, stage_of
from semodel.models import build_model
from semodel.train import train_from_cli

CLASSES = ["cat", "dog", "fox"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three short runs on one folder: learned-width SE, ECA, and no attention."""
    base = tmp_path_factory.mktemp("inspect")
    root = make_folder(base / "data", CLASSES, per_class=6)
    variants = {
        "learned": {
            "model": {"reduction": "learned", "learned": {"penalty": 0.5, "gate_lr_scale": 100}},
            "train": {"epochs": 3},
        },
        "eca": {"model": {"attention": "eca"}},
        "none": {"model": {"attention": "none"}},
    }
    out = {"root": root}
    for name, changes in variants.items():
        raw = tiny_config(root, base / "runs", name, data={"batch_size": 6}, **changes)
        out[name] = train_from_cli(write_config(base / f"{name}.yaml", raw), [], None, quiet=True)
    return out


def by_hand(state, root, sites):
    """Per-class mean excitation at ``sites`` from the *gated* (unpruned) model, images one by one."""
    cfg = state["config"]["model"]
    model = build_model(
        cfg["name"],
        len(state["classes"]),
        attention=cfg["attention"],
        reduction=cfg["reduction"],
        learned=cfg["learned"],
        stem=cfg["stem"],
    )
    model.load_state_dict(state["model"])
    model.eval()
    modules = dict(model.named_modules())
    inputs = {}
    hooks = [
        modules[s].register_forward_hook(lambda m, a, o, s=s: inputs.__setitem__(s, a[0])) for s in sites
    ]
    transform = eval_transform(state["preprocess"])
    sums = {s: torch.zeros(len(CLASSES), modules[s].channels) for s in sites}
    counts = torch.zeros(len(CLASSES))
    with torch.no_grad():
        for c, name in enumerate(CLASSES):
            for path in sorted((root / name).iterdir()):
                model(transform(load_rgb(path))[None])
                counts[c] += 1
                for s in sites:
                    sums[s][c] += modules[s].excitation(inputs[s]).flatten()
    for h in hooks:
        h.remove()
    return {s: sums[s] / counts[:, None] for s in sites}


def test_excitation_means_widths_and_cams_match_the_checkpoint(runs, tmp_path, capsys):
    run_dir, root = runs["learned"], runs["root"]
    out = tmp_path / "inspect"
    code, stdout, err = run_cli(
        [
            "inspect",
            run_dir / "best.pt",
            "--data",
            root,
            "--out",
            out,
            "--cams",
            "2",
            "--device",
            "cpu",
            "--tensorboard",
        ],
        capsys,
    )
    assert code == 0, err
    report = json.loads((out / "inspect.json").read_text())
    sites = ["layer1.1.se", "layer2.1.se", "layer3.1.se", "layer4.1.se"]  # the last of each stage
    assert [s["name"] for s in report["sites"]] == sites
    assert report["images_per_class"] == {c: 6 for c in CLASSES}  # per-class 32 > 6: every image
    state = load_ckpt(run_dir / "best.pt")
    expected = by_hand(state, root, sites)
    for site in report["sites"]:
        means = torch.tensor([site["class_means"][c] for c in CLASSES])
        torch.testing.assert_close(means, expected[site["name"]], atol=5e-4, rtol=0)  # batched vs one by one
        spread = (expected[site["name"]].amax(0) - expected[site["name"]].amin(0)).mean().item()
        assert site["class_spread"] == pytest.approx(spread, abs=5e-4)
        assert site["name"] in stdout
    # Learned widths: the open gates of best.pt.
    gates = {k.removesuffix(".unit_gate"): v for k, v in state["model"].items() if k.endswith("unit_gate")}
    assert {k: w["width"] for k, w in report["learned_widths"].items()} == {
        k: int((v > 0).sum()) for k, v in gates.items()
    }
    assert "learned SE widths" in stdout
    # Grad-CAM: 2 images per class, labelled with the model's own prediction.
    assert [c["true"] for c in report["gradcam"]] == [c for c in CLASSES for _ in range(2)]
    from semodel.checkpoint import build_from_checkpoint

    model = build_from_checkpoint(state)
    transform = eval_transform(state["preprocess"])
    for cell in report["gradcam"]:
        with torch.no_grad():
            probs = model(transform(load_rgb(root / cell["path"]))[None]).softmax(1)[0]
        assert cell["predicted"] == CLASSES[int(probs.argmax())]
        assert cell["prob"] == pytest.approx(float(probs.max()), abs=1e-5)
    for name in ("excitation", "learned_widths", "gradcam"):
        with Image.open(out / f"{name}.png") as image:
            assert image.format == "PNG" and min(image.size) > 200
    tags = events(out / "tensorboard").Tags()["images"]
    assert sorted(tags) == ["inspect/excitation", "inspect/gradcam", "inspect/learned_widths"]


def test_eca_and_plain_models(runs, tmp_path, capsys):
    code, stdout, err = run_cli(
        [
            "inspect",
            runs["eca"] / "best.pt",
            "--data",
            runs["root"],
            "--out",
            tmp_path / "eca",
            "--per-class",
            "3",
            "--cams",
            "0",
            "--sites",
            "layer1.0.se,layer4.1.se",
        ],
        capsys,
    )
    assert code == 0, err
    report = json.loads((tmp_path / "eca" / "inspect.json").read_text())
    assert [s["name"] for s in report["sites"]] == ["layer1.0.se", "layer4.1.se"]
    assert report["images_per_class"] == {c: 3 for c in CLASSES}
    assert report["learned_widths"] == {} and report["gradcam"] == []
    assert sorted(p.name for p in (tmp_path / "eca").iterdir()) == ["excitation.png", "inspect.json"]

    code, stdout, err = run_cli(
        [
            "inspect",
            runs["none"] / "best.pt",
            "--data",
            runs["root"],
            "--out",
            tmp_path / "none",
            "--cams",
            "1",
        ],
        capsys,
    )
    assert code == 0, err
    assert "no attention modules" in stdout
    assert sorted(p.name for p in (tmp_path / "none").iterdir()) == ["gradcam.png", "inspect.json"]


def test_default_sites_are_the_last_of_every_stage():
    with torch.device("meta"):
        layer = build_model("se_densenet121", 2, placement="layer")
        block = build_model("se_densenet121", 2, placement=["layer", "block"])
        resnet = build_model("se_resnet50", 2, attention="eca")
    assert default_sites(attention_sites(layer)) == [
        "features.denseblock1.denselayer6.se",
        "features.denseblock2.denselayer12.se",
        "features.denseblock3.denselayer24.se",
        "features.denseblock4.denselayer16.se",
    ]
    assert default_sites(attention_sites(block)) == [f"features.denseblock{i}.se" for i in range(1, 5)]
    assert default_sites(attention_sites(resnet)) == [
        "layer1.2.se",
        "layer2.3.se",
        "layer3.5.se",
        "layer4.2.se",
    ]
    assert stage_of("features.denseblock2.denselayer4.se") == "features.denseblock2"


def test_site_stats_by_hand():
    weights = torch.tensor([[0.2, 0.8], [0.4, 0.6], [0.9, 0.1], [0.7, 0.3]])
    labels = torch.tensor([0, 0, 1, 1])
    stats = site_stats("x", weights, labels, 3)
    torch.testing.assert_close(stats.class_means[:2], torch.tensor([[0.3, 0.7], [0.8, 0.2]]))
    assert stats.class_means[2].isnan().all()  # a class without images
    assert stats.class_spread == pytest.approx(0.5)  # |0.3 - 0.8| and |0.7 - 0.2|
    assert stats.noise_spread == pytest.approx(
        (0.2 + 0.2) / 2
    )  # halves of a class differ by 0.2 in each channel
    assert stats.mean_weight == pytest.approx(0.5)


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--sites", "layer9.0.se"], "no attention module 'layer9.0.se'"),
        (["--per-class", "0"], "--per-class"),
    ],
)
def test_bad_options_are_one_line_errors(runs, tmp_path, capsys, extra, fragment):
    code, _, err = run_cli(
        ["inspect", runs["eca"] / "best.pt", "--data", runs["root"], "--out", tmp_path / "o", *extra], capsys
    )
    assert_one_line_error(code, err, fragment)


def test_wrong_data_and_missing_checkpoint_are_one_line_errors(runs, tmp_path, capsys):
    other = make_folder(tmp_path / "other", ["cat", "dog"], per_class=2)
    code, _, err = run_cli(
        ["inspect", runs["eca"] / "best.pt", "--data", other, "--out", tmp_path / "o"], capsys
    )
    assert_one_line_error(code, err, "do not match the checkpoint's classes")
    code, _, err = run_cli(
        ["inspect", tmp_path / "nope.pt", "--data", other, "--out", tmp_path / "o"], capsys
    )
    assert_one_line_error(code, err, "nope.pt")
    assert not (tmp_path / "o").exists()  # nothing written for a failed command


@pytest.mark.parametrize("variant", ["learned", "eca"])
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_variants_export_and_match_pytorch(runs, tmp_path, capsys, variant, fmt):
    """ECA and pruned learned-width models export; the file's logits equal the checkpoint's model."""
    from semodel.checkpoint import build_from_checkpoint
    from semodel.export import run_onnx, run_torchscript

    out = tmp_path / f"{variant}.{'onnx' if fmt == 'onnx' else 'pt'}"
    code, stdout, err = run_cli(
        ["export", runs[variant] / "best.pt", "--format", fmt, "--output", out], capsys
    )
    assert code == 0, err
    state = load_ckpt(runs[variant] / "best.pt")
    model = build_from_checkpoint(state)
    transform = eval_transform(state["preprocess"])
    batch = torch.stack([transform(load_rgb(p)) for p in sorted(runs["root"].rglob("*.jpg"))[:5]])
    with torch.no_grad():
        expected = model(batch)
    got = run_onnx(out, batch) if fmt == "onnx" else run_torchscript(out, batch)
    torch.testing.assert_close(torch.as_tensor(got), expected, rtol=1e-4, atol=1e-4)
