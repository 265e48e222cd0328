"""Grad-CAM (Selvaraju et al., 2017) from the last convolutional stage, and its overlay PNG.

For class c with score y_c and last-stage feature maps A_k (h x w), the map is
``ReLU(sum_k alpha_k A_k)`` with ``alpha_k = mean_ij dy_c / dA_k[i, j]``, normalised per image
to [0, 1]. The model is split with ``forward_features`` / ``forward_head``, so only the head is
differentiated: the backbone runs once, without a graph.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from semodel.preprocess import model_view_box


def grad_cam(
    model: nn.Module, images: torch.Tensor, target: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits (N x C), Grad-CAM maps (N x h x w, each in [0, 1]) and the classes they explain.

    ``target`` defaults to the predicted class of each image. The model must be in eval mode
    (batch norm then treats images independently, so a batch gives each image's own map).
    """
    with torch.no_grad():
        features = model.forward_features(images)
    features = features.detach().float().requires_grad_(True)
    with torch.enable_grad():
        logits = model.forward_head(features)
        if target is None:
            target = logits.argmax(1)
        score = logits.gather(1, target.view(-1, 1)).sum()
        (grads,) = torch.autograd.grad(score, features)
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cams = F.relu((weights * features.detach()).sum(1))
    peak = cams.amax(dim=(1, 2), keepdim=True)
    cams = torch.where(peak > 0, cams / peak.clamp_min(1e-12), cams)
    return logits.detach(), cams, target


def overlay(
    image: Image.Image, cam: torch.Tensor, preprocess: dict[str, Any], alpha: float = 0.45
) -> Image.Image:
    """The part of ``image`` the model saw, at display size (224 to 512 px), with ``cam`` as a heat map."""
    import numpy as np
    from matplotlib import colormaps

    view = image.convert("RGB").crop(tuple(round(v) for v in model_view_box(*image.size, preprocess)))
    scale = max(1.0, 224 / min(view.size))  # enlarge small inputs so the map is visible
    scale = min(scale, 512 / max(view.size)) if max(view.size) * scale > 512 else scale
    size = (max(1, round(view.width * scale)), max(1, round(view.height * scale)))
    view = view.resize(size, Image.Resampling.BILINEAR)
    heat = F.interpolate(
        cam[None, None].float(), size=(size[1], size[0]), mode="bilinear", align_corners=False
    )
    heat = heat[0, 0].clamp(0, 1).numpy()
    colored = colormaps["jet"](heat)[..., :3] * 255
    blended = (1 - alpha) * np.asarray(view, dtype=np.float32) + alpha * colored
    return Image.fromarray(blended.round().clip(0, 255).astype(np.uint8))


def save_overlay(image: Image.Image, cam: torch.Tensor, preprocess: dict[str, Any], path: Path) -> Path:
    overlay(image, cam, preprocess).save(path, format="PNG")
    return path


def explained_images(
    model: nn.Module, preprocess: dict[str, Any], items: list[dict[str, Any]], device
) -> list:
    """A grid cell per item (``{"path", "true", "predicted", "prob"}``): the part of the image the model
    saw with the Grad-CAM of its predicted class, titled with the true and predicted class."""
    from semodel.data import read_image
    from semodel.errors import SemodelError
    from semodel.plots import GridCell
    from semodel.preprocess import preprocess_image

    cells = []
    for item in items:
        try:
            image = read_image(Path(item["path"]))
        except SemodelError:
            continue  # gone since it was evaluated
        x = preprocess_image(image, preprocess)[None].to(device)
        _, cams, _ = grad_cam(model, x)
        lines = [f"true: {item['true']}", f"predicted: {item['predicted']}", f"p = {item['prob']:.3f}"]
        cells.append(GridCell(overlay(image, cams[0].cpu(), preprocess), lines))
    return cells
