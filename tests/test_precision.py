"""train.amp: auto picks bf16 on CPUs that compute it natively and nowhere else on a CPU, and the run
says which precision it trains in."""

from __future__ import annotations

import pytest
import torch
from helpers_ckpt import make_folder, run_cli
from helpers_train import (
    one_torch_thread,  # noqa: F401  (autouse fixture: one torch thread)
    tiny_config,
    write_config,
)

import semodel.runtime as runtime
from semodel.train import precision_note

CPU = torch.device("cpu")


@pytest.mark.parametrize("native", [True, False])
def test_auto_is_bf16_exactly_on_cpus_with_native_bf16(monkeypatch, native):
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native)
    assert runtime.amp_dtype("auto", CPU) == (torch.bfloat16 if native else None)
    # an explicit setting wins either way
    assert runtime.amp_dtype("off", CPU) is None
    assert runtime.amp_dtype("bf16", CPU) == torch.bfloat16
    assert runtime.amp_dtype("fp16", CPU) == torch.float16


@pytest.mark.parametrize(
    "probes, native",
    [
        ({"_is_avx512_bf16_supported": True, "_is_amx_tile_supported": False}, True),
        ({"_is_avx512_bf16_supported": False, "_is_amx_tile_supported": True}, True),
        ({"_is_avx512_bf16_supported": False, "_is_amx_tile_supported": False}, False),
        ({}, False),  # a PyTorch without the probes: fp32, never a guess
    ],
)
def test_native_bf16_is_read_from_the_cpu_probes(monkeypatch, probes, native):
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.delattr(torch.cpu, name, raising=False)
    for name, value in probes.items():
        monkeypatch.setattr(torch.cpu, name, lambda value=value: value, raising=False)
    assert runtime.cpu_has_native_bf16() is native


def test_the_model_line_names_the_precision():
    assert precision_note("auto", torch.bfloat16, CPU) == (
        "amp: bf16 (this CPU computes bf16 natively; train.amp: off for fp32)"
    )
    assert precision_note("auto", None, CPU) == "amp: off (this CPU has no native bf16)"
    assert precision_note("off", None, CPU) == "amp: off"
    assert precision_note("bf16", torch.bfloat16, CPU) == "amp: bf16"
    assert precision_note("auto", torch.float16, torch.device("cuda")) == "amp: fp16"


@pytest.mark.parametrize("native", [True, False])
def test_a_run_prints_its_precision(tmp_path, capsys, monkeypatch, native):
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native)
    root = make_folder(tmp_path / "data", ["cat", "dog"], per_class=4)
    raw = tiny_config(root, tmp_path / "runs", "p")
    code, out, err = run_cli(["train", "--config", write_config(tmp_path / "p.yaml", raw)], capsys)
    assert code == 0, err
    model_line = next(line for line in out.splitlines() if line.startswith("model: "))
    expected = (
        "amp: bf16 (this CPU computes bf16 natively" if native else "amp: off (this CPU has no native bf16)"
    )
    assert expected in model_line, model_line
