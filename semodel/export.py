"""``semodel export``: ONNX or TorchScript, with the preprocessing in the file, checked against PyTorch.

Both formats take ``input``: float32, N x 3 x S x S, RGB, already preprocessed (shorter side
resized to ``resize``, center crop ``S``, scaled to [0, 1], normalised with ``mean`` / ``std``),
and return ``logits`` (N x classes; softmax gives probabilities). The batch size is free.

The metadata travels in the file: ONNX ``metadata_props`` / TorchScript extra file
``semodel.json`` hold the class names, input size, resize, mean, std and the source model.

After writing, the exported model is run (onnxruntime / ``torch.jit.load``) on a random batch of
another size than the one used to export, and its logits must match PyTorch's within ``atol``.
The file goes to its final name only when that check passes.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from semodel._version import __version__
from semodel.errors import SemodelError, first_line
from semodel.files import refuse_overwrite

FORMATS = ("onnx", "torchscript")
SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
DEFAULT_ATOL = 1e-4
EXPORT_BATCH = 2  # traced / exported with this batch size ...
CHECK_BATCH = 3  # ... and checked with another, which proves the batch axis is dynamic
INSTALL_HINT = "pip install 'semodel[export]'"


@dataclass
class ExportResult:
    path: Path
    format: str
    max_abs_diff: float
    atol: float
    check_batch: int
    metadata: dict[str, str]


def export_metadata(state: dict[str, Any], weights: str) -> dict[str, str]:
    """String key/values for the exported file: what a consumer needs to prepare inputs and name outputs."""
    p = state["preprocess"]
    return {
        "classes": json.dumps(list(state["classes"])),
        "image_size": str(int(p["image_size"])),
        "resize": str(int(p["resize"])),
        "mean": json.dumps([float(v) for v in p["mean"]]),
        "std": json.dumps([float(v) for v in p["std"]]),
        "interpolation": str(p.get("interpolation", "bilinear")),
        "input": "float32 N x 3 x image_size x image_size, RGB: shorter side resized to 'resize', "
        "center-cropped, scaled to [0, 1], normalised with mean and std",
        "output": "logits N x len(classes); softmax gives probabilities",
        "model": str(state["config"]["model"]["name"]),
        "weights": weights,
        "epoch": str(state.get("epoch", "")),
        "semodel_version": __version__,
    }


def default_output(checkpoint: Path, fmt: str) -> Path:
    return checkpoint.with_name(checkpoint.stem + SUFFIX[fmt])


def _sample(batch: int, size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, 3, size, size, generator=g)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters' deprecation and tracer chatter; real problems raise."""
    with warnings.catch_warnings():
        for category in (DeprecationWarning, FutureWarning, UserWarning, torch.jit.TracerWarning):
            warnings.simplefilter("ignore", category)
        yield


# ----------------------------------------------------------------------------- ONNX


def _ort_errors() -> tuple[type[Exception], ...]:
    """What onnxruntime raises for a model it cannot load or run (its own types, not RuntimeError)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

    names = (
        "Fail",
        "InvalidArgument",
        "InvalidGraph",
        "InvalidProtobuf",
        "NotImplemented",
        "RuntimeException",
    )
    return tuple(getattr(ort_state, name) for name in names if hasattr(ort_state, name))


def _import_onnx():
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401  (torch.onnx.export needs it)
    except ImportError as e:
        raise SemodelError(
            f"ONNX export needs onnx, onnxruntime and onnxscript ({e.name} is missing): {INSTALL_HINT}"
        ) from None
    return onnx, onnxruntime


def _failure(what: str, e: Exception) -> SemodelError:
    return SemodelError(f"{what}: {type(e).__name__}: {first_line(e, 300)}")


def write_onnx(
    model: nn.Module, example: torch.Tensor, path: Path, metadata: dict[str, str], opset: int | None = None
) -> None:
    onnx, _ = _import_onnx()
    from torch.export import Dim

    kwargs: dict[str, Any] = {} if opset is None else {"opset_version": opset}
    try:
        with _quiet(), contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its steps
            torch.onnx.export(
                model,
                (example,),
                str(path),
                input_names=["input"],
                output_names=["logits"],
                dynamic_shapes=({0: Dim("batch", min=1, max=65536)},),
                dynamo=True,
                external_data=False,  # one self-contained file (all our models are far below 2 GB)
                verbose=False,
                **kwargs,
            )
    except (torch.onnx.errors.OnnxExporterError, OSError) as e:  # the exporter's own report of a failure
        raise _failure("ONNX export failed", e) from None
    proto = onnx.load(str(path))
    keep = [p for p in proto.metadata_props if p.key not in metadata]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    proto.doc_string = f"semodel {metadata['model']} classifier; classes {metadata['classes']}"
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def run_onnx(path: Path, x: torch.Tensor) -> torch.Tensor:
    _, ort = _import_onnx()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"input": x.numpy()})
    return torch.from_numpy(logits)


# ----------------------------------------------------------------------------- TorchScript


def write_torchscript(model: nn.Module, example: torch.Tensor, path: Path, metadata: dict[str, str]) -> None:
    try:
        with _quiet(), torch.no_grad():
            traced = torch.jit.trace(model, example, check_trace=False)
            torch.jit.save(traced, str(path), _extra_files={"semodel.json": json.dumps(metadata)})
    except (RuntimeError, OSError) as e:  # the tracer reports what it cannot trace as RuntimeError
        raise _failure("TorchScript export failed", e) from None


def run_torchscript(path: Path, x: torch.Tensor) -> torch.Tensor:
    with _quiet(), torch.no_grad():
        return torch.jit.load(str(path), map_location="cpu")(x)


RUNNERS = {"onnx": run_onnx, "torchscript": run_torchscript}


# ----------------------------------------------------------------------------- command


@dataclass
class ExportOptions:
    """``semodel export``'s options besides the checkpoint."""

    fmt: str = "onnx"
    output: Path | None = None  # default: beside the checkpoint
    use_ema: bool | None = None  # None: the weights the run selected
    atol: float = DEFAULT_ATOL
    opset: int | None = None
    calibrated: bool = False  # the logits divided by the temperature fitted on val


class Calibrated(nn.Module):
    """A model whose logits are divided by a fixed temperature (temperature scaling, in the graph)."""

    def __init__(self, model: nn.Module, temperature: float) -> None:
        super().__init__()
        self.model, self.temperature = model, float(temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) / self.temperature


def exported_model(checkpoint: Path, state: dict[str, Any], o: ExportOptions) -> nn.Module:
    from semodel.checkpoint import build_from_checkpoint

    model = build_from_checkpoint(state, use_ema=o.use_ema, source=str(checkpoint)).float().cpu()
    if not o.calibrated:
        return model
    temperature = (state.get("calibration") or {}).get("temperature")
    if temperature is None:
        raise SemodelError(f"--calibrated: {checkpoint} has no fitted temperature (train again to get one)")
    return Calibrated(model, temperature).eval()


def export_checkpoint(checkpoint: Path, options: ExportOptions | None = None) -> ExportResult:
    """Export, run the exported file on a sample batch, compare with PyTorch, then move it into place."""
    from semodel.checkpoint import load_checkpoint, uses_ema

    o = options or ExportOptions()
    fmt, atol = o.fmt, o.atol
    if fmt not in FORMATS:
        raise SemodelError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    if not atol > 0:
        raise SemodelError(f"--atol {atol}: must be > 0")
    checkpoint = Path(checkpoint)
    if (checkpoint / "folds.csv").is_file():
        raise SemodelError(
            f"{checkpoint} is a cross-validation (one model per fold): export one fold's model, e.g. "
            f"{checkpoint / 'fold-1' / 'best.pt'}; predict and eval take the folder as an ensemble"
        )
    if fmt == "onnx":
        _import_onnx()  # fail before the slow part
    state = load_checkpoint(checkpoint)
    output = Path(o.output) if o.output is not None else default_output(checkpoint, fmt)
    if output.is_dir():
        example = output / default_output(checkpoint, fmt).name
        raise SemodelError(f"--output {output} is a folder; give a file name such as {example}")
    refuse_overwrite(output, "--output", {"the checkpoint": checkpoint})
    model = exported_model(checkpoint, state, o)
    size = int(state["preprocess"]["image_size"])
    metadata = export_metadata(state, "ema" if uses_ema(state, o.use_ema) else "model")
    metadata["calibrated"] = f"temperature {model.temperature:g}" if o.calibrated else "no"
    diff = write_checked(model, output, fmt, size, metadata, o)
    return ExportResult(output, fmt, diff, atol, CHECK_BATCH, metadata)


def write_checked(
    model: nn.Module, output: Path, fmt: str, size: int, metadata: dict, o: ExportOptions
) -> float:
    """Write the exported file beside ``output``, run it, compare with PyTorch, and move it into place
    only when it agrees; the largest logit difference."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp{os.getpid()}")
    try:
        if fmt == "onnx":
            write_onnx(model, _sample(EXPORT_BATCH, size), tmp, metadata, o.opset)
        else:
            write_torchscript(model, _sample(EXPORT_BATCH, size), tmp, metadata)
        x = _sample(CHECK_BATCH, size)
        with torch.no_grad():
            expected = model(x)
        run_errors = (RuntimeError, *_ort_errors()) if fmt == "onnx" else (RuntimeError,)
        try:
            got = RUNNERS[fmt](tmp, x)
        except run_errors as e:
            raise _failure(f"the exported {fmt} model does not run", e) from None
        if got.shape != expected.shape:
            raise SemodelError(
                f"the exported {fmt} model returns shape {tuple(got.shape)} for a batch of "
                f"{CHECK_BATCH}; PyTorch returns {tuple(expected.shape)}"
            )
        diff = (got.float() - expected.float()).abs().max().item()
        if not diff <= o.atol:  # also catches NaN
            raise SemodelError(
                f"the exported {fmt} model disagrees with PyTorch: max abs difference of logits {diff:.3g} "
                f"> tolerance {o.atol:g}; {output} was not written"
            )
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    return diff


def export_from_cli(checkpoint: Path, options: ExportOptions) -> ExportResult:
    result = export_checkpoint(checkpoint, options)
    fmt = options.fmt
    name = {"onnx": "ONNX", "torchscript": "TorchScript"}[fmt]
    runner = {"onnx": "onnxruntime", "torchscript": "torch.jit.load"}[fmt]
    size_mb = result.path.stat().st_size / 1e6
    size = result.metadata["image_size"]
    weights = result.metadata["weights"] + " weights" + (", calibrated" if options.calibrated else "")
    print(
        f"exported {result.path} ({name}, {size_mb:.1f} MB, {weights}): input N x 3 x {size} x {size}, "
        f"dynamic batch axis; metadata: classes, image_size, resize, mean, std"
    )
    print(
        f"check: {runner} vs PyTorch on a random batch of {result.check_batch}: "
        f"max abs difference of logits {result.max_abs_diff:.2e} (tolerance {result.atol:g}): OK"
    )
    if fmt == "torchscript":
        print(
            "note: PyTorch deprecates TorchScript; prefer --format onnx for new deployments", file=sys.stderr
        )
    return result
