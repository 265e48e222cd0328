"""``semodel inspect``: what the channel attention of a trained model does.

- Excitation analysis (Hu et al., SENet, Sec. 7.2 and Fig. 6): for a sample of images per class,
  the mean attention weight of every channel at one attention module per stage (the last one in
  it: early, middle and last stages). Where the per-class curves coincide the attention is
  class-agnostic; where they separate it specialises. Each module gets a number for that, the
  *class spread* (mean over channels of max - min of the per-class means), next to the same
  spread between two random halves of each class (*noise*), which is what sampling alone gives.
- Learned widths (``reduction: learned``): hidden units kept per SE block, and the reduction
  ratio C / width that results.
- A Grad-CAM grid: a few images per class, their heat maps and predicted labels.

PNG files in ``--out`` (``excitation.png``, ``learned_widths.png``, ``gradcam.png``), the numbers
in ``inspect.json``, and with ``--tensorboard`` the same figures in ``--out/tensorboard``.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from semodel.data import Sample
from semodel.errors import SemodelError
from semodel.evalsets import EvalSet
from semodel.files import write_text_atomic
from semodel.models.attention import format_widths
from semodel.tables import align

_STAGE = re.compile(r"^(layer\d+|denseblock\d+)$")


# ----------------------------------------------------------------------------- attention sites


def attention_sites(model: nn.Module) -> dict[str, nn.Module]:
    """Every attention module (SE, pruned learned-width SE, ECA) by name, in forward order."""
    from semodel.models.attention import ATTENTION_TYPES

    return {name: m for name, m in model.named_modules() if isinstance(m, ATTENTION_TYPES)}


def stage_of(name: str) -> str:
    """``layer3.1.se`` -> ``layer3``; ``features.denseblock2.denselayer4.se`` -> ``features.denseblock2``."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if _STAGE.match(part):
            return ".".join(parts[: i + 1])
    return name


def default_sites(sites: dict[str, nn.Module]) -> list[str]:
    """The last attention module of every stage (dict order is forward order)."""
    last: dict[str, str] = {}
    for name in sites:
        last[stage_of(name)] = name
    return list(last.values())


def choose_sites(sites: dict[str, nn.Module], requested: list[str] | None) -> list[str]:
    if not requested:
        return default_sites(sites)
    unknown = [s for s in requested if s not in sites]
    if unknown:
        available = ", ".join(sites) if len(sites) <= 20 else ", ".join([*list(sites)[:20], "..."])
        raise SemodelError(
            f"--sites: no attention module {unknown[0]!r} in this model; available: {available}"
        )
    return list(requested)


# ----------------------------------------------------------------------------- excitation


@dataclass
class SiteStats:
    name: str
    channels: int
    class_means: torch.Tensor  # classes x C (NaN rows for classes without images)
    mean_weight: float
    class_spread: float  # mean over channels of (max - min) of the per-class means
    noise_spread: float  # the same between two random halves of each class, averaged over classes


def spread(means: torch.Tensor) -> float:
    """Mean over channels of max - min across the rows of ``means`` (rows x C)."""
    if means.shape[0] < 2:
        return float("nan")
    return float((means.amax(0) - means.amin(0)).mean())


def site_stats(
    name: str, weights: torch.Tensor, labels: torch.Tensor, num_classes: int, seed: int = 0
) -> SiteStats:
    """Per-class means of the excitation ``weights`` (N x C) and the two spreads."""
    channels = weights.shape[1]
    means = torch.full((num_classes, channels), float("nan"))
    halves = []
    generator = torch.Generator().manual_seed(seed)
    for c in range(num_classes):
        rows = weights[labels == c]
        if len(rows):
            means[c] = rows.mean(0)
        if len(rows) >= 2:
            order = torch.randperm(len(rows), generator=generator)
            a, b = rows[order[: len(rows) // 2]], rows[order[len(rows) // 2 :]]
            halves.append(spread(torch.stack([a.mean(0), b.mean(0)])))
    present = means[~means.isnan().any(1)]
    return SiteStats(
        name=name,
        channels=channels,
        class_means=means,
        mean_weight=float(weights.mean()),
        class_spread=spread(present),
        noise_spread=sum(halves) / len(halves) if halves else float("nan"),
    )


def collect_excitations(
    model: nn.Module, sites: dict[str, nn.Module], names: list[str], loader, device: torch.device
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Excitation weights (N x C per site), labels (N) and logits (N x classes) over ``loader``.

    A forward hook on each module's ``gate`` (the sigmoid that produces the weights) reads them.
    """
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    handles = [
        sites[name].gate.register_forward_hook(
            lambda module, args, out, name=name: captured[name].append(out.detach().flatten(1).float().cpu())
        )
        for name in names
    ]
    labels, logits = [], []
    try:
        with torch.inference_mode():
            for images, targets in loader:
                if images.numel() == 0:
                    continue
                logits.append(model(images.to(device)).float().cpu())
                labels.append(targets)
    finally:
        for handle in handles:
            handle.remove()
    if not labels:
        raise SemodelError("none of the sampled images could be read")
    return {n: torch.cat(v) for n, v in captured.items()}, torch.cat(labels), torch.cat(logits)


# ----------------------------------------------------------------------------- learned widths


def widths_from_state(state_dict: dict[str, torch.Tensor]) -> dict[str, dict[str, int]]:
    """Learned widths from a checkpoint's gated weights: ``{block: {channels, start, width}}``."""
    widths = {}
    for key, gates in state_dict.items():
        if key.endswith(".unit_gate"):
            block = key.removesuffix(".unit_gate")
            widths[block] = {
                "channels": int(state_dict[f"{block}.fc1.weight"].shape[1]),
                "start": int(gates.numel()),
                "width": int((gates > 0).sum()),
            }
    return widths


# ----------------------------------------------------------------------------- figures


def excitation_figure(stats: list[SiteStats], classes: list[str]):
    from semodel.plots import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(len(stats), 1, figsize=(9, 2.3 * len(stats) + 0.6), dpi=100, squeeze=False)
    for ax, s in zip(axes[:, 0], stats, strict=True):
        for c, name in enumerate(classes):
            if not s.class_means[c].isnan().any():
                ax.plot(s.class_means[c].numpy(), lw=0.9, label=name)
        ax.set_xlim(0, s.channels - 1)
        ax.set_ylim(0, 1)
        ax.set_ylabel("mean weight")
        spreads = f"class spread {s.class_spread:.3f}, noise {s.noise_spread:.3f}"
        ax.set_title(f"{s.name} ({s.channels} channels): {spreads}", fontsize=9)
    axes[-1, 0].set_xlabel("channel index")
    axes[0, 0].legend(loc="upper right", fontsize=8, ncol=min(len(classes), 5))
    fig.suptitle("excitation per channel, mean over each class's images", fontsize=10)
    fig.tight_layout()
    return fig


def widths_figure(widths: dict[str, dict[str, int]]):
    from semodel.plots import pyplot

    plt = pyplot()
    names = list(widths)
    fig, ax = plt.subplots(figsize=(8, 0.28 * len(names) + 1.4), dpi=100)
    y = range(len(names))
    ax.barh(y, [widths[n]["start"] for n in names], color="#d0d7e2", label="started with")
    ax.barh(y, [widths[n]["width"] for n in names], color="#3465a4", label="learned (kept)")
    for i, n in enumerate(names):
        w = widths[n]
        ratio = f"r = {w['channels'] / w['width']:.0f}" if w["width"] else "closed"
        ax.text(w["start"], i, f" {w['width']}/{w['start']}  {ratio}", va="center", fontsize=7)
    ax.set_yticks(list(y), [n.removesuffix(".se") for n in names], fontsize=7)
    ax.set_xlim(0, 1.35 * max(w["start"] for w in widths.values()))  # room for the labels
    ax.invert_yaxis()
    ax.set_xlabel("SE hidden units")
    ax.set_title("learned SE width per block (r = channels / width)", fontsize=10)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return fig


def gradcam_figure(cells: list[list[dict[str, Any]]], classes: list[str]):
    """Rows = true classes; each cell: the overlay, titled with the prediction (green right, red wrong)."""
    from semodel.plots import pyplot

    plt = pyplot()
    cols = max(len(row) for row in cells)
    fig, axes = plt.subplots(len(cells), cols, figsize=(2.2 * cols, 2.4 * len(cells)), dpi=100, squeeze=False)
    for r, row in enumerate(cells):
        for c in range(cols):
            ax = axes[r, c]
            ax.axis("off")
            if c >= len(row):
                continue
            cell = row[c]
            ax.imshow(cell["overlay"])
            right = cell["predicted"] == cell["true"]
            ax.set_title(
                f"{cell['predicted']} {cell['prob']:.2f}", fontsize=8, color="green" if right else "red"
            )
        axes[r, 0].text(
            -0.08,
            0.5,
            classes[r],
            transform=axes[r, 0].transAxes,
            rotation=90,
            ha="right",
            va="center",
            fontsize=9,
        )
    fig.suptitle(
        "Grad-CAM of the predicted class (rows: true class; title: predicted, probability)", fontsize=9
    )
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- the command


def sample_per_class(samples: list[Sample], num_classes: int, n: int, seed: int) -> list[Sample]:
    """Up to ``n`` images of every class, chosen at random (``seed``), in a fixed order."""
    rng = random.Random(seed)
    chosen = []
    for c in range(num_classes):
        members = sorted((s for s in samples if s.label == c), key=lambda s: s.path)
        chosen += rng.sample(members, min(n, len(members)))
    return chosen


def gradcam_cells(model, preprocess, images: EvalSet, classes, per_class: int, device) -> list[list[dict]]:
    """Up to ``per_class`` Grad-CAM overlays per true class (rows), with the prediction of each."""
    from semodel.data import read_image
    from semodel.gradcam import grad_cam, overlay
    from semodel.preprocess import preprocess_image

    rows: list[list[dict[str, Any]]] = []
    for c in range(len(classes)):
        row = []
        for s in (s for s in images.samples if s.label == c):
            if len(row) == per_class:
                break
            try:
                image = read_image(images.root / s.path)
            except SemodelError:
                continue  # already reported by the excitation pass
            x = preprocess_image(image, preprocess)[None].to(device)
            logits, cams, target = grad_cam(model, x)
            prob = float(torch.softmax(logits.float(), 1)[0, target[0]])
            row.append(
                {
                    "path": s.path,
                    "true": classes[c],
                    "predicted": classes[int(target[0])],
                    "prob": prob,
                    "overlay": overlay(image, cams[0].cpu(), preprocess),
                }
            )
        rows.append(row)
    return rows


@dataclass
class InspectOptions:
    """``semodel inspect``'s options besides the checkpoint, the data and the output folder."""

    per_class: int = 32  # images per class for the excitation analysis
    cams: int = 4  # images per class in the Grad-CAM grid (0: none)
    sites: list[str] | None = None  # attention modules to analyse (None: the last of every stage)
    device: str = "auto"
    use_ema: bool | None = None  # None: the weights the run selected
    batch_size: int = 32
    tensorboard: bool = False
    seed: int = 0  # which images are sampled


def inspect_checkpoint(
    checkpoint: Path,
    data: Path,
    out: Path,
    options: InspectOptions | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Write the figures and ``inspect.json`` to ``out``; returns what ``inspect.json`` holds."""
    from semodel.checkpoint import build_from_checkpoint, load_checkpoint, uses_ema
    from semodel.evalsets import folder_eval_set
    from semodel.loaders import eval_loader
    from semodel.runtime import resolve_device

    o = options or InspectOptions()
    if o.per_class < 1 or o.cams < 0 or o.batch_size < 1:
        raise SemodelError("--per-class and --batch-size must be at least 1, --cams at least 0")
    checkpoint = Path(checkpoint)
    state = load_checkpoint(checkpoint)
    classes = list(state["classes"])
    images = folder_eval_set(Path(data), classes, "all")
    chosen = EvalSet(
        images.root, sample_per_class(images.samples, len(classes), o.per_class, o.seed), "all", ""
    )
    dev = resolve_device(o.device)
    widths = widths_from_state(state["ema"] if uses_ema(state, o.use_ema) else state["model"])
    model = build_from_checkpoint(state, use_ema=o.use_ema, source=str(checkpoint)).to(dev)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SemodelError(f"--out {out}: cannot create the folder ({e.strerror or e})") from None

    all_sites = attention_sites(model)
    names = choose_sites(all_sites, o.sites)
    counts = [sum(s.label == c for s in chosen.samples) for c in range(len(classes))]
    shown = ", ".join(f"{n} {c}" for n, c in zip(counts, classes, strict=True))
    model_cfg = state["config"]["model"]
    log(
        f"{checkpoint}: {model_cfg['name']} (attention {model_cfg['attention']}), {len(all_sites)} attention "
        f"modules; images: {shown} from {images.root}"
    )
    loader = eval_loader(chosen.root, chosen.samples, state["preprocess"], o.batch_size, num_workers=0)
    excitations, labels, logits = collect_excitations(model, all_sites, names, loader, dev)
    stats = [site_stats(n, excitations[n], labels, len(classes), o.seed) for n in names]
    accuracy = float((logits.argmax(1) == labels).float().mean())
    cells = gradcam_cells(model, state["preprocess"], chosen, classes, o.cams, dev) if o.cams else []
    if not stats:
        log("no attention modules in this model (attention: none): no excitation analysis")
    written = write_figures(figures_of(stats, widths, cells, classes), out, o.tensorboard)

    result = {
        "checkpoint": str(checkpoint),
        "model": model_cfg,
        "weights": "ema" if uses_ema(state, o.use_ema) else "model",
        "data": str(images.root),
        "images_per_class": {c: int((labels == i).sum()) for i, c in enumerate(classes)},
        "accuracy_on_sample": accuracy,
        "sites": [site_json(s, classes) for s in stats],
        "learned_widths": widths,
        "gradcam": [{k: v for k, v in cell.items() if k != "overlay"} for row in cells for cell in row],
    }
    write_text_atomic(out / "inspect.json", json.dumps(result, indent=2, allow_nan=False) + "\n")
    for line in format_summary(stats, widths, accuracy):
        log(line)
    tb = f"; TensorBoard: {out / 'tensorboard'}" if o.tensorboard else ""
    log("wrote " + ", ".join(str(p) for p in [*written, out / "inspect.json"]) + tb)
    return result


def figures_of(
    stats: list[SiteStats], widths: dict, cells: list[list[dict]], classes: list[str]
) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    if stats:
        figures["excitation"] = excitation_figure(stats, classes)
    if widths:
        figures["learned_widths"] = widths_figure(widths)
    if cells and any(cells):
        figures["gradcam"] = gradcam_figure(cells, classes)
    return figures


def write_figures(figures: dict[str, Any], out: Path, tensorboard: bool) -> list[Path]:
    """Each figure as ``out/<name>.png`` (and in ``out/tensorboard`` when asked); the PNG paths."""
    from semodel.plots import save_figure

    writer = None
    if tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tensorboard"))
    written = []
    for name, fig in figures.items():
        if writer is not None:
            writer.add_figure(f"inspect/{name}", fig, close=False)
        written.append(save_figure(fig, out / f"{name}.png"))
    if writer is not None:
        writer.close()
    return written


def site_json(s: SiteStats, classes: list[str]) -> dict[str, Any]:
    return {
        "name": s.name,
        "channels": s.channels,
        "mean_weight": s.mean_weight,
        "class_spread": nan_to_none(s.class_spread),
        "noise_spread": nan_to_none(s.noise_spread),
        "class_means": {
            c: None if s.class_means[i].isnan().any() else [round(v, 5) for v in s.class_means[i].tolist()]
            for i, c in enumerate(classes)
        },
    }


def nan_to_none(value: float) -> float | None:
    """NaN (a spread that needs two classes or two images) as JSON null."""
    return None if value != value else value


def format_summary(stats: list[SiteStats], widths: dict[str, dict[str, int]], accuracy: float) -> list[str]:
    lines = [
        f"accuracy on the sampled images: {accuracy:.1%} (not a test figure if --data holds training images)"
    ]
    if stats:
        header = ["attention module", "channels", "mean weight", "class spread", "noise"]
        rows = [
            [
                s.name,
                str(s.channels),
                f"{s.mean_weight:.3f}",
                f"{s.class_spread:.3f}",
                f"{s.noise_spread:.3f}",
            ]
            for s in stats
        ]
        lines += align([header, *rows])
        lines.append(
            "(class spread: mean over channels of max - min of the per-class mean weights; "
            "noise: the same between two random halves of a class)"
        )
    if widths:
        kept = sum(w["width"] for w in widths.values())
        start = sum(w["start"] for w in widths.values())
        lines.append(
            f"learned SE widths: {kept} of {start} hidden units kept; per block: {format_widths(widths)}"
        )
    return lines
