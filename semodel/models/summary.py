"""Sizes of the registered models: parameters, GFLOPs, and what SE adds to the plain backbone."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from semodel.models import MODEL_NAMES, build_model


@dataclass
class ModelSize:
    name: str
    params: int
    gflops: float
    params_plain: int
    gflops_plain: float

    @property
    def params_overhead(self) -> float:
        return self.params / self.params_plain - 1

    @property
    def gflops_overhead(self) -> float:
        return self.gflops / self.gflops_plain - 1


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def measure(name: str, image_size: int = 224, num_classes: int = 1000, **options) -> tuple[int, float]:
    """Parameters and GFLOPs of one forward pass of one image.

    The model is built on the meta device, so nothing is allocated or computed: torch's flop
    counter works from the shapes. It counts a multiply-add as 2 FLOPs and counts convolutions
    and matrix products only (the SE pooling and scaling are element-wise and not counted).
    Papers usually quote multiply-adds, i.e. half of this figure (ResNet-50: about 4.1 G).
    """
    with torch.device("meta"):
        model = build_model(name, num_classes, **options)
        x = torch.empty(1, 3, image_size, image_size)
    model.eval()  # a batch of one image: BN in training mode would refuse a 1x1 feature map
    counter = FlopCounterMode(display=False)
    with counter:
        model(x)
    return count_parameters(model), counter.get_total_flops() / 1e9


def summarize(name: str, image_size: int = 224, num_classes: int = 1000, **options) -> ModelSize:
    params, gflops = measure(name, image_size, num_classes, **options)
    plain_params, plain_gflops = measure(name, image_size, num_classes, **{**options, "attention": "none"})
    return ModelSize(name, params, gflops, plain_params, plain_gflops)


def summarize_all(image_size: int = 224, num_classes: int = 1000, **options) -> list[ModelSize]:
    return [summarize(name, image_size, num_classes, **options) for name in MODEL_NAMES]


# (column title, build_model options) of the attention variants compared by `semodel models --variants`
VARIANTS = (
    ("none", {"attention": "none"}),
    ("se r=16", {"attention": "se", "reduction": 16}),
    ("se learned (start r=4)", {"attention": "se", "reduction": "learned"}),
    ("eca", {"attention": "eca"}),
)


def variant_table(num_classes: int = 1000, markdown: bool = False, **options) -> str:
    """Parameters of every model with every attention variant (same other options).

    The learned-width column is the size trained (every unit open); pruning after training
    removes the closed units, so the final model lies between the ``none`` and this column.
    """
    header = ["model", *(title for title, _ in VARIANTS)]
    body = []
    for name in MODEL_NAMES:
        counts = [measure(name, 64, num_classes, **{**options, **variant})[0] for _, variant in VARIANTS]
        plain = counts[0]
        body.append([name, f"{plain:,}", *(f"{n:,} (+{n - plain:,})" for n in counts[1:])])
    return _table(header, body, markdown)


def format_table(rows: list[ModelSize], image_size: int = 224, markdown: bool = False) -> str:
    header = [
        "model",
        "params",
        f"GFLOPs@{image_size}",
        "params without attention",
        "attention adds params",
        "attention adds FLOPs",
    ]
    body = [
        [
            r.name,
            f"{r.params:,}",
            f"{r.gflops:.2f}",
            f"{r.params_plain:,}",
            f"+{r.params_overhead:.1%}",
            f"+{r.gflops_overhead:.2%}",
        ]
        for r in rows
    ]
    return _table(header, body, markdown)


def _table(header: list[str], body: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*header), fmt.format(*["-" * w for w in widths])]
    lines += [fmt.format(*row) for row in body]
    return "\n".join(lines)
