"""The fused attention tail of residual blocks (semodel.models.fused) against the plain composition
``relu(x * excite(mean(x)) + identity)``: forward, every gradient, memory formats, dtypes, the paths
taken (fused / plain / no-grad / hooked / graph capture), and whole models fused vs unfused."""

from __future__ import annotations

import pytest
import torch
from helpers_train import one_torch_thread  # noqa: F401  (autouse fixture: one torch thread)

import semodel.models.fused as fused
from semodel.models import EfficientChannelAttention, LearnedWidthSE, SqueezeExcite, build_model
from semodel.models.fused import SEResidualTail, residual_tail_reference, se_residual_tail, set_fused

ATTENTIONS = {
    "se": lambda c: SqueezeExcite(c, 4),
    "se_hard_sigmoid": lambda c: SqueezeExcite(c, 4, gate="hard_sigmoid"),
    "eca": lambda c: EfficientChannelAttention(c),
    "learned": lambda c: LearnedWidthSE(c, 2),
}
FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


@pytest.fixture
def always_fused(monkeypatch):
    """Take the fused node for every size (the tests use small tensors)."""
    monkeypatch.setattr(fused, "MIN_FUSED_ELEMENTS", 0)


def make_inputs(attention: str, fmt: str, shape=(3, 8, 5, 4), seed: int = 0, dtype=torch.float64):
    torch.manual_seed(seed)
    att = ATTENTIONS[attention](shape[1]).to(dtype)
    with torch.no_grad():  # spread the weights so the gates are not all ~0.5 and some ReLUs clip
        for p in att.parameters():
            p.add_(torch.randn_like(p))
        if isinstance(att, LearnedWidthSE):
            att.unit_gate[0] = -0.5  # one closed unit: it must get no gradient through max(g, 0)
    x = torch.randn(shape, dtype=dtype).contiguous(memory_format=FORMATS[fmt]).requires_grad_()
    identity = torch.randn(shape, dtype=dtype).contiguous(memory_format=FORMATS[fmt]).requires_grad_()
    return att, x, identity


def grads(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out, allow_unused=True)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_gradcheck(attention, fmt):
    att, x, identity = make_inputs(attention, fmt)
    params = tuple(att.parameters())
    fn = lambda x, i, *p: SEResidualTail.apply(x, i, att.excite, *p)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, identity, *params))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_matches_plain_composition(always_fused, attention, fmt):
    att, x, identity = make_inputs(attention, fmt, shape=(4, 16, 7, 6))
    inputs = (x, identity, *att.parameters())
    out = se_residual_tail(x, identity, att)
    assert type(out.grad_fn).__name__ == "SEResidualTailBackward"  # the fused node was taken
    ref = residual_tail_reference(x, identity, att.excite)
    assert (ref == 0).any() and (ref > 0).any()  # the ReLU clips some entries and passes others
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    grad_out = torch.randn_like(out)
    for name, a, b in zip(
        ["x", "identity"] + [n for n, _ in att.named_parameters()],
        grads(out, inputs, grad_out),
        grads(ref, inputs, grad_out),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m, n=name: f"d{n}: {m}")
    # the same module call as in a block with attention, by hand: x * w where w = excitation(x)
    torch.testing.assert_close(out, torch.relu(att(x) + identity), rtol=1e-12, atol=1e-12)


def test_closed_learned_unit_gets_no_gradient(always_fused):
    att, x, identity = make_inputs("learned", "nchw", shape=(4, 16, 7, 6))
    out = se_residual_tail(x, identity, att)
    out.backward(torch.randn_like(out))
    assert att.unit_gate.grad[0] == 0 and att.unit_gate.grad[1:].abs().sum() > 0
    assert att.fc1.weight.grad[0].abs().sum() == 0  # the closed unit's row: no task gradient


@pytest.mark.parametrize("fmt", FORMATS)
def test_memory_format_kept_for_output_and_gradients(always_fused, fmt):
    att, x, identity = make_inputs("se", fmt, shape=(2, 16, 6, 6), dtype=torch.float32)
    out = se_residual_tail(x, identity, att)
    dx, di = grads(out, (x, identity), torch.randn_like(out))
    for t in (out, dx, di):
        assert t.is_contiguous(memory_format=FORMATS[fmt]), t.stride()


def test_only_the_requested_gradients(always_fused):
    att, x, identity = make_inputs("se", "nchw")
    identity.requires_grad_(False)
    for p in att.parameters():
        p.requires_grad_(False)
    out = se_residual_tail(x, identity, att)
    assert type(out.grad_fn).__name__ == "SEResidualTailBackward"  # x still needs a gradient
    out.sum().backward()
    ref_x = x.detach().clone().requires_grad_()
    residual_tail_reference(ref_x, identity, att.excite).sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-10, atol=1e-12)
    assert identity.grad is None and all(p.grad is None for p in att.parameters())


def test_backward_twice_with_retain_graph(always_fused):
    att, x, identity = make_inputs("se", "nchw")
    out = se_residual_tail(x, identity, att).sum()
    first = torch.autograd.grad(out, (x, *att.parameters()), retain_graph=True)
    second = torch.autograd.grad(out, (x, *att.parameters()))
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b)


def test_bf16_autocast_close_to_fp32(always_fused):
    att, x, identity = make_inputs("se", "channels_last", shape=(4, 32, 8, 8), dtype=torch.float32)
    x32 = x.detach().clone().requires_grad_()
    ref = residual_tail_reference(x32, identity, att.excite)
    (ref_dx,) = torch.autograd.grad(ref, x32, torch.ones_like(ref))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        xb = x.detach().to(torch.bfloat16).requires_grad_()
        out = se_residual_tail(xb, identity.detach().to(torch.bfloat16), att)
    assert type(out.grad_fn).__name__ == "SEResidualTailBackward"
    dx, dw = torch.autograd.grad(out, (xb, att.fc1.weight), torch.ones_like(out))
    assert dx.dtype == torch.bfloat16 and dw.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref, rtol=0.03, atol=0.03)
    # where the pre-ReLU value is within bf16 rounding of 0, the ReLU may go either way
    pre = (x.detach() * att.excitation(x.detach()) + identity).detach()
    away = (pre.abs() > 0.05).expand_as(dx)
    assert away.float().mean() > 0.9
    torch.testing.assert_close(dx.float()[away], ref_dx[away], rtol=0.05, atol=0.05)


def test_paths_taken(monkeypatch):
    att, x, identity = make_inputs("se", "nchw", shape=(2, 8, 4, 4))
    name = lambda t: type(t.grad_fn).__name__  # noqa: E731
    # small tensors: the plain ops (the node's fixed overhead would not pay)
    assert name(se_residual_tail(x, identity, att)) == "ReluBackward0"
    monkeypatch.setattr(fused, "MIN_FUSED_ELEMENTS", x.numel())
    assert name(se_residual_tail(x, identity, att)) == "SEResidualTailBackward"
    # no autograd: nothing recorded, same values
    with torch.no_grad():
        out = se_residual_tail(x, identity, att)
    assert out.grad_fn is None
    torch.testing.assert_close(out, residual_tail_reference(x, identity, att.excite).detach())
    # while a graph is captured (compile / export / tracing): the plain ops
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert name(se_residual_tail(x, identity, att)) == "ReluBackward0"


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
def test_trace_records_no_python_op(always_fused):
    torch.manual_seed(0)
    model = build_model("se_resnet18", num_classes=3).train()
    traced = torch.jit.trace(model, torch.randn(2, 3, 32, 32), check_trace=False)
    kinds = {node.kind() for node in traced.inlined_graph.nodes()}
    assert "prim::PythonOp" not in kinds and {"aten::mean", "aten::mul", "aten::add"} <= kinds


def test_hooked_attention_is_called_as_a_module(always_fused):
    torch.manual_seed(0)
    model = build_model("se_resnet18", num_classes=3).train()
    block = model.layer1[0]
    calls = []
    handle = block.se.register_forward_hook(lambda m, a, o: calls.append(o))
    block_input = torch.randn(2, 64, 8, 8)
    hooked = block(block_input)
    assert len(calls) == 1 and type(hooked.grad_fn).__name__ == "ReluBackward0"
    handle.remove()
    unhooked = block(block_input)
    assert len(calls) == 1 and type(unhooked.grad_fn).__name__ == "SEResidualTailBackward"
    torch.testing.assert_close(hooked, unhooked)


@pytest.mark.parametrize(
    "name,placement",
    [("se_resnet18", None), ("se_resnet50", None), ("se_resnet18", "eca"), ("se_resnet18", "learned")],
)
@pytest.mark.parametrize("fmt", FORMATS)
def test_whole_model_fused_equals_unfused(always_fused, name, placement, fmt):
    """Outputs and every parameter gradient of a training step, fused blocks vs plain blocks."""
    kw = {"eca": {"attention": "eca"}, "learned": {"reduction": "learned"}}.get(placement, {})
    models = []
    for enabled in (True, False):
        torch.manual_seed(0)
        model = build_model(name, num_classes=5, **kw).double().train()
        model = model.to(memory_format=FORMATS[fmt])
        assert set_fused(model, enabled) == len([m for m in model.modules() if hasattr(m, "se")])
        models.append(model)
    torch.manual_seed(1)
    x = torch.randn(3, 3, 40, 40, dtype=torch.float64).contiguous(memory_format=FORMATS[fmt])
    y = torch.tensor([0, 3, 4])
    results = []
    for model in models:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_f, grads_f), (loss_p, grads_p) = results
    torch.testing.assert_close(loss_f, loss_p, rtol=1e-12, atol=1e-12)
    assert grads_f.keys() == grads_p.keys()
    for n in grads_f:
        if grads_p[n] is None:
            assert grads_f[n] is None, n
            continue
        torch.testing.assert_close(
            grads_f[n], grads_p[n], rtol=1e-9, atol=1e-11, msg=lambda m, n=n: f"{n}: {m}"
        )
    for a, b in zip(models[0].buffers(), models[1].buffers(), strict=True):  # BN running statistics
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_onnx_export_with_fused_blocks(always_fused, tmp_path):
    """torch.onnx.export (torch.export underneath) sees the plain ops, and the file computes the same."""
    from semodel.export import run_onnx, write_onnx

    torch.manual_seed(0)
    model = build_model("se_resnet18", num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    write_onnx(model, x, tmp_path / "m.onnx", {"model": "se_resnet18", "classes": "a,b,c"})
    with torch.no_grad():
        want = model(x)
    torch.testing.assert_close(run_onnx(tmp_path / "m.onnx", x), want, rtol=1e-4, atol=1e-4)
