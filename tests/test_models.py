"""SE-ResNet, SE-DenseNet, the registry, the size table and `semodel models`.

Large models are built on the meta device where only shapes and names matter (parameter counts,
state_dict keys, module placement): nothing is allocated and it takes milliseconds.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

import semodel
from semodel.cli import app
from semodel.errors import SemodelError
from semodel.models import MODEL_NAMES, SEDenseNet, SEResNet, build_model, torchvision_name
from semodel.models.attention import AttentionSpec, SqueezeExcite
from semodel.models.densenet import DenseBlock, DenseLayer, se_densenet
from semodel.models.resnet import BasicBlock, Bottleneck, se_resnet
from semodel.models.summary import ModelSize, format_table, measure, summarize

RESNET_DEPTHS = (18, 34, 50, 101, 152)


@pytest.fixture(autouse=True, scope="module")
def one_cpu_thread():
    """Tiny batches gain nothing from intra-op threads, and on a busy 2-core runner the OpenMP
    threads of a 2x3x64x64 forward+backward wait on each other (seconds instead of 0.3 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


DENSENET_DEPTHS = (121, 169, 201)
DENSENET_BLOCKS = {121: (6, 12, 24, 16), 169: (6, 12, 32, 32), 201: (6, 12, 48, 32)}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def on_meta(fn, *args, **kwargs):
    with torch.device("meta"):
        return fn(*args, **kwargs)


def se_modules(model: nn.Module) -> dict[str, SqueezeExcite]:
    return {name: m for name, m in model.named_modules() if isinstance(m, SqueezeExcite)}


def se_factory(reduction: float = 4, gate: str = "sigmoid"):
    return lambda channels: SqueezeExcite(channels, reduction=reduction, gate=gate)


def randomize_bn_(module: nn.Module, seed: int = 0) -> None:
    """Non-trivial BN statistics and affine parameters, so eval-mode BN is not the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)


def set_gate_(se: SqueezeExcite, bias: float) -> None:
    """Make every excitation weight gate(bias), whatever the input."""
    with torch.no_grad():
        se.fc2.weight.zero_()
        se.fc2.bias.fill_(bias)


def residual_branch(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The residual branch up to and including its last BN, recomputed by hand (eval mode)."""
    if isinstance(block, BasicBlock):
        out = F.relu(block.bn1(block.conv1(x)))
        return block.bn2(block.conv2(out))
    out = F.relu(block.bn1(block.conv1(x)))
    out = F.relu(block.bn2(block.conv2(out)))
    return block.bn3(block.conv3(out))


def shortcut(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x if block.downsample is None else block.downsample(x)


def make_block(kind: str, seed: int = 0, gate: str = "sigmoid") -> tuple[nn.Module, torch.Tensor]:
    """A small block with SE, in eval mode with non-trivial BN, and an input for it."""
    torch.manual_seed(seed)
    if kind == "basic":
        block, x = BasicBlock(16, 16, attention=se_factory(gate=gate)), torch.randn(2, 16, 9, 7)
    elif kind == "basic_down":
        down = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
        block, x = BasicBlock(8, 16, 2, down, attention=se_factory(gate=gate)), torch.randn(2, 8, 10, 10)
    elif kind == "bottleneck":
        block, x = Bottleneck(64, 16, attention=se_factory(gate=gate)), torch.randn(2, 64, 7, 9)
    else:  # bottleneck with a projection shortcut, as the first block of each stage
        down = nn.Sequential(nn.Conv2d(32, 64, 1, stride=2, bias=False), nn.BatchNorm2d(64))
        block, x = Bottleneck(32, 16, 2, down, attention=se_factory(gate=gate)), torch.randn(2, 32, 8, 8)
    randomize_bn_(block, seed)
    with torch.no_grad():  # spread the gates away from 0.5
        for p in block.se.parameters():
            p.mul_(4.0)
    return block.eval(), x


BLOCK_KINDS = ["basic", "basic_down", "bottleneck", "bottleneck_down"]


# --------------------------------------------------------------------------------------------
# Tutorial bugs: SE applied twice, non-global pooling, layers created in forward
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", BLOCK_KINDS)
def test_se_applied_exactly_once_in_residual_block(kind):
    block, x = make_block(kind)
    with torch.no_grad():
        out = residual_branch(block, x)
        identity = shortcut(block, x)
        once = F.relu(block.se(out) + identity)
        twice = F.relu(out * block.se(out) + identity)  # the tutorial's bug
        y = block(x)
    torch.testing.assert_close(y, once, rtol=1e-5, atol=1e-5)
    assert (y - twice).abs().max() > 1e-2


@pytest.mark.parametrize("kind", BLOCK_KINDS)
def test_se_called_once_and_its_output_is_what_gets_added(kind):
    block, x = make_block(kind)
    calls, gate_calls = [], []
    block.se.register_forward_hook(lambda m, inp, out: calls.append((inp[0].clone(), out.clone())))
    block.se.gate.register_forward_hook(lambda m, inp, out: gate_calls.append(out.clone()))
    with torch.no_grad():
        y = block(x)
        assert len(calls) == 1 and len(gate_calls) == 1
        se_in, se_out = calls[0]
        torch.testing.assert_close(se_in, residual_branch(block, x))  # input: after the last BN
        torch.testing.assert_close(se_out, se_in * gate_calls[0])  # SE returns x * w, once
        torch.testing.assert_close(y, F.relu(se_out + shortcut(block, x)))


@pytest.mark.parametrize("kind", BLOCK_KINDS)
def test_constant_gate_scales_branch_by_g_not_g_squared(kind):
    block, x = make_block(kind)
    set_gate_(block.se, 0.0)  # sigmoid(0) = 0.5 for every channel
    with torch.no_grad():
        out, identity = residual_branch(block, x), shortcut(block, x)
        y = block(x)
    torch.testing.assert_close(y, F.relu(0.5 * out + identity), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y, F.relu(0.25 * out + identity), atol=1e-3)


def test_no_non_global_pooling_anywhere():
    for name in MODEL_NAMES:
        model = on_meta(build_model, name, placement=["layer", "block"])
        for module_name, m in model.named_modules():
            if isinstance(m, nn.AvgPool2d):
                # The only AvgPool2d allowed is DenseNet's 2x2 transition pool.
                assert m.kernel_size in (2, (2, 2)), f"{name}: {module_name} is {m}"
                assert re.fullmatch(r"features\.transition\d\.pool", module_name), module_name
            if isinstance(m, nn.AdaptiveAvgPool2d):
                assert m.output_size in (1, (1, 1)), f"{name}: {module_name} is {m}"
            if isinstance(m, SqueezeExcite):
                assert not any(isinstance(sub, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)) for sub in m.modules())
        assert se_modules(model), name


def test_se_in_a_model_pools_globally():
    """The SE modules inside a real model see the whole feature map: hand computation matches."""
    torch.manual_seed(0)
    model = build_model("se_resnet18", num_classes=3).eval()
    captured = {}
    se = model.layer2[1].se
    se.register_forward_hook(lambda m, inp, out: captured.update(x=inp[0].clone(), y=out.clone()))
    with torch.no_grad():
        model(torch.randn(2, 3, 72, 72))  # layer2 works at 9 x 9
    x = captured["x"]
    assert x.shape[-2:] == (9, 9)
    mean = x.double().sum(dim=(2, 3)) / 81
    h = torch.clamp(mean @ se.fc1.weight.double()[:, :, 0, 0].T + se.fc1.bias.double(), min=0)
    w = torch.sigmoid(h @ se.fc2.weight.double()[:, :, 0, 0].T + se.fc2.bias.double())
    torch.testing.assert_close(captured["y"].double(), x.double() * w[:, :, None, None], rtol=1e-5, atol=1e-5)


def _structure(model: nn.Module) -> tuple:
    return (
        [(name, id(m)) for name, m in model.named_modules()],
        [(name, id(p), tuple(p.shape)) for name, p in model.named_parameters()],
        list(model.state_dict().keys()),
    )


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_creates_no_layers(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=3, placement=["layer", "block"])
    before = _structure(model)
    params_before = set(id(p) for p in model.parameters())
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    model.eval()
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    assert _structure(model) == before
    assert set(id(p) for p in model.parameters()) == params_before
    # the SE modules that existed before forward are the ones that got gradients
    for se_name, se in se_modules(model).items():
        assert se.fc2.bias.grad is not None and se.fc2.bias.grad.abs().sum() > 0, se_name


# --------------------------------------------------------------------------------------------
# Residual placement: shortcut never scaled, ReLU after the addition
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gate", ["sigmoid", "hard_sigmoid"])
@pytest.mark.parametrize("kind", BLOCK_KINDS)
def test_closed_gates_let_the_shortcut_through_unscaled(kind, gate):
    block, x = make_block(kind, gate=gate)
    set_gate_(block.se, -1e4)  # every gate exactly 0: the residual branch is switched off
    with torch.no_grad():
        y = block(x)
        identity = shortcut(block, x)
    torch.testing.assert_close(y, F.relu(identity), rtol=0, atol=0)
    assert identity.min() < 0 and y.min() == 0  # the ReLU comes after the addition


@pytest.mark.parametrize("kind", BLOCK_KINDS)
def test_open_gates_give_the_plain_block_and_relu_follows_the_addition(kind):
    block, x = make_block(kind)
    set_gate_(block.se, 1e4)  # every gate exactly 1: the block is the plain residual block
    with torch.no_grad():
        out, identity = residual_branch(block, x), shortcut(block, x)
        y = block(x)
    torch.testing.assert_close(y, F.relu(out + identity), rtol=1e-6, atol=1e-6)
    assert y.min() >= 0
    relu_before_add = F.relu(out) + identity  # a wrong ordering, negative where identity is
    assert relu_before_add.min() < 0
    assert not torch.allclose(y, relu_before_add, atol=1e-3)


def test_se_in_block_is_sized_by_the_branch_output():
    assert BasicBlock(64, 64, attention=se_factory(16)).se.channels == 64
    bottleneck = Bottleneck(256, 64, attention=se_factory(16))
    assert bottleneck.se.channels == 256 and bottleneck.se.hidden == 16
    assert BasicBlock(64, 64).se is None


# --------------------------------------------------------------------------------------------
# SE-ResNet
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", RESNET_DEPTHS)
def test_resnet_without_attention_is_torchvision(depth):
    ours = on_meta(build_model, f"se_resnet{depth}", num_classes=1000, attention="none")
    theirs = on_meta(getattr(torchvision.models, f"resnet{depth}"))
    assert list(ours.state_dict().keys()) == list(theirs.state_dict().keys())
    assert shapes(ours) == shapes(theirs)
    assert n_params(ours) == n_params(theirs)
    assert not se_modules(ours)


@pytest.mark.parametrize("depth", RESNET_DEPTHS)
def test_se_resnet_adds_only_se_keys(depth):
    ours = on_meta(build_model, f"se_resnet{depth}")
    theirs = on_meta(getattr(torchvision.models, f"resnet{depth}"))
    own, tv = shapes(ours), shapes(theirs)
    extra = set(own) - set(tv)
    assert extra and all(".se." in k for k in extra)
    assert set(tv) <= set(own)
    assert all(own[k] == tv[k] for k in tv)
    # one SE per residual block
    blocks = sum(len(getattr(theirs, f"layer{i}")) for i in range(1, 5))
    assert len(se_modules(ours)) == blocks
    assert all(re.fullmatch(r"layer[1-4]\.\d+\.se", name) for name in se_modules(ours))


def test_published_resnet_parameter_counts():
    assert n_params(on_meta(build_model, "se_resnet50", attention="none")) == 25_557_032
    assert n_params(on_meta(build_model, "se_resnet50", num_classes=1000)) == 28_088_024
    assert (
        n_params(
            on_meta(se_resnet, 50, attention=AttentionSpec("se", reduction=16, min_channels=1, bias=True))
        )
        == 28_088_024
    )
    assert n_params(on_meta(build_model, "se_resnet18", num_classes=1000)) == 11_778_592
    assert n_params(on_meta(build_model, "se_resnet18", attention="none")) == 11_689_512


def test_se_resnet_parameter_count_is_backbone_plus_se_formula():
    """SE-ResNet-50 = ResNet-50 + sum over blocks of (2 C^2 / r + C / r + C)."""
    se_params = 0
    for c, blocks in ((256, 3), (512, 4), (1024, 6), (2048, 3)):
        se_params += blocks * (2 * c * c // 16 + c // 16 + c)
    assert 25_557_032 + se_params == 28_088_024
    no_bias = n_params(on_meta(build_model, "se_resnet50", bias=False))
    assert no_bias == 25_557_032 + sum(
        b * 2 * c * c // 16 for c, b in ((256, 3), (512, 4), (1024, 6), (2048, 3))
    )


def test_build_model_options_reach_the_se_modules():
    model = on_meta(
        build_model, "se_resnet50", reduction=4, min_channels=128, gate="hard_sigmoid", bias=False
    )
    ses = se_modules(model)
    assert {se.hidden for se in ses.values()} == {128, 256, 512}  # 256/4 = 64 is raised to 128
    assert all(isinstance(se.gate, nn.Hardsigmoid) and se.fc1.bias is None for se in ses.values())


def test_cifar_stem():
    model = on_meta(build_model, "se_resnet18", stem="cifar")
    assert (
        model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1) and model.conv1.padding == (1, 1)
    )
    assert isinstance(model.maxpool, nn.Identity)
    imagenet = on_meta(build_model, "se_resnet18")
    assert imagenet.conv1.kernel_size == (7, 7) and imagenet.conv1.stride == (2, 2)
    assert isinstance(imagenet.maxpool, nn.MaxPool2d)


@pytest.mark.parametrize("stem,expected", [("cifar", (4, 4)), ("imagenet", (1, 1))])
def test_stem_final_feature_map(stem, expected):
    torch.manual_seed(0)
    model = build_model("se_resnet18", num_classes=10, stem=stem).eval()
    with torch.no_grad():
        features = model.forward_features(torch.randn(2, 3, 32, 32))
        logits = model(torch.randn(2, 3, 32, 32))
    assert features.shape == (2, 512, *expected)
    assert logits.shape == (2, 10)


def test_bottleneck_feature_width():
    model = on_meta(build_model, "se_resnet50", num_classes=7)
    assert model.fc.in_features == 2048 and model.fc.out_features == 7
    assert model.num_features == 2048


def test_zero_init_residual_and_dropout():
    model = on_meta(build_model, "se_resnet18", drop_rate=0.3)
    assert isinstance(model.dropout, nn.Dropout) and model.dropout.p == 0.3
    plain = se_resnet(18, zero_init_residual=True)
    assert all(block.bn2.weight.abs().sum() == 0 for layer in (plain.layer1, plain.layer4) for block in layer)


# --------------------------------------------------------------------------------------------
# SE-DenseNet
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", DENSENET_DEPTHS)
def test_densenet_without_attention_is_torchvision(depth):
    ours = on_meta(build_model, f"se_densenet{depth}", attention="none")
    theirs = on_meta(getattr(torchvision.models, f"densenet{depth}"))
    assert list(ours.state_dict().keys()) == list(theirs.state_dict().keys())
    assert shapes(ours) == shapes(theirs)
    assert n_params(ours) == n_params(theirs)
    assert not se_modules(ours)


def test_densenet121_parameter_count():
    assert n_params(on_meta(build_model, "se_densenet121", attention="none")) == 7_978_856


def _expected_se_names(depth: int, placement) -> set[str]:
    places = {placement} if isinstance(placement, str) else set(placement)
    blocks = DENSENET_BLOCKS[depth]
    names = set()
    if "layer" in places:
        names |= {
            f"features.denseblock{b}.denselayer{i}.se"
            for b, n in enumerate(blocks, 1)
            for i in range(1, n + 1)
        }
    if "block" in places:
        names |= {f"features.denseblock{b}.se" for b in range(1, len(blocks) + 1)}
    if "final" in places:
        names.add(f"features.denseblock{len(blocks)}.se")
    return names


PLACEMENT_CASES = [
    ("layer", 58),
    ("block", 4),
    ("final", 1),
    ("none", 0),
    (["layer", "block"], 62),
    (["final", "layer"], 59),
    (["block", "final"], 4),
]


@pytest.mark.parametrize("placement,count", PLACEMENT_CASES)
def test_densenet121_se_placement(placement, count):
    model = on_meta(build_model, "se_densenet121", placement=placement)
    ses = se_modules(model)
    assert len(ses) == count
    assert set(ses) == _expected_se_names(121, placement)
    # SE widths: a dense layer's new features (growth 32), or the whole block's output
    block_out = {1: 256, 2: 512, 3: 1024, 4: 1024}
    for name, se in ses.items():
        block = int(re.search(r"denseblock(\d)", name).group(1))
        assert se.channels == (32 if "denselayer" in name else block_out[block]), name
    own = shapes(model)
    tv = shapes(on_meta(torchvision.models.densenet121))
    assert all(own[k] == tv[k] for k in tv)
    extra = set(own) - set(tv)
    assert all(".se." in k for k in extra)
    assert len(extra) == 4 * count  # fc1/fc2 weight + bias per SE


@pytest.mark.parametrize("depth", [169, 201])
@pytest.mark.parametrize("placement", ["layer", "block", "final"])
def test_deeper_densenet_se_placement(depth, placement):
    ses = se_modules(on_meta(build_model, f"se_densenet{depth}", placement=placement))
    assert set(ses) == _expected_se_names(depth, placement)


def test_densenet_layer_placement_counts():
    for depth, blocks in DENSENET_BLOCKS.items():
        assert len(se_modules(on_meta(build_model, f"se_densenet{depth}", placement="layer"))) == sum(blocks)
    assert sum(DENSENET_BLOCKS[121]) == 58


def test_densenet_default_placement_is_block():
    model = on_meta(build_model, "se_densenet121")
    assert set(se_modules(model)) == {f"features.denseblock{b}.se" for b in range(1, 5)}
    assert model.placement == ["block"]
    assert n_params(model) == 7_978_856 + sum(2 * c * c // 16 + c // 16 + c for c in (256, 512, 1024, 1024))


def test_densenet_attention_none_ignores_placement():
    model = on_meta(build_model, "se_densenet121", attention="none", placement=["layer", "block"])
    assert not se_modules(model)
    assert n_params(model) == 7_978_856


def test_dense_layer_se_is_on_new_features_before_concatenation():
    torch.manual_seed(0)
    layer = DenseLayer(
        12, growth_rate=8, bn_size=2, drop_rate=0.0, memory_efficient=False, attention=se_factory(2)
    )
    randomize_bn_(layer)
    layer.eval()
    inputs = [torch.randn(2, 8, 5, 5), torch.randn(2, 4, 5, 5)]
    with torch.no_grad():
        y = layer(inputs)
        bottleneck = layer.conv1(F.relu(layer.norm1(torch.cat(inputs, 1))))
        new = layer.conv2(F.relu(layer.norm2(bottleneck)))
    assert y.shape == (2, 8, 5, 5)  # only the new growth_rate maps, to be concatenated by the block
    torch.testing.assert_close(y, layer.se(new), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y, new, atol=1e-3)


def test_dense_block_se_scales_the_whole_concatenation():
    torch.manual_seed(0)
    block = DenseBlock(
        2,
        8,
        bn_size=2,
        growth_rate=4,
        drop_rate=0.0,
        memory_efficient=False,
        layer_attention=None,
        block_attention=se_factory(2),
    )
    randomize_bn_(block)
    block.eval()
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        y = block(x)
        f1 = block.denselayer1([x])
        f2 = block.denselayer2([x, f1])
        stacked = torch.cat([x, f1, f2], 1)
    assert block.se.channels == 16
    assert y.shape == (2, 16, 6, 6)
    torch.testing.assert_close(y, block.se(stacked), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y[:, :8], x, atol=1e-3)  # the block's input channels are recalibrated too


def test_densenet_block_se_feeds_the_transition():
    torch.manual_seed(0)
    model = build_model("se_densenet121", num_classes=3).eval()
    seen = {}
    model.features.denseblock1.se.register_forward_hook(lambda m, i, o: seen.update(se=o.clone()))
    model.features.transition1.register_forward_hook(lambda m, i, o: seen.update(tr=i[0].clone()))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    torch.testing.assert_close(seen["tr"], seen["se"])


def test_densenet_cifar_stem():
    model = on_meta(build_model, "se_densenet121", stem="cifar")
    assert model.features.conv0.kernel_size == (3, 3) and model.features.conv0.stride == (1, 1)
    assert "pool0" not in dict(model.features.named_children())


def _run_densenet(memory_efficient: bool):
    torch.manual_seed(0)
    model = build_model(
        "se_densenet121", num_classes=3, placement=["layer", "block"], memory_efficient=memory_efficient
    )
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 64)
    y = model(x)
    F.cross_entropy(y, torch.tensor([0, 2])).backward()
    return model, y


def test_memory_efficient_gives_same_outputs_and_gradients(monkeypatch):
    import semodel.models.densenet as densenet

    calls = []
    real_checkpoint = densenet.cp.checkpoint

    def counting_checkpoint(*args, **kwargs):
        calls.append(1)
        return real_checkpoint(*args, **kwargs)

    monkeypatch.setattr(densenet.cp, "checkpoint", counting_checkpoint)
    plain, y_plain = _run_densenet(False)
    assert not calls
    efficient, y_efficient = _run_densenet(True)
    assert len(calls) == 58  # every dense layer went through gradient checkpointing
    assert all(layer.memory_efficient for layer in efficient.modules() if isinstance(layer, DenseLayer))
    torch.testing.assert_close(y_efficient, y_plain, rtol=1e-5, atol=1e-6)
    grads = {n: p.grad for n, p in plain.named_parameters()}
    for n, p in efficient.named_parameters():
        assert p.grad is not None, n
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_memory_efficient_updates_batchnorm_statistics_once():
    # torchvision's DenseNet updates norm1's running stats twice per step when checkpointing.
    plain, _ = _run_densenet(False)
    efficient, _ = _run_densenet(True)
    layer = "features.denseblock1.denselayer1.norm1"
    assert plain.get_submodule(layer).num_batches_tracked.item() == 1
    assert efficient.get_submodule(layer).num_batches_tracked.item() == 1
    torch.testing.assert_close(
        efficient.get_submodule(layer).running_mean, plain.get_submodule(layer).running_mean
    )


# --------------------------------------------------------------------------------------------
# Every registered model trains
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_runs_forward_and_backward(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=3)
    model.train()
    x = torch.randn(2, 3, 64, 64)
    logits = model(x)
    assert logits.shape == (2, 3)
    loss = F.cross_entropy(logits, torch.tensor([0, 2]))
    assert torch.isfinite(loss)
    loss.backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, n
        assert torch.isfinite(p.grad).all(), n
    assert any(".se." in n and p.grad.abs().sum() > 0 for n, p in model.named_parameters())
    head = model.fc if isinstance(model, SEResNet) else model.classifier
    assert head.out_features == 3 and head.weight.grad.abs().sum() > 0


def test_model_names_and_torchvision_names():
    assert MODEL_NAMES == (
        "se_resnet18",
        "se_resnet34",
        "se_resnet50",
        "se_resnet101",
        "se_resnet152",
        "se_densenet121",
        "se_densenet169",
        "se_densenet201",
    )
    assert torchvision_name("se_resnet50") == "resnet50"
    assert torchvision_name("se_densenet201") == "densenet201"
    for name in MODEL_NAMES:
        model = on_meta(build_model, name)
        assert isinstance(model, SEResNet if "resnet" in name else SEDenseNet)


def test_reset_classifier():
    model = on_meta(build_model, "se_densenet121", num_classes=10)
    model.reset_classifier(4)
    assert model.classifier.out_features == 4 and model.classifier.in_features == 1024
    resnet = on_meta(build_model, "se_resnet34", num_classes=10)
    resnet.reset_classifier(4)
    assert resnet.fc.out_features == 4 and resnet.fc.in_features == 512


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,options,bad",
    [
        ("se_resnet51", {}, "se_resnet51"),
        ("resnet50", {}, "resnet50"),
        ("se_resnet18", {"attention": "cbam"}, "cbam"),
        ("se_resnet18", {"reduction": "wide"}, "wide"),
        ("se_densenet121", {"attention": "cbam"}, "cbam"),
        ("se_densenet121", {"placement": "everywhere"}, "everywhere"),
        ("se_densenet121", {"placement": ["layer", "stem"]}, "stem"),
        ("se_resnet18", {"stem": "tiny"}, "tiny"),
        ("se_densenet121", {"stem": "tiny"}, "tiny"),
        ("se_resnet50", {"gate": "relu"}, "relu"),
        ("se_densenet169", {"gate": "tanh"}, "tanh"),
        ("se_resnet18", {"reduction": 0}, "reduction"),
    ],
)
def test_bad_options_raise_semodel_error_naming_the_value(name, options, bad):
    with torch.device("meta"), pytest.raises(SemodelError) as info:
        build_model(name, num_classes=3, **options)
    message = str(info.value)
    assert bad in message
    assert "\n" not in message


def test_unknown_model_error_lists_the_available_names():
    with pytest.raises(SemodelError) as info:
        build_model("se_resnext50")
    assert all(name in str(info.value) for name in MODEL_NAMES)


def test_depth_builders_reject_unknown_depths():
    with pytest.raises(ValueError, match="42"):
        se_resnet(42)
    with pytest.raises(ValueError, match="42"):
        se_densenet(42)


# --------------------------------------------------------------------------------------------
# Sizes and the `semodel models` table
# --------------------------------------------------------------------------------------------


def test_measure_parameters_and_flops():
    params, gflops = measure("se_resnet50", attention="none")
    assert params == 25_557_032
    with torch.device("meta"):
        tv = torchvision.models.resnet50()
        x = torch.empty(1, 3, 224, 224)
    counter = FlopCounterMode(display=False)
    with counter:
        tv(x)
    assert gflops == pytest.approx(counter.get_total_flops() / 1e9, rel=1e-9)
    assert 8.0 < gflops < 8.4  # 2 x the 4.1 G multiply-adds usually quoted
    se_params, se_gflops = measure("se_resnet50")
    assert se_params == 28_088_024
    assert gflops < se_gflops < gflops * 1.01  # SE adds almost no FLOPs


def test_summarize_and_format_table():
    row = summarize("se_resnet50")
    assert (row.params, row.params_plain) == (28_088_024, 25_557_032)
    assert row.params_overhead == pytest.approx(28_088_024 / 25_557_032 - 1)
    table = format_table([row])
    assert "28,088,024" in table and "25,557,032" in table and "+9.9%" in table
    md = format_table([row], markdown=True).splitlines()
    assert md[0].startswith("| model |") and set(md[1]) <= {"|", "-"} and md[2].startswith("| se_resnet50 |")


def test_summarize_compares_with_the_same_options_without_se():
    """The 'w/o SE' column must be the same model (same stem, same size) minus its SE modules."""
    row = summarize("se_resnet18", image_size=64, stem="cifar")
    params, gflops = measure("se_resnet18", 64, stem="cifar", attention="none")
    assert row.params_plain == params
    assert row.gflops_plain == pytest.approx(gflops)
    assert 0 < row.gflops_overhead < 0.01


def test_measure_small_images():
    """32 px through the ImageNet stem leaves a 1x1 map; measuring must not need a training batch."""
    params, gflops = measure("se_resnet18", image_size=32)
    assert params == 11_778_592 and gflops > 0


def test_format_table_columns():
    rows = [ModelSize("a", 1_100, 2.0, 1_000, 1.0), ModelSize("bb", 2_000_000, 3.5, 2_000_000, 3.5)]
    lines = format_table(rows, image_size=64).splitlines()
    assert lines[0].startswith("model") and "GFLOPs@64" in lines[0]
    assert set(lines[1]) == {"-", " "}
    assert lines[2].split() == ["a", "1,100", "2.00", "1,000", "+10.0%", "+100.00%"]
    assert lines[3].split() == ["bb", "2,000,000", "3.50", "2,000,000", "+0.0%", "+0.00%"]
    assert len({len(line) for line in lines}) == 1  # aligned columns
    header = [
        c.strip()
        for c in format_table(rows, image_size=64, markdown=True).splitlines()[0].strip("|").split("|")
    ]
    assert len(header) == 6 and header[:3] == ["model", "params", "GFLOPs@64"]


_SUMMARY_CACHE: dict = {}


@pytest.fixture
def cli_runner(monkeypatch):
    """A CLI runner; the real summarize_all is computed once and shared by the CLI tests."""
    import semodel.models.summary as summary

    real = summary.summarize_all

    def cached(image_size: int = 224, num_classes: int = 1000, **options):
        key = (image_size, num_classes, repr(sorted(options.items())))
        if key not in _SUMMARY_CACHE:
            _SUMMARY_CACHE[key] = real(image_size=image_size, num_classes=num_classes, **options)
        return _SUMMARY_CACHE[key]

    monkeypatch.setattr(summary, "summarize_all", cached)
    return CliRunner()


def test_cli_models_table(cli_runner):
    result = cli_runner.invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    out = result.output
    for name in MODEL_NAMES:
        assert re.search(rf"^{name}\s", out, re.MULTILINE), name
    row = next(line for line in out.splitlines() if line.startswith("se_resnet50 "))
    cells = row.split()
    assert cells[1] == "28,088,024" and cells[3] == "25,557,032"
    assert 8.0 < float(cells[2]) < 8.4
    densenet = next(line for line in out.splitlines() if line.startswith("se_densenet121 "))
    assert densenet.split()[3] == "7,978,856"
    assert "GFLOPs@224" in out.splitlines()[0]


def test_cli_models_markdown(cli_runner):
    result = cli_runner.invoke(app, ["models", "--markdown"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 2 + len(MODEL_NAMES)
    assert all(line.startswith("|") and line.endswith("|") for line in lines)
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:3] == ["model", "params", "GFLOPs@224"]
    assert re.fullmatch(r"\|(---\|)+", lines[1]) and lines[1].count("---") == len(header)
    rows = {
        cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])
    }
    assert list(rows) == list(MODEL_NAMES)
    assert rows["se_resnet50"][1] == "28,088,024" and rows["se_resnet50"][3] == "25,557,032"


def test_cli_version(cli_runner):
    result = cli_runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"semodel {semodel.__version__}"
    assert semodel.__version__ and re.fullmatch(r"\d+\.\d+\.\d+.*", semodel.__version__)
