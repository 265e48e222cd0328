"""data.cache: batched crops and flips against plain tensor operations, crop statistics, the cached
validation images equal the eval transform's, the choice of cache, and a cached training run."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers_ckpt import assert_one_line_error, make_folder, run_cli
from helpers_train import (
    one_torch_thread,  # noqa: F401  (autouse fixture: one torch thread)
    tiny_config,
    write_config,
)
from PIL import Image
from torchvision.transforms.v2.functional import pil_to_tensor

import semodel.cache as cache
from semodel.config import validate
from semodel.data import eval_transform, load_rgb, scan_dataset
from semodel.preprocess import preprocess_of


def full_box(n: int) -> torch.Tensor:
    return torch.tensor([[1.0, 1.0, 0.5, 0.5]]).repeat(n, 1)


def test_full_crop_is_a_plain_bilinear_resize():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (3, 3, 40, 40), dtype=torch.uint8)
    out = cache.resized_crops(images, full_box(3), 24)
    expected = F.interpolate(images.float() / 255, size=(24, 24), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_flips_mirror_the_crop():
    torch.manual_seed(1)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    boxes = torch.tensor([[0.6, 0.5, 0.4, 0.6]]).repeat(4, 1)
    plain = cache.resized_crops(images, boxes, 16)
    h = torch.tensor([True, False, True, False])
    v = torch.tensor([False, False, True, True])
    flipped = cache.resized_crops(images, boxes, 16, hflip=h, vflip=v)
    expected = plain.clone()
    expected[h] = expected[h].flip(-1)
    expected[v] = expected[v].flip(-2)
    torch.testing.assert_close(flipped, expected, rtol=0, atol=1e-5)


def test_a_box_crops_that_region():
    torch.manual_seed(2)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    # The left half (16 x 32 pixels), resized to 8 x 16 through a square output? Use the top-left quarter.
    boxes = torch.tensor([[0.5, 0.5, 0.25, 0.25]]).repeat(2, 1)
    out = cache.resized_crops(images, boxes, 8)
    quarter = images[:, :, :16, :16].float() / 255
    expected = F.interpolate(quarter, size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_crop_boxes_follow_the_scale_and_stay_inside():
    g = torch.Generator().manual_seed(3)
    boxes = cache.crop_boxes(20000, (0.35, 1.0), generator=g)
    w, h, cx, cy = boxes.unbind(1)
    assert ((cx - w / 2) >= -1e-6).all() and ((cx + w / 2) <= 1 + 1e-6).all()
    assert ((cy - h / 2) >= -1e-6).all() and ((cy + h / 2) <= 1 + 1e-6).all()
    drawn = (w < 1) & (h < 1)  # the rest: no draw fitted, the whole square
    assert ((w == 1) & (h == 1) & (cx == 0.5) & (cy == 0.5))[~drawn].all()
    area = (w * h)[drawn]
    assert area.min() >= 0.35 - 1e-6 and area.max() <= 1 + 1e-6
    assert area.min() < 0.36 and area.max() > 0.95  # the whole range is drawn
    aspect = w / h
    assert aspect.min() >= 3 / 4 - 1e-4 and aspect.max() <= 4 / 3 + 1e-4
    # scale 1 on a square: no draw but the aspect ratio 1 fits, so the crop is the whole image, as
    # the uncached path's random resized crop makes it
    assert (cache.crop_boxes(100, (1.0, 1.0), generator=g) == torch.tensor([1.0, 1.0, 0.5, 0.5])).all()


def test_crop_boxes_are_drawn_in_the_images_pixel_proportions():
    g = torch.Generator().manual_seed(4)
    aspects = torch.tensor([3.0, 0.5, 1.5, 1.0]).repeat(5000)  # width / height
    boxes = cache.crop_boxes(len(aspects), (0.35, 1.0), generator=g, aspects=aspects)
    w, h, cx, cy = boxes.unbind(1)
    assert ((cx - w / 2) >= -1e-6).all() and ((cx + w / 2) <= 1 + 1e-6).all()
    assert ((cy - h / 2) >= -1e-6).all() and ((cy + h / 2) <= 1 + 1e-6).all()
    pixel_aspect = w * aspects / h  # the crop's width / height in the image's pixels
    assert pixel_aspect.min() >= 3 / 4 - 1e-4 and pixel_aspect.max() <= 4 / 3 + 1e-4
    drawn = (cx != 0.5) | (cy != 0.5)  # the rest: the whole image cut to the nearest aspect ratio
    assert (w * h)[drawn].min() >= 0.35 - 1e-6
    assert (torch.maximum(w, h)[~drawn] == 1).all()
    # On a 3:1 image a crop is at most as wide as 4/3 of the height: a quarter to 4/9 of the width,
    # and its centre reaches both ends.
    wide = aspects == 3.0
    assert w[wide].max() <= 4 / 9 + 1e-4
    assert (cx[wide] - w[wide] / 2).min() < 0.01 and (cx[wide] + w[wide] / 2).max() > 0.99


def test_cached_crops_of_a_wide_photo_reach_its_borders(tmp_path):
    # 90 x 30 px: red, green and blue thirds. A crop of the centred square would only ever be green.
    pixels = torch.zeros(30, 90, 3, dtype=torch.uint8)
    for third, channel in enumerate((0, 1, 2)):
        pixels[:, third * 30 : (third + 1) * 30, channel] = 255
    path = tmp_path / "wide.png"
    Image.fromarray(pixels.numpy()).save(path)
    image, aspect = cache.decode_whole(path, 40)
    assert image.shape == (3, 40, 40) and aspect == 3.0
    augment = cache.Augment(16, (0.35, 1.0), 0.0, 0.0, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    torch.manual_seed(5)
    crops = augment(image.unsqueeze(0).repeat(200, 1, 1, 1), torch.full((200,), aspect))
    strongest = crops.mean(dim=(2, 3)).argmax(dim=1)  # the colour each crop shows most
    assert set(strongest.tolist()) == {0, 1, 2}


def test_a_large_jpeg_is_decoded_at_a_reduced_scale_for_the_cache(tmp_path):
    torch.manual_seed(6)
    smooth = F.interpolate(torch.rand(1, 3, 6, 8) * 255, size=(600, 800), mode="bilinear")
    path = tmp_path / "photo.jpg"
    Image.fromarray(smooth[0].permute(1, 2, 0).round().byte().numpy()).save(path, quality=95)
    # min(800 // 73, 600 // 73) = 8: decoded at 1/8 scale, both sides still >= 73
    assert load_rgb(path, draft=(73, 73)).size == (100, 75)
    assert load_rgb(path).size == (800, 600)
    image, aspect = cache.decode_whole(path, 73)
    assert image.shape == (3, 73, 73) and aspect == 100 / 75
    full = F.interpolate(
        pil_to_tensor(load_rgb(path))[None].float(), size=(73, 73), mode="bilinear", antialias=True
    )
    assert (image.float() - full[0]).abs().mean() < 2.0  # the same picture, within a few grey levels


def test_cached_validation_images_equal_the_eval_transform(tmp_path):
    root = make_folder(tmp_path / "data", ["cat", "dog"], per_class=3)
    raw = tiny_config(root, tmp_path / "runs", data={"image_size": 20, "cache": "ram"})
    cfg = validate(raw, "t")
    data = scan_dataset(root)
    samples = data.samples
    for s in samples:
        s.split = "val"
    _, val = cache.cached_loaders(
        cfg, "ram", root, samples[:2], samples, [[0, 1]], torch.device("cpu"), print
    )
    images, labels = next(iter(val))
    transform = eval_transform(preprocess_of(cfg))
    expected = torch.stack([transform(load_rgb(root / s.path)) for s in samples])
    assert torch.equal(images, expected)  # bit for bit: a resumed run's calibration must not move
    assert labels.tolist() == [s.label for s in samples]


def test_choose(monkeypatch):
    base = {"data": {"root": "x", "image_size": 64}}
    cpu = torch.device("cpu")

    def cfg(**data):
        return validate({"data": {**base["data"], **data}}, "t")

    assert cfg().data.cache == "auto"  # the default
    assert cache.choose(cfg(cache="none"), cpu, 100, 10)[0] == "none"
    assert cache.choose(cfg(cache="ram"), cpu, 100, 10)[0] == "ram"
    monkeypatch.setattr(cache, "available_ram", lambda: 10**12)
    assert cache.choose(cfg(cache="auto"), cpu, 100, 10)[0] == "ram"
    monkeypatch.setattr(cache, "available_ram", lambda: 10**5)  # 100 KB: nothing fits
    kind, why = cache.choose(cfg(cache="auto"), cpu, 100, 10)
    assert kind == "none" and "does not fit" in why
    kind, why = cache.choose(cfg(cache="auto", augment={"color_jitter": 0.2}), cpu, 100, 10)
    assert kind == "none" and "color_jitter" in why
    with pytest.raises(Exception, match="does not do augment.auto_augment: trivial"):
        cache.choose(cfg(cache="ram", augment={"auto_augment": "trivial"}), cpu, 100, 10)
    with pytest.raises(Exception, match="gpu needs a CUDA device"):
        cache.choose(cfg(cache="gpu"), cpu, 100, 10)
    # 3 bytes per pixel: 100 training squares of 73 px (64 / 0.875) and 10 validation images of 64 px
    assert cache.cache_bytes(cfg(), 100, 10) == 3 * (100 * 73 * 73 + 10 * 64 * 64)


def test_cached_run_trains_and_validates_like_eval(tmp_path, capsys):
    root = make_folder(tmp_path / "data", ["cat", "dog", "fox"], per_class=8)
    raw = tiny_config(
        root, tmp_path / "runs", "cached", data={"cache": "ram", "batch_size": 6}, train={"epochs": 2}
    )
    code, out, err = run_cli(["train", "--config", write_config(tmp_path / "c.yaml", raw), "--quiet"], capsys)
    assert code == 0, err
    assert "data.cache: decoded 18 + 6 images once into RAM" in out
    run_dir = tmp_path / "runs" / "cached"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    code, out, err = run_cli(
        ["eval", run_dir / "best.pt", "--split", "val", "--output", tmp_path / "e.json", "--device", "cpu"],
        capsys,
    )
    assert code == 0, err
    evaluated = json.loads((tmp_path / "e.json").read_text())["metrics"]
    # The cached validation images are the eval transform's: the same predictions and loss.
    assert evaluated["acc"] == metrics["val"]["acc"]
    assert evaluated["confusion_matrix"] == metrics["val"]["confusion_matrix"]
    assert evaluated["loss"] == pytest.approx(metrics["val"]["loss"], rel=1e-5)


def test_gpu_cache_without_a_gpu_is_a_one_line_error(tmp_path, capsys):
    root = make_folder(tmp_path / "data", ["cat", "dog"], per_class=4)
    raw = tiny_config(root, tmp_path / "runs", "g", data={"cache": "gpu"})
    code, _, err = run_cli(["train", "--config", write_config(tmp_path / "g.yaml", raw)], capsys)
    assert_one_line_error(code, err, "data.cache: gpu needs a CUDA device")
    assert not (tmp_path / "runs").exists()  # refused before a run folder was made
