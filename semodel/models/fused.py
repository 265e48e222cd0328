"""The attention part of a residual block as one autograd node: ``relu(x * excite(mean(x)) + identity)``.

Written as separate PyTorch ops (``out = se(out); relu(out + identity)``), the attention costs the
block several extra passes over its full ``N x C x H x W`` output beyond the pooling itself: the
broadcast multiply and the add forward; backward, ``grad * w`` and ``grad * x`` for the multiply,
a full-size ``grad / (H W)`` from the mean's backward and one more pass that accumulates it into
the input gradient. ``SEResidualTail`` does the same computation with fewer passes:

forward:   s = mean(x);  w = excite(s)   (the small N x C x 1 x 1 graph, recorded as usual)
           out = addcmul(identity, x, w).relu_()                     (one pass + in-place ReLU)
backward:  g = grad where out > 0, else 0                            (the ReLU)
           d identity = g
           d w = sum over H, W of g * x;  d s and the parameters' gradients from the small graph
           d x = addcmul(d s / (H W), g, w)                          (scale path + mean path, one pass)

It keeps ``x`` and ``out`` for the backward (the block's own convolutions and the next layer hold
them anyway), so it needs no more memory than the plain composition. The result and every
gradient (input, shortcut, attention parameters) equal the plain composition's: tested in float64
against ``residual_tail_reference`` and with ``gradcheck``.

The node is used in training with autograd on, for block outputs of at least
``MIN_FUSED_ELEMENTS`` elements. Under ``torch.no_grad``/``inference_mode`` the tail is
``addcmul`` + in-place ReLU without saving anything; under tracing, scripting, ``torch.compile`` or
``torch.export``, and for smaller tensors, it is the plain composition, which those tools
understand (``torch.compile`` fuses it into few kernels by itself).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from semodel.models.attention import squeeze

# Below this many elements per block output the plain ops are used. The node saves whole passes
# over the tensor but costs a fixed ~0.1 ms of Python and autograd per block. Forward + backward
# at batch 32 on this project's 2-core CPU (`python scripts/bench_se_tail.py --device cpu
# --stages resnet18 --always-fused --rounds 9`): 1.56x faster at 64 channels x 16 x 16 (524k
# elements), even at 128 x 8 x 8 (262k), 0.87x and 0.81x at 256 x 4 x 4 and 512 x 2 x 2. The
# training shapes on a GPU (batch 256 at 224 px) are 25M elements and more.
MIN_FUSED_ELEMENTS = 1 << 19


class SEResidualTail(torch.autograd.Function):
    """``relu(x * excite(mean(x)) + identity)``; ``params`` are the tensors ``excite`` uses."""

    @staticmethod
    def forward(ctx, x, identity, excite, *params):  # type: ignore[override]
        s = squeeze(x)
        with torch.enable_grad():  # record the small graph s -> w for the backward
            s_in = s.detach().requires_grad_()
            w_graph = excite(s_in)
        w = w_graph.detach()
        out = torch.addcmul(identity, x, w).relu_()
        ctx.save_for_backward(x, out, w)
        ctx.small_graph = (s_in, w_graph, params)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        x, out, w = ctx.saved_tensors
        s_in, w_graph, params = ctx.small_graph
        need_x, need_identity = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_params = ctx.needs_input_grad[3:]
        g = torch.ops.aten.threshold_backward(grad, out, 0)
        grad_x = None
        param_grads: list[torch.Tensor | None] = [None] * len(params)
        wanted = [p for p, need in zip(params, need_params, strict=True) if need]
        if need_x or wanted:
            grad_w = (g * x).sum(dim=(2, 3), keepdim=True).to(w_graph.dtype)
            inputs = ([s_in] if need_x else []) + wanted
            # retain_graph: the small graph lives as long as this node (a backward with
            # retain_graph=True may come again); it is N x C sized, so keeping it costs nothing
            grads = list(torch.autograd.grad(w_graph, inputs, grad_w, retain_graph=True, allow_unused=True))
            if need_x:
                grad_s = grads.pop(0)
                hw = x.shape[2] * x.shape[3]
                # written straight into x's layout, which the convolution's backward expects
                grad_x = torch.empty_like(x, dtype=g.dtype)
                torch.addcmul((grad_s / hw).to(g.dtype), g, w.to(g.dtype), out=grad_x)
            it = iter(grads)
            param_grads = [next(it) if need else None for need in need_params]
        return (grad_x, g if need_identity else None, None, *param_grads)


def capturing_graph() -> bool:
    """True while a graph is being captured (tracing, scripting, torch.compile, torch.export)."""
    if torch.jit.is_scripting() or torch.jit.is_tracing():
        return True
    compiler = getattr(torch, "compiler", None)
    if compiler is not None:
        if compiler.is_compiling():
            return True
        is_exporting = getattr(compiler, "is_exporting", None)
        if is_exporting is not None and is_exporting():
            return True
    return False


def residual_tail_reference(
    x: torch.Tensor, identity: torch.Tensor, excite: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """The plain composition ``relu(x * excite(mean(x)) + identity)``: what the fused node must equal."""
    return torch.relu(x * excite(squeeze(x)) + identity)


def se_residual_tail(x: torch.Tensor, identity: torch.Tensor, attention: nn.Module) -> torch.Tensor:
    """``relu(attention(x) + identity)`` for an attention module with ``excite`` (SE, ECA, learned SE).

    ``x`` and ``identity``: N x C x H x W, any dtype and memory format (channels_last stays
    channels_last).
    """
    excite = attention.excite
    # capture first: the size checks would put tensor-to-bool conversions into a trace
    if (
        capturing_graph()
        or x.numel() < MIN_FUSED_ELEMENTS  # the saved passes would not pay for the node's overhead
        or x.dim() != 4
        or identity.shape != x.shape
    ):
        return residual_tail_reference(x, identity, excite)
    params = tuple(attention.parameters())
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or identity.requires_grad or any(p.requires_grad for p in params)
    )
    if not needs_grad:
        return torch.addcmul(identity, x, excite(squeeze(x))).relu_()
    return SEResidualTail.apply(x, identity, excite, *params)


def set_fused(model: nn.Module, enabled: bool) -> int:
    """Switch the fused attention tail on or off in every residual block of ``model``.

    The fused tail is the default; this is for benchmarks and tests. Returns the number of blocks set.
    """
    n = 0
    for m in model.modules():
        if hasattr(m, "fused_tail"):
            m.fused_tail = bool(enabled)
            n += 1
    return n
