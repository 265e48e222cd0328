"""Attention variants: learned-width SE (gates, sparsity loss, pruning) and ECA, alone, in every
model and placement, in the config, in training (TensorBoard, metrics.json) and after loading."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers_ckpt import make_folder, run_cli
from helpers_train import (
    events,
    load_ckpt,
    one_torch_thread,  # noqa: F401  (autouse fixture: one torch thread)
    scalar_series,
    tiny_config,
    write_config,
)

from semodel.checkpoint import build_from_checkpoint
from semodel.config import load_config, validate
from semodel.models import (
    EfficientChannelAttention,
    LearnedWidthSE,
    SqueezeExcite,
    build_model,
    prune_attention,
    sparsity_loss,
)
from semodel.models.attention import eca_kernel_size, make_attention
from semodel.train import gate_travel, train_from_cli


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def set_gates(block: LearnedWidthSE, values: torch.Tensor) -> None:
    with torch.no_grad():
        block.unit_gate.copy_(values)


# ----------------------------------------------------------------------------- learned width, alone


def test_learned_se_with_open_gates_equals_plain_se_of_the_same_width():
    torch.manual_seed(0)
    learned = LearnedWidthSE(32, start_reduction=4)
    plain = SqueezeExcite(32, reduction=4)
    plain.load_state_dict({k: v for k, v in learned.state_dict().items() if k != "unit_gate"})
    x = torch.randn(3, 32, 5, 7)
    assert learned.hidden == plain.hidden == 8
    torch.testing.assert_close(learned(x), plain(x))


def test_gates_scale_the_hidden_units_by_hand():
    torch.manual_seed(1)
    block = LearnedWidthSE(16, start_reduction=2)  # 8 hidden units
    gates = torch.tensor([1.0, 0.5, 0.0, -0.3, 2.0, 0.25, -1.0, 0.75])
    set_gates(block, gates)
    x = torch.randn(2, 16, 4, 4)
    s = x.mean(dim=(2, 3))
    h = F.relu(s @ block.fc1.weight.view(8, 16).T + block.fc1.bias) * gates.clamp(min=0)
    w = torch.sigmoid(h @ block.fc2.weight.view(16, 8).T + block.fc2.bias)
    torch.testing.assert_close(block(x), x * w[:, :, None, None])
    assert block.width == 5  # gates > 0


def test_task_gradient_reaches_open_gates_and_not_closed_ones():
    # The popular `int(1 / theta)` width has no gradient at all; these gates do where they are open.
    torch.manual_seed(2)
    block = LearnedWidthSE(16, start_reduction=2)
    set_gates(block, torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, -0.5, 1.0, 1.0]))
    x = torch.randn(4, 16, 3, 3)
    (block(x) * torch.randn_like(x)).sum().backward()
    grad = block.unit_gate.grad
    assert grad is not None
    assert (grad[[4, 5]] == 0).all()
    assert (grad[[0, 1, 2, 3, 6, 7]] != 0).sum() >= 4  # a unit whose ReLU is 0 on every sample has none
    assert block.fc1.weight.grad[[4, 5]].abs().sum() == 0  # closed units are cut off entirely


@pytest.mark.parametrize("bias", [True, False])
def test_pruned_block_gives_the_same_output_with_fewer_parameters(bias):
    torch.manual_seed(3)
    block = LearnedWidthSE(64, start_reduction=4, bias=bias)
    gates = torch.randn(16)
    set_gates(block, gates)
    pruned = block.pruned()
    assert isinstance(pruned, SqueezeExcite) and not isinstance(pruned, LearnedWidthSE)
    assert pruned.hidden == int((gates > 0).sum())
    assert n_params(pruned) == n_params(block) - block.unit_cost * int((gates <= 0).sum()) - int(
        (gates > 0).sum()
    )
    x = torch.randn(5, 64, 6, 6)
    torch.testing.assert_close(pruned(x), block(x), rtol=1e-5, atol=1e-6)


def test_block_with_every_gate_closed_keeps_one_silent_unit():
    torch.manual_seed(4)
    block = LearnedWidthSE(32, start_reduction=4)
    set_gates(block, -torch.rand(8))
    pruned = block.pruned()
    assert pruned.hidden == 1
    x = torch.randn(2, 32, 3, 3)
    expected = x * torch.sigmoid(block.fc2.bias).view(1, -1, 1, 1)  # the gate of the bias alone
    torch.testing.assert_close(pruned(x), expected)
    torch.testing.assert_close(block(x), expected)


def test_sparsity_loss_is_the_open_share_of_the_learned_parameters():
    model = build_model("se_resnet18", 3, reduction="learned", stem="cifar")
    blocks = [m for m in model.modules() if isinstance(m, LearnedWidthSE)]
    assert len(blocks) == 8
    assert sparsity_loss(model).item() == pytest.approx(1.0)
    assert sparsity_loss(build_model("se_resnet18", 3)) is None
    # Close half of the first block's units: the loss drops by their share of the cost.
    first = blocks[0]
    total = sum(b.hidden * (2 * b.channels + 2) for b in blocks)
    half = first.hidden // 2
    set_gates(first, torch.cat([torch.zeros(half), torch.ones(first.hidden - half)]))
    assert sparsity_loss(model).item() == pytest.approx(1 - half * (2 * first.channels + 2) / total)
    # The gradient of each open gate is its unit's cost over the total cost.
    sparsity_loss(model).backward()
    torch.testing.assert_close(
        blocks[-1].unit_gate.grad, torch.full((blocks[-1].hidden,), (2 * 512 + 2) / total)
    )


@pytest.mark.parametrize(
    "name, options",
    [
        ("se_resnet18", {}),
        ("se_resnet50", {}),
        ("se_densenet121", {"placement": "layer"}),
        ("se_densenet121", {"placement": ["layer", "block"]}),
    ],
)
def test_pruning_a_whole_model_keeps_its_outputs(name, options):
    torch.manual_seed(5)
    model = build_model(name, 4, reduction="learned", **options).eval()
    for block in model.modules():
        if isinstance(block, LearnedWidthSE):
            set_gates(block, torch.randn(block.hidden))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
    params_before = n_params(model)
    widths = prune_attention(model)
    assert widths and not any(isinstance(m, LearnedWidthSE) for m in model.modules())
    removed = sum((w["start"] - w["width"]) * (2 * w["channels"] + 2) + w["width"] for w in widths.values())
    assert n_params(model) == params_before - removed
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-5)
    assert prune_attention(model) == {}  # nothing left to prune


# ----------------------------------------------------------------------------- ECA, alone


@pytest.mark.parametrize(
    "channels, k",
    # log2(C)/2 + 1/2 -> nearest odd number: ResNet-50's stages get 5, 5, 5, 7 (Wang et al. 2020).
    [(16, 3), (32, 3), (64, 3), (128, 5), (256, 5), (512, 5), (1024, 5), (2048, 7), (4096, 7), (2, 1)],
)
def test_eca_kernel_size_is_the_nearest_odd_number(channels, k):
    assert eca_kernel_size(channels) == k
    t = math.log2(channels) / 2 + 0.5
    odd = [n for n in range(1, 20, 2)]
    nearest = min(abs(n - t) for n in odd)
    assert k in [n for n in odd if abs(n - t) == nearest]


def test_eca_by_hand():
    torch.manual_seed(6)
    eca = EfficientChannelAttention(10, kernel_size=3)
    x = torch.randn(2, 10, 4, 5)
    s = x.mean(dim=(2, 3))
    w = eca.conv.weight.view(3)
    padded = F.pad(s, (1, 1))  # zeros beyond the first and last channel
    logits = torch.stack([sum(w[j] * padded[:, c + j] for j in range(3)) for c in range(10)], dim=1)
    torch.testing.assert_close(eca(x), x * torch.sigmoid(logits)[:, :, None, None])
    assert n_params(eca) == 3 and eca.conv.bias is None


def test_eca_gradients_and_channels_last():
    torch.manual_seed(7)
    eca = EfficientChannelAttention(64).double()
    x = torch.randn(2, 64, 5, 5, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(eca, (x,))
    y_cl = eca(x.detach().contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(y_cl, eca(x.detach()))


def test_eca_rejects_an_even_kernel():
    with pytest.raises(ValueError, match="odd"):
        EfficientChannelAttention(64, kernel_size=4)


# ----------------------------------------------------------------------------- in every model


ALL_MODELS = [
    "se_resnet18",
    "se_resnet34",
    "se_resnet50",
    "se_resnet101",
    "se_resnet152",
    "se_densenet121",
    "se_densenet169",
    "se_densenet201",
]
PLACEMENTS = ["layer", "block", "final", ["layer", "block"]]


def attention_sites(model):
    return [(name, m) for name, m in model.named_modules() if name.endswith(".se") or name == "se"]


@pytest.mark.parametrize("name", ALL_MODELS)
@pytest.mark.parametrize("variant", ["eca", "learned"])
def test_every_model_and_placement_builds_each_variant_with_the_right_parameter_count(name, variant):
    placements = PLACEMENTS if "densenet" in name else ["block"]
    options = {"attention": "eca"} if variant == "eca" else {"reduction": "learned"}
    kind = EfficientChannelAttention if variant == "eca" else LearnedWidthSE
    for placement in placements:
        with torch.device("meta"):
            model = build_model(name, 10, placement=placement, **options)
            plain = build_model(name, 10, attention="none")
        sites = attention_sites(model)
        assert sites and all(isinstance(m, kind) for _, m in sites), (name, placement)
        if variant == "eca":
            added = sum(eca_kernel_size(m.channels) for _, m in sites)
        else:
            added = sum(round(m.channels / 4) * (2 * m.channels + 2) + m.channels for _, m in sites)
        assert n_params(model) - n_params(plain) == added, (name, placement)


@pytest.mark.parametrize(
    "name, options",
    [
        ("se_resnet18", {"attention": "eca"}),
        ("se_resnet18", {"reduction": "learned"}),
        ("se_resnet50", {"attention": "eca"}),
        ("se_densenet121", {"attention": "eca", "placement": ["layer", "block"]}),
        ("se_densenet121", {"reduction": "learned", "placement": "final"}),
    ],
)
def test_variants_train_forward_and_backward(name, options):
    torch.manual_seed(8)
    model = build_model(name, 3, **options)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    loss = F.cross_entropy(model(x), torch.tensor([0, 2]))
    loss.backward()
    for site_name, site in attention_sites(model):
        grads = [p.grad for p in site.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), site_name
    assert any(p.grad.abs().sum() > 0 for _, s in attention_sites(model) for p in s.parameters())


def test_make_attention_rejects_bad_options():
    with pytest.raises(ValueError, match="unknown attention"):
        make_attention("cbam", 64)
    with pytest.raises(ValueError, match="learned"):
        make_attention("se", 64, reduction="wide")


def test_models_command_lists_the_variants(capsys):
    code, out, err = run_cli(["models", "--variants"], capsys)
    assert code == 0, err
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("se_")}
    assert set(rows) == set(ALL_MODELS)
    with torch.device("meta"):
        for name in ("se_resnet50", "se_densenet121"):
            plain = n_params(build_model(name, 1000, attention="none"))
            eca = n_params(build_model(name, 1000, attention="eca"))
            learned = n_params(build_model(name, 1000, reduction="learned"))
            assert f"{plain:,}" in rows[name] and f"{eca:,} (+{eca - plain:,})" in rows[name]
            assert f"{learned:,} (+{learned - plain:,})" in rows[name]
    code, out, _ = run_cli(["models", "--attention", "eca"], capsys)
    assert code == 0 and "25,557,118" in out  # ResNet-50 + 86 ECA weights (16 blocks, k = 5 or 7)
    code, _, err = run_cli(["models", "--reduction", "wide"], capsys)
    assert code == 2 and "a number (e.g. 16) or 'learned'" in err


# ----------------------------------------------------------------------------- config


def test_config_takes_learned_and_eca_and_rejects_nonsense(tmp_path):
    base = {"data": {"root": "x"}}
    cfg = validate({**base, "model": {"reduction": "learned", "learned": {"penalty": 0.1}}}, "t")
    assert cfg.model.reduction == "learned" and cfg.model.learned.penalty == 0.1
    assert validate({**base, "model": {"attention": "eca"}}, "t").model.attention == "eca"
    path = write_config(tmp_path / "c.yaml", base)
    assert load_config(path, ["model.reduction=learned"]).model.reduction == "learned"
    assert load_config(path, ["model.reduction=8"]).model.reduction == 8
    for bad, message in [
        ({"reduction": 0}, "must be a number > 0 or 'learned'"),
        ({"reduction": "learnt"}, "model.reduction = 'learnt': must be a number > 0 or 'learned'"),
        ({"reduction": True}, "must be a number > 0 or 'learned'"),
        ({"attention": "cbam"}, "model.attention = 'cbam'"),
        ({"learned": {"penalty": -1}}, "model.learned.penalty = -1"),
        ({"learned": {"start": 4}}, "unknown key 'model.learned.start'"),
    ]:
        with pytest.raises(Exception, match=message.replace("(", r"\(").replace(")", r"\)")):
            validate({**base, "model": bad}, "t")


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def learned_run(tmp_path_factory):
    """A few epochs of a learned-width SE-ResNet-18 with a strong penalty: some units close."""
    base = tmp_path_factory.mktemp("learned")
    root = make_folder(base / "data", ["cat", "dog"], per_class=8)
    raw = tiny_config(
        root,
        base / "runs",
        "lw",
        model={"reduction": "learned", "learned": {"penalty": 1.0, "gate_lr_scale": 30}},
        data={"batch_size": 6},
        optim={"name": "adamw", "lr": 0.01, "weight_decay": 0.05},
        train={"epochs": 4},
    )
    path = write_config(base / "lw.yaml", raw)
    return train_from_cli(path, [], None, quiet=True), root


def gated_widths(state_dict):
    return {
        k.removesuffix(".unit_gate"): int((v > 0).sum())
        for k, v in state_dict.items()
        if k.endswith("unit_gate")
    }


def test_training_closes_gates_and_reports_the_learned_widths(learned_run):
    run_dir, _ = learned_run
    best, last = load_ckpt(run_dir / "best.pt"), load_ckpt(run_dir / "last.pt")
    start = {
        k.removesuffix(".unit_gate"): v.numel() for k, v in best["model"].items() if k.endswith("unit_gate")
    }
    assert len(start) == 8
    assert sum(gated_widths(last["model"]).values()) < sum(start.values())  # the penalty closed units
    widths = gated_widths(best["model"])  # metrics.json reports the weights best.pt holds
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {k: v["width"] for k, v in metrics["learned_widths"].items()} == widths
    assert {k: v["start"] for k, v in metrics["learned_widths"].items()} == start
    assert metrics["params"]["pruned"] < metrics["params"]["trained"]
    # TensorBoard: the width of every block once per epoch; the last epoch's equals last.pt's gates.
    acc = events(run_dir)
    for block, width in gated_widths(last["model"]).items():
        series = scalar_series(acc, f"attention/width/{block}")
        assert sorted(series) == [1, 2, 3, 4]
        assert series[4] == width
        assert series[1] <= start[block]
    assert set(scalar_series(acc, "attention/open_fraction")) == {1, 2, 3, 4}


def test_loaded_checkpoint_is_pruned_and_predicts_like_the_gated_model(learned_run):
    run_dir, _ = learned_run
    state = load_ckpt(run_dir / "best.pt")
    pruned = build_from_checkpoint(state)
    gated = build_model("se_resnet18", 2, reduction="learned", stem="cifar")
    gated.load_state_dict(state["model"])
    gated.eval()
    assert not any(isinstance(m, LearnedWidthSE) for m in pruned.modules())
    assert n_params(pruned) < n_params(gated)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), gated(x), rtol=1e-4, atol=1e-5)


def test_learned_run_resumes(learned_run, capsys):
    run_dir, _ = learned_run
    code, out, err = run_cli(
        ["train", "--resume", run_dir / "last.pt", "--set", "train.epochs=5", "--quiet"], capsys
    )
    assert code == 0, err
    assert "learned SE widths" in out and "pruned the closed SE units" in out
    last = load_ckpt(run_dir / "last.pt")
    assert last["epoch"] == 5
    assert len(last["optimizer"]["param_groups"]) == 3  # the gates keep their own group


def test_gate_travel_and_the_note_for_short_runs(tmp_path, capsys):
    base = {
        "data": {"root": "x"},
        "optim": {"name": "adamw", "lr": 0.001},
        "train": {"epochs": 4},
        "model": {"reduction": "learned", "learned": {"gate_lr_scale": 10}},
    }
    constant = validate({**base, "schedule": {"name": "constant", "warmup_epochs": 0}}, "t")
    assert gate_travel(constant, 50) == pytest.approx(4 * 50 * 0.001 * 10)  # every step at lr x scale
    cosine = validate({**base, "schedule": {"name": "cosine", "warmup_epochs": 0}}, "t")
    assert gate_travel(cosine, 50) == pytest.approx(1.0, rel=0.02)  # cosine averages half the lr
    # A short run says so, and names a scale that would let the gates travel.
    root = make_folder(tmp_path / "data", ["cat", "dog"], per_class=6)
    raw = tiny_config(
        root,
        tmp_path / "runs",
        "short",
        model={"reduction": "learned"},
        optim={"name": "adamw", "lr": 0.001},
        data={"batch_size": 6},
    )
    code, out, err = run_cli(["train", "--config", write_config(tmp_path / "s.yaml", raw), "--quiet"], capsys)
    assert code == 0, err
    assert "note: reduction: learned: in 2 optimizer steps a gate can move by about 0.0" in out
    assert "raise model.learned.gate_lr_scale" in out
