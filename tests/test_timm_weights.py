"""timm's SE-ResNet weights: ``model.pretrained: timm:<name>[.<tag>]`` and files saved from timm.

Every timm model here is built in the test with random weights (``pretrained=False``) and saved to a
temp file; ``timm:`` names run with timm's download function patched and sockets refused, so no
test touches the network.
"""

from __future__ import annotations

import argparse
import re
import socket
import sys
import urllib.error

import pytest
import torch
import torchvision
from helpers_train import one_torch_thread  # noqa: F401  (autouse: one torch thread)
from torchvision.models import WeightsEnum

from semodel.errors import SemodelError
from semodel.models import build_model, load_pretrained, pretrained_model_options
from semodel.models.pretrained import matching_min_channels, timm_se_width

timm = pytest.importorskip("timm")

SAVE_COMMAND = (
    "python -c \"import timm, torch; torch.save(timm.create_model('seresnet50.a1_in1k', pretrained=True)"
    ".state_dict(), 'seresnet50.a1_in1k.pth')\""
)
COUNTS = re.compile(r"^(\d+) tensors loaded, (\d+) new, (\d+) skipped")


def randomized(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random BN statistics, affine terms and biases too: timm starts every block's last BN at zero,
    which would hide its residual branch (and SE) from an output comparison."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if key.endswith("running_var") or (t.dim() == 1 and key.endswith("weight")):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.dim() == 1:
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    return model.eval()


def timm_model(arch: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return randomized(timm.create_model(arch, pretrained=False, **kwargs), seed)


@pytest.fixture(scope="module")
def seresnet50():
    return timm_model("seresnet50", seed=1)


@pytest.fixture(scope="module")
def seresnet18():
    return timm_model("seresnet18", seed=2)


@pytest.fixture(scope="module")
def files(tmp_path_factory, seresnet50, seresnet18):
    folder = tmp_path_factory.mktemp("timm")
    out = {}
    for name, model in (("seresnet50", seresnet50), ("seresnet18", seresnet18)):
        out[name] = folder / f"{name}.pth"
        torch.save(model.state_dict(), out[name])
    return out


def counts(report: str) -> tuple[int, int, int]:
    match = COUNTS.match(report)
    assert match, report
    return int(match[1]), int(match[2]), int(match[3])


def both_ways(name: str, source: str, **options) -> list[tuple[torch.nn.Module, str | None]]:
    """The model made by ``build_model(..., pretrained=)`` and by the trainer's route:
    ``pretrained_model_options`` into the build, then ``load_pretrained`` (with its report)."""
    via_build = build_model(name, pretrained=source, **options)
    overrides = pretrained_model_options(name, source, options)
    model = build_model(name, **{**options, **overrides})
    return [(via_build, None), (model, load_pretrained(model, name, source))]


def assert_same_outputs(model: torch.nn.Module, reference: torch.nn.Module) -> None:
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))  # float32: rounding differs a little
        ours, theirs = model.double()(x.double()), reference.double()(x.double())
    model.float()
    reference.float()
    assert (ours - theirs).abs().max().item() < 1e-6  # float64: the same function


# --------------------------------------------------------------------------------------------
# The SE width rule
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [18, 34, 50])
def test_min_channels_8_gives_timms_shapes_in_every_block(depth):
    theirs = timm.create_model(f"seresnet{depth}", pretrained=False).state_dict()
    ours = build_model(f"se_resnet{depth}", min_channels=8).state_dict()
    assert set(ours) == set(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)
    for key, value in theirs.items():
        if key.endswith("se.fc1.weight"):
            assert value.shape[0] == timm_se_width(value.shape[1]), key
    default = build_model(f"se_resnet{depth}").state_dict()  # min_channels 1
    differ = sorted({k.split(".se.")[0] for k in theirs if default[k].shape != theirs[k].shape})
    assert differ == ([f"layer1.{i}" for i in range({18: 2, 34: 3}[depth])] if depth < 50 else [])


def test_timm_width_rule():
    assert [timm_se_width(c) for c in (64, 128, 256, 512, 1024, 2048)] == [8, 8, 16, 32, 64, 128]
    assert timm_se_width(200) == 16  # 12.5 -> the nearest multiple of 8; semodel's round() gives 12
    pairs = [(64, 8), (128, 8), (256, 16), (512, 32)]
    assert matching_min_channels(pairs, 16, 1) == 8
    assert matching_min_channels(pairs, 16, 8) == 8
    assert matching_min_channels(pairs, 8, 1) is None  # 128 / 8 = 16 > 8: no floor gives 8
    assert matching_min_channels([(256, 16), (2048, 128)], 16, 1) == 1
    assert matching_min_channels([(256, 16), (2048, 128)], 16, 32) == 16
    assert matching_min_channels([], 16, 1) is None


def test_pretrained_model_options(files):
    assert pretrained_model_options("se_resnet18", str(files["seresnet18"])) == {"min_channels": 8}
    assert pretrained_model_options("se_resnet18", str(files["seresnet18"]), {"min_channels": 8}) == {}
    assert pretrained_model_options("se_resnet50", str(files["seresnet50"])) == {}
    assert pretrained_model_options("se_resnet50", "timm:seresnet50.a1_in1k") == {}
    assert pretrained_model_options("se_resnet50", "timm:seresnet50", {"min_channels": 32}) == {
        "min_channels": 16
    }
    for options in ({"attention": "none"}, {"attention": "eca"}, {"reduction": "learned"}):
        assert pretrained_model_options("se_resnet18", str(files["seresnet18"]), options) == {}
    assert pretrained_model_options("se_resnet18", "imagenet") == {}
    assert pretrained_model_options("se_resnet18", None) == {}


# --------------------------------------------------------------------------------------------
# Files saved from timm
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,se_tensors", [("seresnet50", 64), ("seresnet18", 32)])
def test_timm_file_loads_every_tensor(files, arch, se_tensors, seresnet50, seresnet18):
    reference = {"seresnet50": seresnet50, "seresnet18": seresnet18}[arch]
    saved = reference.state_dict()
    name = arch.replace("seresnet", "se_resnet")
    for model, report in both_ways(name, str(files[arch])):
        own = model.state_dict()
        assert set(own) == set(saved)
        for key in own:
            assert torch.equal(own[key], saved[key]), key
        assert_same_outputs(model, reference)
        if report is not None:
            assert counts(report) == (len(saved), 0, 0)
            assert report.endswith(f"; SE layers: trained ({se_tensors} of {se_tensors} tensors)")


def test_other_number_of_classes_only_the_classifier_is_new(files, seresnet50):
    saved = seresnet50.state_dict()
    for model, report in both_ways("se_resnet50", str(files["seresnet50"]), num_classes=5):
        own = model.state_dict()
        assert own["fc.weight"].shape == (5, 2048)
        for key in own:
            if not key.startswith("fc."):
                assert torch.equal(own[key], saved[key]), key
        reference = timm_model("seresnet50", num_classes=5)
        reference.load_state_dict({**saved, "fc.weight": own["fc.weight"], "fc.bias": own["fc.bias"]})
        assert_same_outputs(model, reference)
        if report is not None:
            assert counts(report) == (len(saved) - 2, 2, 2)
            assert "(fc.weight, fc.bias)" in report and "SE layers: trained (64 of 64 tensors)" in report


def test_seresnet18_file_into_the_default_widths_says_which_se_tensors_did_not_fit(files):
    model = build_model("se_resnet18", num_classes=1000)  # min_channels 1: layer1's SE is 4 wide
    report = load_pretrained(model, "se_resnet18", str(files["seresnet18"]))
    assert counts(report) == (154 - 6, 6, 6)
    assert "SE layers: partly trained (26 of 32 tensors; 6 of the source's 32 attention tensors" in report
    assert "layer1.0.se.fc1.weight 8x64x1x1 there, 4x64x1x1 here" in report
    assert "min_channels" in report and "\n" not in report


def test_safetensors_file(tmp_path, seresnet18):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    path = tmp_path / "seresnet18.safetensors"
    safetensors_torch.save_file(seresnet18.state_dict(), str(path))
    model, report = both_ways("se_resnet18", str(path))[1]
    assert report.endswith("SE layers: trained (32 of 32 tensors)")
    assert_same_outputs(model, seresnet18)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(SemodelError, match="bad.safetensors: not a readable safetensors file"):
        build_model("se_resnet18", pretrained=str(bad))


def test_timm_training_checkpoint_uses_its_ema_weights(tmp_path, seresnet18):
    """timm's train.py saves its argparse arguments and, with EMA, ``state_dict_ema``."""
    ema = timm_model("seresnet18", seed=9).state_dict()
    path = tmp_path / "model_best.pth.tar"
    args = argparse.Namespace(model="seresnet18", lr=0.1, epochs=[1, 2])
    weights = {"state_dict": seresnet18.state_dict(), "state_dict_ema": ema}
    torch.save({"epoch": 3, "arch": "seresnet18", "args": args, "version": 2, **weights}, path)
    model, report = both_ways("se_resnet18", str(path))[1]
    assert torch.equal(model.layer4[1].se.fc2.weight, ema["layer4.1.se.fc2.weight"])
    assert counts(report) == (154, 0, 0)


def test_wrapper_prefixes_are_dropped(tmp_path, seresnet18):
    path = tmp_path / "ddp.pth"
    torch.save({f"module.{k}": v for k, v in seresnet18.state_dict().items()}, path)
    model, report = both_ways("se_resnet18", str(path))[1]
    assert counts(report) == (154, 0, 0)


# --------------------------------------------------------------------------------------------
# torchvision files: the SE layers are new
# --------------------------------------------------------------------------------------------


def test_torchvision_file_says_the_se_layers_are_new(tmp_path):
    torch.manual_seed(4)
    tv = torchvision.models.resnet50()
    path = tmp_path / "resnet50.pth"
    torch.save(tv.state_dict(), path)
    assert pretrained_model_options("se_resnet50", str(path)) == {}
    model, report = both_ways("se_resnet50", str(path), num_classes=5)[1]
    assert counts(report) == (318, 66, 2)  # new: 64 SE tensors + the classifier
    assert report.endswith("; SE layers: new (random init; the source has none)")
    assert torch.equal(model.layer3[5].conv2.weight, tv.layer3[5].conv2.weight)


def test_imagenet_says_the_se_layers_are_new(monkeypatch):
    torch.manual_seed(5)
    state = torchvision.models.resnet18().state_dict()
    monkeypatch.setattr(WeightsEnum, "get_state_dict", lambda self, *a, **k: state)
    model = build_model("se_resnet18", num_classes=5)
    report = load_pretrained(model, "se_resnet18", "imagenet")
    assert report.endswith("; SE layers: new (random init; torchvision's ImageNet weights have none)")


def test_no_attention_model_takes_the_backbone_of_a_timm_file(files):
    model = build_model("se_resnet18", attention="none", pretrained=str(files["seresnet18"]))
    assert not any(".se." in k for k in model.state_dict())
    report = load_pretrained(model, "se_resnet18", str(files["seresnet18"]))
    assert counts(report) == (122, 0, 32) and report.endswith("SE layers: none (attention: none)")


# --------------------------------------------------------------------------------------------
# Wrong weights
# --------------------------------------------------------------------------------------------


def test_weights_of_another_depth_are_refused(files, tmp_path):
    with pytest.raises(SemodelError) as info:
        build_model("se_resnet18", pretrained=str(files["seresnet50"]))
    message = str(info.value)
    assert "not weights for se_resnet18" in message and "at least 90% of each must" in message
    assert "it holds se_resnet50 weights with SE layers (set model.name: se_resnet50)" in message
    # a deeper file covers every tensor of a shallower model: refused by the share of its own used
    path = tmp_path / "seresnet34.pth"
    torch.save(timm.create_model("seresnet34", pretrained=False).state_dict(), path)
    with pytest.raises(
        SemodelError, match=r"100 of the model's 100 backbone tensors and 100 of the source's 180"
    ):
        build_model("se_resnet18", pretrained=str(path))


def test_densenet_with_timm_se_weights_is_refused(files):
    for source in ("timm:seresnet50.a1_in1k", "timm:seresnet50"):
        with pytest.raises(SemodelError, match="timm has no SE-DenseNet") as info:
            build_model("se_densenet121", num_classes=5, pretrained=source)
        assert "model.pretrained: imagenet" in str(info.value)
    with pytest.raises(SemodelError, match="timm has no SE-DenseNet"):
        pretrained_model_options("se_densenet121", "timm:seresnet50.a1_in1k")
    with pytest.raises(SemodelError) as info:
        build_model("se_densenet121", num_classes=5, pretrained=str(files["seresnet50"]))
    message = str(info.value)
    assert "no tensor matches se_densenet121" in message
    assert (
        "it holds se_resnet50 weights with SE layers (timm's SE-ResNet layout; timm has no SE-DenseNet)"
        in message
    )


# --------------------------------------------------------------------------------------------
# timm: names, with timm's download patched
# --------------------------------------------------------------------------------------------


@pytest.fixture
def no_sockets(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def hub(monkeypatch, no_sockets):
    """timm's download functions (hub and URL), patched; ``hub.serve`` sets what they return."""
    from timm.models import _builder

    class Hub:
        def __init__(self):
            self.calls: list = []
            self.result: object = None

        def download(self, location, *args, **kwargs):
            self.calls.append(location)
            if isinstance(self.result, Exception):
                raise self.result
            return self.result

    fake = Hub()
    monkeypatch.setattr(_builder, "load_state_dict_from_hf", fake.download)
    monkeypatch.setattr(_builder, "load_state_dict_from_url", fake.download)
    return fake


def test_timm_name_goes_through_timms_download(hub, seresnet50):
    hub.result = {k: v.clone() for k, v in seresnet50.state_dict().items()}
    for model, report in both_ways("se_resnet50", "timm:seresnet50.a1_in1k"):
        assert_same_outputs(model, seresnet50)
        if report is not None:
            assert counts(report) == (384, 0, 0)
            assert report.endswith("SE layers: trained (64 of 64 tensors)")
    assert hub.calls and all("seresnet50" in str(c) and "a1" in str(c) for c in hub.calls)


def test_timm_name_without_network(hub):
    hub.result = urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    with pytest.raises(SemodelError) as info:
        build_model("se_resnet50", num_classes=5, pretrained="timm:seresnet50.a1_in1k")
    message = str(info.value)
    assert message.startswith("could not download timm's seresnet50.a1_in1k weights (URLError:")
    assert "without network access" in message and SAVE_COMMAND in message
    assert "set model.pretrained to that file" in message and "\n" not in message


def test_timm_name_without_timm(monkeypatch, no_sockets):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` raises ImportError
    for call in (
        lambda: build_model("se_resnet50", pretrained="timm:seresnet50.a1_in1k"),
        lambda: pretrained_model_options("se_resnet50", "timm:seresnet50.a1_in1k"),
        lambda: load_pretrained(build_model("se_resnet50"), "se_resnet50", "timm:seresnet50.a1_in1k"),
    ):
        with pytest.raises(SemodelError) as info:
            call()
        message = str(info.value)
        assert "needs timm, which is not installed: pip install 'semodel[timm]'" in message
        assert SAVE_COMMAND in message and "\n" not in message


BAD_NAMES = [
    (
        "se_resnet50",
        "timm:nonexistent_model",
        r"no model 'nonexistent_model'; semodel loads .*seresnet50\.a1_in1k",
    ),
    ("se_resnet50", "timm:seresnet5", r"close matches among timm's SE-ResNets: seresnet50\b"),
    ("se_resnet50", "timm:se_resnet50", r"close matches among timm's SE-ResNets: seresnet50\b"),
    ("se_resnet50", "timm:seresnet152d", r"timm's seresnet152d is another architecture"),
    ("se_resnet50", "timm:legacy_seresnet50.in1k", r"timm's legacy_seresnet50 is another architecture"),
    (
        "se_resnet18",
        "timm:seresnet50.a1_in1k",
        r"for se_resnet50, the model is se_resnet18; set model.name: se_resnet50",
    ),
    ("se_resnet18", "timm:seresnet18", r"has no trained weights for seresnet18; .*seresnet50\.a1_in1k"),
    ("se_resnet50", "timm:seresnet50.b9_in1k", r"has no trained weights for seresnet50\.b9_in1k"),
]


@pytest.mark.parametrize("model,source,expected", BAD_NAMES)
def test_bad_timm_names(hub, model, source, expected):
    with pytest.raises(SemodelError, match=expected) as info:
        build_model(model, pretrained=source)
    assert "\n" not in str(info.value) and source in str(info.value)
    assert hub.calls == []  # refused before any download
