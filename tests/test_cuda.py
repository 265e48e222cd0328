"""semodel on a CUDA GPU: the flow train -> eval -> predict (--cam) -> export, fp16's grad scaler,
channels_last, ``data.cache: gpu``, ``train.compile``, resume, and DDP over NCCL.

Every test is marked ``cuda`` and skipped where CUDA is absent (CI has no GPU; ``pytest -ra``
shows why). ``pytest -m cuda tests/test_cuda.py`` runs them on a GPU machine, and
``scripts/gpu_check.sh`` runs them as its first part (docs/gpu.md). Each run is an se_resnet18
(cifar stem) on 16 px images with 1-3 epochs of 1-3 steps, so that the whole file takes about two
minutes on an H100/H200, most of it the ``torch.compile`` of one test and the ONNX exports.

Tolerances: on CUDA, fp32 convolutions use TF32 by default (cuDNN) and autocast runs them in
bf16/fp16, so a model on the GPU and the same weights on the CPU agree to about 1% of the logits'
scale, not to 1e-5; where two GPU paths run the same kernels on the same shapes (a cached and an
uncached validation, a resumed and a straight deterministic run, DDP on one rank and a plain
run) the tests ask for (nearly) bit equality instead. The compiled run comes last: it is the
slowest, and a check cut short at its time cap then has the other outcomes already.

DDP over NCCL with one GPU: ``semodel train --nproc 1`` does not start torchrun (``--nproc N``
relaunches only for N > 1), and under torchrun with ``WORLD_SIZE=1`` ``semodel.distributed.init``
joins no process group, so neither exercises the NCCL path. The DDP test therefore replaces
``distributed.init`` with what it does for a CUDA rank (``set_device``, ``init_process_group("nccl")``),
for a world of one process that reports ``distributed``: every collective semodel makes
(``broadcast_object``, ``gather_objects``, ``any_rank`` on a CUDA tensor, ``broadcast_buffers``,
``barrier``), the DistributedDataParallel wrapper with ``device_ids``, its ``no_sync``, the
sharded sampler and the process group's shutdown then run over NCCL, and with one rank the
result must equal a plain single-process run. Several ranks on several GPUs are beyond one GPU.
"""

from __future__ import annotations

import copy
import json
import socket
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers_ckpt import TINTS, assert_one_line_error, make_folder, make_image, run_cli
from helpers_train import (
    all_finite,
    load_ckpt,
    merge,
    one_torch_thread,  # noqa: F401  (autouse fixture: one torch thread, switches restored)
    tiny_config,
    write_config,
)

import semodel.distributed
import semodel.train
from semodel.config import load_config, validate
from semodel.distributed import World
from semodel.models import build_model
from semodel.runlog import Logger
from semodel.runtime import rng_state, set_rng_state

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False here)"
    ),
]

CLASSES = ["cat", "dog", "fox"]
INIT_SCALE = 2.0**16  # torch.amp.GradScaler's initial scale


def cuda_config(root: Path, out_dir: Path, name: str, **sections) -> dict:
    """``tiny_config`` on the GPU: se_resnet18 (cifar stem), 16 px, ``train.device: cuda``."""
    return tiny_config(root, out_dir, name, **merge({"train": {"device": "cuda"}}, sections))


def quiet_run(raw: dict, tmp_path: Path) -> semodel.train.Run:
    """``semodel.train.setup_run`` for ``raw``: a Run ready for ``forward_backward`` /
    ``optimizer_step``, with a disabled TensorBoard logger and no run folder."""
    start = semodel.train.Start(None, None, None, lambda _: None, True)
    run = semodel.train.setup_run(validate(raw, "cuda test"), World(), start)
    run.logger = Logger(tmp_path, False, None)
    return run


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a if a[k].is_floating_point())


def assert_near(got: torch.Tensor, expected: torch.Tensor, rel: float, what: str) -> None:
    """``got`` within ``rel`` of the largest magnitude in ``expected`` (TF32 / bf16 / fp16 results
    against fp32 ones differ by a fraction of the values' scale, not by an absolute 1e-5)."""
    got, expected = got.detach().float().cpu(), expected.detach().float().cpu()
    assert got.shape == expected.shape, what
    scale = max(expected.abs().max().item(), 1e-3)
    diff = (got - expected).abs().max().item()
    assert diff <= rel * scale, f"{what}: max abs difference {diff:.3g}, {rel:g} of the scale {scale:.3g}"


@pytest.fixture(autouse=True)
def torch_switches():
    """Deterministic mode and cuDNN's switches as they were before each test (``train.deterministic``
    and ``seed_everything`` set them for the whole process)."""
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
    )
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[2], saved[3]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """24 tinted JPEGs of 40 x 36 px, 8 per class."""
    return make_folder(tmp_path_factory.mktemp("cuda-data") / "data", CLASSES, per_class=8)


# ----------------------------------------------------------------- train -> eval -> predict -> export


@pytest.fixture(scope="module", params=["bf16", "fp16"])
def flow(request, tmp_path_factory, data_root):
    """``semodel train`` on CUDA with ``train.amp`` bf16 or fp16 (channels_last, the default):
    12 train / 6 val / 6 test images, batch 6, 2 epochs: 4 optimizer steps."""
    amp = request.param
    base = tmp_path_factory.mktemp(f"flow-{amp}")
    raw = cuda_config(
        data_root,
        base / "runs",
        f"flow-{amp}",
        data={"batch_size": 6, "split": {"val": 0.25, "test": 0.25}},
        train={"amp": amp, "epochs": 2},
    )
    config = write_config(base / "flow.yaml", raw)
    lines: list[str] = []
    run_dir = semodel.train.fit(load_config(config), config, quiet=True, log=lines.append)
    return {"amp": amp, "base": base, "run_dir": run_dir, "log": "\n".join(lines)}


def test_train_on_cuda_with_mixed_precision(flow):
    run_dir, amp = flow["run_dir"], flow["amp"]
    log = flow["log"]
    assert "device: cuda" in log and f"amp: {amp}" in log, log
    assert "epoch 2/2" in log
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["device"].startswith("cuda") and metrics["epochs"] == 2
    assert metrics["test"]["n"] == 6 and np.isfinite(metrics["val"]["loss"])
    last = load_ckpt(run_dir / "last.pt")
    assert last["progress"]["global_step"] == 4 and all_finite(last["model"])
    assert len(last["rng"]["cuda"]) == torch.cuda.device_count()  # the CUDA streams are saved too
    if amp == "bf16":
        assert last["scaler"] is None  # bf16 needs no loss scaling
    else:
        # The scaler stepped: after 4 steps either its growth tracker counts the steps since the
        # last overflow, or an overflow halved the scale (fp16 gradients at scale 2^16 may).
        scaler = last["scaler"]
        assert scaler is not None and {"scale", "_growth_tracker"} <= set(scaler), scaler
        assert (scaler["scale"], scaler["_growth_tracker"]) != (INIT_SCALE, 0), scaler
        assert 0 < scaler["scale"] <= INIT_SCALE


def test_eval_on_cuda_agrees_with_the_cpu(flow, capsys, tmp_path):
    best = flow["run_dir"] / "best.pt"
    reports = {}
    for device in ("cuda", "cpu"):
        out = tmp_path / f"eval-{device}.json"
        args = ["eval", best, "--device", device, "--workers", "0", "--output", out]
        code, stdout, err = run_cli(args, capsys)
        assert code == 0, err
        reports[device] = json.loads(out.read_text())
    gpu, cpu = reports["cuda"], reports["cpu"]
    assert gpu["device"].startswith("cuda") and gpu["data"]["split"] == "test"
    assert gpu["metrics"]["n"] == cpu["metrics"]["n"] == 6
    # TF32 convolutions on the GPU: the same loss to within about 1%.
    assert gpu["metrics"]["loss"] == pytest.approx(cpu["metrics"]["loss"], rel=2e-2, abs=2e-3)


def predict_json(args: list, capsys) -> tuple[int, list[dict], str]:
    code, out, err = run_cli(["predict", "--format", "json", "--topk", "3", *args], capsys)
    return code, json.loads(out) if out.strip() else [], err


def as_probs(items: list[dict]) -> torch.Tensor:
    """Image x class probabilities (classes in CLASSES order) from predict's JSON."""
    return torch.tensor(
        [[{p["class"]: p["prob"] for p in i["predictions"]}[c] for c in CLASSES] for i in items]
    )


def test_predict_with_grad_cam_on_cuda(flow, capsys, tmp_path, data_root):
    from PIL import Image

    best = flow["run_dir"] / "best.pt"
    files = [str(data_root / c / f"{c}_{i}.jpg") for c in CLASSES for i in (0, 1)]
    cams = tmp_path / "cams"
    code, gpu_cam, err = predict_json(
        ["--checkpoint", best, "--device", "cuda", "--cam", cams, *files], capsys
    )
    assert code == 0, err
    assert "wrote 6 Grad-CAM overlay(s)" in err
    assert [i["path"] for i in gpu_cam] == files
    for item in gpu_cam:
        with Image.open(item["cam"]) as im:
            assert im.format == "PNG" and im.mode == "RGB" and min(im.size) >= 200
    code, gpu, err = predict_json(["--checkpoint", best, "--device", "cuda", *files], capsys)
    assert code == 0, err
    code, cpu, err = predict_json(["--checkpoint", best, "--device", "cpu", *files], capsys)
    assert code == 0, err
    # Grad-CAM's forward (features, then the head) is the plain forward split in two.
    assert_near(as_probs(gpu_cam), as_probs(gpu), 1e-3, "predict --cam vs predict on CUDA")
    # Probabilities within 0.01 of the CPU's (TF32 convolutions on the GPU).
    assert_near(as_probs(gpu), as_probs(cpu), 1e-2, "predict on CUDA vs on the CPU")


def test_onnx_export_of_a_cuda_trained_model_runs_in_onnxruntime_on_the_cpu(flow, capsys, tmp_path):
    ort = pytest.importorskip(
        "onnxruntime", reason="ONNX export needs the export extra: pip install -e '.[export]'"
    )
    from semodel.checkpoint import build_from_checkpoint, load_checkpoint

    best = flow["run_dir"] / "best.pt"
    out = tmp_path / "model.onnx"
    code, stdout, err = run_cli(["export", best, "--output", out], capsys)
    assert code == 0, err
    assert ": OK" in stdout  # export's own check: onnxruntime vs PyTorch on the CPU, within 1e-4
    state = load_checkpoint(best)
    x = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {"input": x.numpy()})
    model = build_from_checkpoint(state)
    with torch.no_grad():
        cpu = model(x)
        gpu = model.cuda()(x.cuda())
    np.testing.assert_allclose(got, cpu.numpy(), atol=1e-4, rtol=0)
    assert_near(torch.from_numpy(got), gpu, 1e-2, "onnxruntime (CPU) vs the model on CUDA")


# ----------------------------------------------------------------------- fp16 grad scaler, channels_last


def test_fp16_grad_scaler_steps_and_skips_a_step_with_inf_gradients(tmp_path, data_root):
    # A constant learning rate: the schedule steps on skipped steps too, and a 1-epoch cosine would
    # reach 0 after the first, so that an applied step could leave the weights where they were.
    constant = {"name": "constant", "warmup_epochs": 0}
    raw = cuda_config(data_root, tmp_path / "runs", "scaler", train={"amp": "fp16"}, schedule=constant)
    run = quiet_run(raw, tmp_path)
    assert run.dtype == torch.float16 and run.scaler.is_enabled()
    images, labels = next(iter(run.loaders.train))

    # Clean steps: a step either applies (growth tracker + 1, weights move) or finds an overflow of
    # the fp16 gradients at this scale (scale halved, weights kept); one applies within 20.
    applied = False
    for _ in range(20):
        semodel.train.forward_backward(run, 1, images, labels, sync=True)
        before, scale, tracker = weights(run.model), run.scaler.get_scale(), run.scaler._get_growth_tracker()
        semodel.train.optimizer_step(run)
        moved = largest_difference(before, weights(run.model)) > 0
        if run.scaler._get_growth_tracker() == tracker + 1:
            assert moved and run.scaler.get_scale() == scale
            applied = True
            break
        assert not moved and run.scaler.get_scale() == scale / 2 and run.scaler._get_growth_tracker() == 0
    assert applied, f"no fp16 step applied in 20 tries (scale now {run.scaler.get_scale()})"

    # A step whose gradients hold an inf: skipped, nothing applied, the scale backs off.
    semodel.train.forward_backward(run, 1, images, labels, sync=True)
    param = next(p for p in run.model.parameters() if p.grad is not None)
    param.grad[(0,) * param.grad.dim()] = float("inf")  # (channels_last grads: no flat view)
    before, scale = weights(run.model), run.scaler.get_scale()
    momentum = {i: s["momentum_buffer"].clone() for i, s in run.optimizer.state.items()}
    semodel.train.optimizer_step(run)
    assert largest_difference(before, weights(run.model)) == 0, "a step with inf gradients was applied"
    assert all(torch.equal(run.optimizer.state[i]["momentum_buffer"], m) for i, m in momentum.items())
    assert run.scaler.get_scale() == scale * run.scaler.get_backoff_factor()
    assert run.scaler._get_growth_tracker() == 0
    assert all(p.grad is None for p in run.model.parameters())  # cleared for the next step
    assert all_finite(run.model.state_dict())


def test_channels_last_weights_inputs_and_outputs(tmp_path, data_root):
    raw = cuda_config(data_root, tmp_path / "runs", "cl", train={"channels_last": True, "amp": "bf16"})
    run = quiet_run(raw, tmp_path)
    convs = {n: p for n, p in run.model.named_parameters() if p.dim() == 4}
    assert convs and all(p.is_cuda for p in convs.values())
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in convs.values())
    seen = []
    hook = run.model.conv1.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    images, labels = next(iter(run.loaders.train))
    loss, logits, _ = semodel.train.forward_backward(run, 1, images, labels, sync=True)
    hook.remove()
    assert seen == [True] and torch.isfinite(loss)
    # The same weights in the default layout give the same outputs (fp32, eval mode).
    contiguous = copy.deepcopy(run.model).to(memory_format=torch.contiguous_format).eval()
    x = images.cuda()
    with torch.no_grad():
        expected = contiguous(x)
        got = run.model.eval()(x.contiguous(memory_format=torch.channels_last))
    assert_near(got, expected, 1e-2, "channels_last vs contiguous")


# ----------------------------------------------------------------------------- data.cache: gpu


def test_gpu_cache_validates_like_the_uncached_path(tmp_path, data_root, capsys):
    import semodel.data.cache as cache
    from semodel.data import eval_transform, load_rgb, scan_dataset
    from semodel.preprocess import preprocess_of

    # fp32, default layout and deterministic kernels, so that both paths run the same convolutions
    # on the same shapes (6 validation images, one batch either way).
    settings = {"amp": "off", "channels_last": False, "deterministic": True, "epochs": 1}
    raw = cuda_config(data_root, tmp_path / "runs", "cached", data={"cache": "gpu"}, train=settings)
    code, out, err = run_cli(["train", "--config", write_config(tmp_path / "c.yaml", raw), "--quiet"], capsys)
    assert code == 0, err
    assert "data.cache: decoded 18 + 6 images once into GPU memory" in out
    run_dir = tmp_path / "runs" / "cached"
    trained = json.loads((run_dir / "metrics.json").read_text())["val"]
    report = tmp_path / "eval.json"
    args = ["eval", run_dir / "best.pt", "--split", "val", "--device", "cuda", "--workers", "0"]
    code, _, err = run_cli([*args, "--batch-size", "12", "--output", report], capsys)
    assert code == 0, err
    evaluated = json.loads(report.read_text())["metrics"]
    assert evaluated["n"] == trained["n"] == 6
    assert evaluated["confusion_matrix"] == trained["confusion_matrix"]
    assert evaluated["acc"] == trained["acc"]
    assert evaluated["loss"] == pytest.approx(trained["loss"], rel=1e-4, abs=1e-6)

    # And the cached validation images on the GPU are the eval transform's, pixel for pixel.
    cfg = validate(raw, "t")
    samples = scan_dataset(data_root).samples[:5]
    cuda = torch.device("cuda")
    plan = cache.choose(
        cfg, cuda, lambda: cache.photo_sizes(data_root, samples[:1]), len(samples), setting="gpu"
    )
    _, val = cache.cached_loaders(cfg, plan, data_root, samples[:1], samples, [[0]], cuda, print)
    assert val.decoded.images.is_cuda
    images, _ = next(iter(val))
    expected = torch.stack(
        [eval_transform(preprocess_of(cfg))(load_rgb(data_root / s.path)) for s in samples]
    )
    torch.testing.assert_close(images.cpu(), expected, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- resume


# As tests/test_train.py's straight run: 12 train images, batch 6 (2 steps per epoch), warm-up
# the first step, EMA; so a 1-epoch run resumed to 3 epochs must equal a 3-epoch run.
STRAIGHT = {
    "data": {"batch_size": 6, "split": {"val": 0.25, "test": 0.25}},
    "schedule": {"warmup_epochs": 0.5},
    "train": {"epochs": 3, "ema": True, "ema_decay": 0.5, "deterministic": True, "amp": "fp16"},
}


def test_resume_on_cuda_continues_like_a_straight_run(tmp_path, data_root, capsys):
    # The CUDA random streams round-trip through rng_state / set_rng_state.
    state = rng_state()
    drawn = torch.rand(4, device="cuda")
    set_rng_state(state)
    assert torch.equal(torch.rand(4, device="cuda"), drawn)

    config = write_config(tmp_path / "det.yaml", cuda_config(data_root, tmp_path / "runs", "det", **STRAIGHT))
    code, _, err = run_cli(["train", "--config", config, "--quiet"], capsys)
    assert code == 0, err
    code, _, err = run_cli(["train", "--config", config, "--set", "train.epochs=1", "--quiet"], capsys)
    assert code == 0, err
    straight_dir, resumed_dir = tmp_path / "runs" / "det", tmp_path / "runs" / "det-2"
    epoch1 = load_ckpt(resumed_dir / "last.pt")
    assert epoch1["epoch"] == 1 and epoch1["scaler"] is not None and epoch1["rng"]["cuda"]
    code, out, err = run_cli(
        ["train", "--resume", resumed_dir / "last.pt", "--set", "train.epochs=3", "--quiet"], capsys
    )
    assert code == 0, err
    assert f"resuming {resumed_dir} at epoch 2" in out

    straight, resumed = load_ckpt(straight_dir / "last.pt"), load_ckpt(resumed_dir / "last.pt")
    assert resumed["progress"] == straight["progress"]
    assert resumed["scaler"] == straight["scaler"]  # fp16 loss scale and growth tracker continued
    # Deterministic kernels: expected bit-identical; allowed 1e-5 (far below what training moves).
    moved = largest_difference(epoch1["model"], straight["model"])
    for key in ("model", "ema"):
        apart = largest_difference(straight[key], resumed[key])
        assert apart <= 1e-5 < 1e-3 < moved, f"{key}: {apart:.2e} apart (epochs 2-3 moved {moved:.2e})"


def test_cuda_device_that_does_not_exist_is_a_one_line_error(tmp_path, data_root, capsys):
    raw = cuda_config(
        data_root, tmp_path / "runs", "nodev", train={"device": f"cuda:{torch.cuda.device_count()}"}
    )
    code, _, err = run_cli(["train", "--config", write_config(tmp_path / "n.yaml", raw)], capsys)
    assert_one_line_error(code, err, "CUDA device(s)")
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- DDP over NCCL


class OneGpuWorld(World):
    """A world of one process that takes the distributed code paths (see the module docstring)."""

    @property
    def distributed(self) -> bool:
        return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_over_nccl_on_one_gpu_equals_a_plain_run(tmp_path, monkeypatch, capsys):
    if not (dist.is_available() and dist.is_nccl_available()):
        pytest.skip("this PyTorch build has no NCCL")
    # Square 16 px images and no random augmentation: the DDP run reseeds per rank, so only
    # pixels that no random draw changes let it see the plain run's batches.
    root = tmp_path / "data"
    for ci, name in enumerate(CLASSES):
        for i in range(6):
            make_image(root / name / f"{name}_{i}.jpg", TINTS[name], ci * 100 + i, size=(16, 16))
    settings = {
        "data": {"batch_size": 6, "augment": {"scale": [1.0, 1.0], "hflip": 0.0}},
        "train": {"epochs": 2, "deterministic": True, "amp": "bf16"},
    }
    plain_dir = semodel.train.fit(
        validate(cuda_config(root, tmp_path / "runs", "plain", **settings), "plain"), log=lambda _: None
    )

    seen: dict = {}

    def init_nccl(device_name: str) -> World:
        # What semodel.distributed.init does for a CUDA rank under torchrun, for a world of one.
        torch.cuda.set_device(0)
        dist.init_process_group(
            "nccl",
            init_method=f"tcp://127.0.0.1:{free_port()}",
            rank=0,
            world_size=1,
            timeout=timedelta(seconds=60),  # a hang fails the test, not the whole check
        )
        seen["backend"] = dist.get_backend()
        return OneGpuWorld(0, 0, 1)

    real_wrap = semodel.train.wrap_for_training

    def spy(model, cfg, world, device):
        seen["wrapped"] = real_wrap(model, cfg, world, device)
        return seen["wrapped"]

    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "lo")  # one rank: the loopback is the whole network
    monkeypatch.setattr(semodel.distributed, "init", init_nccl)
    monkeypatch.setattr(semodel.train, "wrap_for_training", spy)
    lines: list[str] = []
    try:
        ddp_dir = semodel.train.fit(
            validate(cuda_config(root, tmp_path / "runs", "ddp", **settings), "ddp"), log=lines.append
        )
    finally:
        if dist.is_initialized():  # fit failed before its own shutdown
            dist.destroy_process_group()
    assert seen["backend"] == "nccl"
    assert not dist.is_initialized()  # semodel shut the process group down
    ddp = seen["wrapped"]
    assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel) and ddp.device_ids == [0]
    assert any("processes: 1 x batch 6" in line for line in lines), lines

    plain, distributed = load_ckpt(plain_dir / "last.pt"), load_ckpt(ddp_dir / "last.pt")
    assert distributed["world_size"] == 1 and distributed["rng_ranks"] == []
    assert set(distributed["model"]) == set(plain["model"])  # no "module." prefix
    assert distributed["progress"] == plain["progress"]
    # One rank: NCCL's all-reduce is the identity and DDP's average divides by 1.
    apart = largest_difference(plain["model"], distributed["model"])
    assert apart <= 1e-5, f"DDP (1 rank, NCCL) vs plain: {apart:.2e} apart"
    assert distributed["metrics"]["n"] == plain["metrics"]["n"]  # every validation image, once


# ------------------------------------------------------ torch.compile (last: the slowest, a minute or so)


def test_compiled_training_runs_and_agrees_with_eager(tmp_path, data_root, monkeypatch, capsys):
    wrapped = []
    real_wrap = semodel.train.wrap_for_training

    def spy(model, cfg, world, device):
        train_model = real_wrap(model, cfg, world, device)
        wrapped.append((model, train_model))
        return train_model

    monkeypatch.setattr(semodel.train, "wrap_for_training", spy)
    # 18 training images, batch 32: one batch (of 18) per epoch, so one shape is compiled.
    raw = cuda_config(data_root, tmp_path / "runs", "compiled", train={"compile": True, "amp": "bf16"})
    code, out, err = run_cli(["train", "--config", write_config(tmp_path / "c.yaml", raw), "--quiet"], capsys)
    assert code == 0, err
    run_dir = tmp_path / "runs" / "compiled"
    last = load_ckpt(run_dir / "last.pt")
    plain_keys = set(build_model("se_resnet18", num_classes=3, stem="cifar").state_dict())
    assert set(last["model"]) == plain_keys  # no "_orig_mod." prefix: the plain module is saved
    assert all_finite(last["model"])
    [(model, compiled)] = wrapped
    assert compiled is not model and hasattr(compiled, "_orig_mod")

    # The compiled training graph (train mode, bf16 autocast, a batch of 18) against eager.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(18, 3, 16, 16, generator=g).cuda().contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 3, (18,), generator=g).cuda()
    params = [p for p in model.parameters() if p.requires_grad]
    results = {}
    model.train()
    for name, module in (("eager", model), ("compiled", compiled)):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = module(x)
        loss = F.cross_entropy(logits.float(), y)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        flat = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
        results[name] = (logits.float(), torch.cat([g.float().flatten() for g in flat]))
    (eager_logits, eager_grads), (logits, grads) = results["eager"], results["compiled"]
    assert_near(logits, eager_logits, 5e-2, "compiled vs eager logits (bf16)")
    cosine = F.cosine_similarity(grads, eager_grads, dim=0).item()
    assert cosine > 0.95, f"compiled vs eager gradients: cosine similarity {cosine:.4f}"
