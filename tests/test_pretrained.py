"""Loading torchvision weights into the SE variants (``build_model(..., pretrained=...)``).

The weights are torchvision models with random init saved to a temp file; no network is used:
``pretrained="imagenet"`` is tested with torchvision's download patched out.
"""

from __future__ import annotations

import re
import urllib.error

import pytest
import torch
import torchvision
from helpers_ckpt import assert_one_line_error, make_folder, run_cli
from helpers_train import (
    one_torch_thread,  # noqa: F401  (autouse: one torch thread)
    tiny_config,
    write_config,
)
from torchvision.models import WeightsEnum

from semodel.errors import SemodelError
from semodel.models import build_model, load_pretrained

REPORT = re.compile(
    r"^pretrained \((?P<source>.+)\): "
    r"(?P<loaded>\d+) tensors loaded, (?P<new>\d+) new, (?P<skipped>\d+) skipped"
)


def report_counts(text: str) -> tuple[str, int, int, int, str]:
    lines = [line for line in text.splitlines() if line.startswith("pretrained (")]
    assert len(lines) == 1, text  # one line, as the issue asks
    match = REPORT.match(lines[0])
    assert match, lines[0]
    return match["source"], int(match["loaded"]), int(match["new"]), int(match["skipped"]), lines[0]


def build_pretrained(name: str, source, **options):
    """``build_model`` then ``load_pretrained``, as ``semodel train`` does: the model and the line it logs."""
    model = build_model(name, **options)
    return model, f"pretrained ({source}): {load_pretrained(model, name, str(source))}"


@pytest.fixture(scope="module")
def resnet18_state():
    torch.manual_seed(123)
    return torchvision.models.resnet18(num_classes=1000).state_dict()


@pytest.fixture
def resnet18_file(tmp_path, resnet18_state):
    path = tmp_path / "resnet18.pth"
    torch.save(resnet18_state, path)
    return path


def test_resnet18_weights_load_into_se_resnet18(resnet18_file, resnet18_state):
    saved = torch.load(resnet18_file, weights_only=True)
    torch.manual_seed(0)
    fresh = build_model("se_resnet18", num_classes=5).state_dict()
    torch.manual_seed(0)
    model, text = build_pretrained("se_resnet18", resnet18_file, num_classes=5)
    own = model.state_dict()

    copied = [k for k in saved if not k.startswith("fc.")]
    assert len(copied) == 120
    for key in copied:
        assert torch.equal(own[key], saved[key]), key
        if saved[key].dim() == 4:  # conv weights differ between the two random inits (BN starts at 1/0)
            assert not torch.equal(own[key], fresh[key]), key

    se_keys = [k for k in own if ".se." in k]
    assert len(se_keys) == 8 * 4  # 8 blocks x (fc1, fc2) x (weight, bias)
    for key in se_keys:
        assert key not in saved
        assert torch.equal(own[key], fresh[key]), key  # fresh init, untouched by the loader

    assert model.fc.out_features == 5 and model.fc.in_features == 512
    assert own["fc.weight"].shape == (5, 512)
    assert torch.equal(own["fc.weight"], fresh["fc.weight"])

    source, loaded, new, skipped, line = report_counts(text)
    assert source == str(resnet18_file)
    assert (loaded, new, skipped) == (120, 34, 2)  # new: 32 SE tensors + fc.weight + fc.bias
    assert "fc.weight" in line and "fc.bias" in line
    assert loaded + new == len(own) and loaded + skipped == len(saved)


def test_pretrained_model_computes_like_torchvision_when_se_is_open(resnet18_file, resnet18_state):
    """Loaded into the plain variant, the weights give torchvision's exact features."""
    tv = torchvision.models.resnet18(num_classes=1000)
    tv.load_state_dict(resnet18_state)
    model = build_model("se_resnet18", num_classes=1000, attention="none", pretrained=str(resnet18_file))
    tv.eval()
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), tv(x))


def test_same_number_of_classes_keeps_the_classifier(resnet18_file, resnet18_state):
    model, text = build_pretrained("se_resnet18", resnet18_file, num_classes=1000)
    assert torch.equal(model.fc.weight, resnet18_state["fc.weight"])
    assert report_counts(text)[1:4] == (122, 32, 0)


def test_checkpoint_style_wrappers(tmp_path, resnet18_state):
    for wrapper in ("model", "state_dict"):
        path = tmp_path / f"{wrapper}.pt"
        torch.save({wrapper: resnet18_state, "epoch": 3}, path)
        model, text = build_pretrained("se_resnet18", path, num_classes=5)
        assert torch.equal(model.layer4[1].conv2.weight, resnet18_state["layer4.1.conv2.weight"])
        assert report_counts(text)[1:4] == (120, 34, 2)


def test_cifar_stem_skips_the_imagenet_stem_conv(resnet18_file, resnet18_state):
    model, text = build_pretrained("se_resnet18", resnet18_file, num_classes=5, stem="cifar")
    assert model.conv1.weight.shape == (64, 3, 3, 3)
    assert torch.equal(model.bn1.weight, resnet18_state["bn1.weight"])
    _, loaded, new, skipped, line = report_counts(text)
    assert (loaded, new, skipped) == (119, 35, 3)
    assert "conv1.weight" in line


def test_load_pretrained_returns_the_report(tmp_path, resnet18_file):
    model = build_model("se_resnet50", num_classes=5, attention="none")
    unrelated = tmp_path / "unrelated.pth"
    torch.save({"encoder.weight": torch.zeros(4, 4)}, unrelated)
    with pytest.raises(SemodelError, match="no tensor matches se_resnet50.*resnet50"):
        load_pretrained(model, "se_resnet50", str(unrelated))
    small = build_model("se_resnet18", num_classes=5)
    report = load_pretrained(small, "se_resnet18", str(resnet18_file))
    assert report.startswith("120 tensors loaded, 34 new, 2 skipped")


# --------------------------------------------------------------------------------------------
# DenseNet, including the old "norm.1" key style
# --------------------------------------------------------------------------------------------


OLD_STYLE = re.compile(r"(denselayer\d+\.(?:norm|conv))([12])\.(weight|bias|running_mean|running_var)$")


@pytest.fixture(scope="module")
def densenet121_state():
    torch.manual_seed(7)
    return torchvision.models.densenet121(num_classes=1000).state_dict()


def _check_densenet_load(model, fresh, saved_new_style, text, n_new_nbt=0):
    own = model.state_dict()
    copied = [k for k in saved_new_style if not k.startswith("classifier.")]
    for key in copied:
        assert torch.equal(own[key], saved_new_style[key]), key
    se_keys = [k for k in own if ".se." in k]
    assert len(se_keys) == 4 * 4  # default placement "block": 4 SE modules
    for key in se_keys:
        assert torch.equal(own[key], fresh[key]), key
    assert model.classifier.out_features == 5 and model.classifier.in_features == 1024
    _, loaded, new, skipped, line = report_counts(text)
    assert loaded == len(copied)
    assert new == len(se_keys) + 2 + n_new_nbt
    assert skipped == 2 and "classifier.weight" in line


def test_densenet121_weights_load(tmp_path, densenet121_state):
    path = tmp_path / "densenet121.pth"
    torch.save(densenet121_state, path)
    torch.manual_seed(0)
    fresh = build_model("se_densenet121", num_classes=5).state_dict()
    torch.manual_seed(0)
    model, text = build_pretrained("se_densenet121", path, num_classes=5)
    _check_densenet_load(model, fresh, densenet121_state, text)
    assert report_counts(text)[1:4] == (725, 18, 2)  # 727 torchvision tensors; 16 SE + 2 classifier new


def test_densenet121_old_key_style_loads(tmp_path, densenet121_state):
    """Files from old torchvision name the layers ``norm.1`` / ``conv.2`` and have no num_batches_tracked."""
    old = {}
    for key, value in densenet121_state.items():
        if key.endswith("num_batches_tracked"):
            continue
        old[OLD_STYLE.sub(r"\1.\2.\3", key)] = value
    assert "features.denseblock1.denselayer1.norm.1.weight" in old
    assert "features.denseblock4.denselayer16.conv.2.weight" in old
    assert "features.denseblock1.denselayer1.norm1.weight" not in old
    renamed = sum(1 for k in old if re.search(r"denselayer\d+\.(norm|conv)\.[12]\.", k))
    assert renamed == 58 * (4 + 4 + 1 + 1)  # per layer: 2 BN x 4 tensors + 2 convs

    path = tmp_path / "densenet121_old.pth"
    torch.save(old, path)
    torch.manual_seed(0)
    fresh = build_model("se_densenet121", num_classes=5).state_dict()
    torch.manual_seed(0)
    model, text = build_pretrained("se_densenet121", path, num_classes=5)
    expected = {k: v for k, v in densenet121_state.items() if not k.endswith("num_batches_tracked")}
    n_nbt = sum(1 for k in densenet121_state if k.endswith("num_batches_tracked"))
    _check_densenet_load(model, fresh, expected, text, n_new_nbt=n_nbt)
    assert n_nbt == 121 and report_counts(text)[1:4] == (604, 139, 2)
    assert torch.equal(
        model.features.denseblock1.denselayer1.norm1.weight,
        old["features.denseblock1.denselayer1.norm.1.weight"],
    )


def test_densenet_layer_placement_loads_the_same_backbone(tmp_path, densenet121_state):
    path = tmp_path / "densenet121.pth"
    torch.save(densenet121_state, path)
    model, text = build_pretrained("se_densenet121", path, num_classes=5, placement="layer")
    assert torch.equal(
        model.features.denseblock3.denselayer24.conv2.weight,
        densenet121_state["features.denseblock3.denselayer24.conv2.weight"],
    )
    assert report_counts(text)[1:4] == (725, 58 * 4 + 2, 2)


# --------------------------------------------------------------------------------------------
# Bad files and no network
# --------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(SemodelError, match="not found") as info:
        build_model("se_resnet18", num_classes=5, pretrained=str(missing))
    assert "nope.pth" in str(info.value)


def test_train_with_a_missing_weights_file_leaves_no_run_folder(tmp_path, capsys):
    """The error comes after the split was written: the folder made for the run goes again."""
    root = make_folder(tmp_path / "data")
    runs = tmp_path / "runs"
    (runs / "earlier").mkdir(parents=True)  # another run's folder: untouched
    (runs / "earlier" / "keep.txt").write_text("x")
    cfg = write_config(
        tmp_path / "c.yaml", tiny_config(root, runs, "pt", model={"pretrained": str(tmp_path / "nope.pth")})
    )
    code, _, err = run_cli(["train", "--config", cfg, "--quiet"], capsys)
    assert_one_line_error(code, err, "pretrained weights file not found", tmp_path / "nope.pth")
    assert sorted(p.name for p in runs.iterdir()) == ["earlier"]
    assert (runs / "earlier" / "keep.txt").read_text() == "x"


@pytest.mark.parametrize(
    "content",
    [[1, 2, 3], {"a": 1, "b": "x"}, {"weight": torch.zeros(3), "meta": "not a tensor"}, torch.zeros(3)],
)
def test_file_that_is_not_a_state_dict(tmp_path, content):
    path = tmp_path / "weird.pth"
    torch.save(content, path)
    with pytest.raises(SemodelError, match="state_dict") as info:
        build_model("se_resnet18", num_classes=5, pretrained=str(path))
    assert "weird.pth" in str(info.value)


def test_file_that_is_not_a_torch_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("these are not weights\n")
    with pytest.raises(SemodelError, match="notes.txt"):
        build_model("se_resnet18", num_classes=5, pretrained=str(path))


def test_weights_of_another_architecture(tmp_path, resnet18_state):
    path = tmp_path / "resnet18.pth"
    torch.save(resnet18_state, path)
    with pytest.raises(SemodelError, match="densenet121"):
        build_model("se_densenet121", num_classes=5, pretrained=str(path))


def test_file_that_needs_unpickling_code_is_refused(tmp_path):
    """weights_only loading: a pickled object that would run code is not a weights file."""
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "extra": _Unsafe()}, path)
    with pytest.raises(SemodelError, match="evil.pth"):
        build_model("se_resnet18", num_classes=5, pretrained=str(path))


class _Unsafe:
    pass


@pytest.mark.parametrize(
    "name,weights", [("se_resnet18", "ResNet18_Weights"), ("se_densenet121", "DenseNet121_Weights")]
)
def test_imagenet_without_network_says_to_pass_a_local_file(monkeypatch, name, weights):
    requested = []

    def no_network(self, *args, **kwargs):
        requested.append(self)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", no_network)
    with pytest.raises(SemodelError) as info:
        build_model(name, num_classes=5, pretrained="imagenet")
    message = str(info.value)
    tv_name = name.removeprefix("se_")
    assert requested and type(requested[0]).__name__ == weights  # the matching backbone's weights
    assert "URLError" in message and tv_name in message
    assert "without network" in message
    assert (
        f"torch.save(torchvision.models.{tv_name}(weights='DEFAULT').state_dict(), '{tv_name}.pth')"
        in message
    )
    assert "pretrained" in message and "file" in message
    assert "\n" not in message


def test_imagenet_loads_torchvision_weights_api_result(monkeypatch, resnet18_state):
    """With a (patched) download, ``imagenet`` goes through torchvision's weights API and loads it."""
    monkeypatch.setattr(WeightsEnum, "get_state_dict", lambda self, *a, **k: resnet18_state)
    model, text = build_pretrained("se_resnet18", "imagenet", num_classes=5)
    assert torch.equal(model.layer1[0].conv1.weight, resnet18_state["layer1.0.conv1.weight"])
    source, loaded, new, skipped, _ = report_counts(text)
    assert (source, loaded, new, skipped) == ("imagenet", 120, 34, 2)
