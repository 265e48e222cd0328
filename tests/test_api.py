"""The Python API: docs/api.md's example runs as written, and ``import semodel`` stays light."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

API_DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def example() -> str:
    (code,) = re.findall(r"```python\n(.*?)```", API_DOC.read_text(encoding="utf-8"), flags=re.S)
    return code


def test_the_docs_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(example(), str(API_DOC), "exec"), namespace)
    run_dir, report, rows, model = (namespace[k] for k in ("run_dir", "report", "rows", "model"))
    assert run_dir == Path("runs/notebook") and (run_dir / "best.pt").is_file()
    assert report["metrics"]["n"] > 0 and report["classes"] == ["checkers", "spots"]
    assert len(rows) == 12 and all(len(r["predictions"]) == 2 for r in rows)
    assert abs(sum(p["prob"] for p in rows[0]["predictions"]) - 1) < 1e-5
    assert model.layer1[0].se.hidden == 32  # reduction 8 of 256 channels
    out = capsys.readouterr().out
    assert re.search(r"test accuracy: \d\.\d{3}", out)


def test_api_errors_are_semodel_errors(tmp_path):
    import semodel
    from semodel.errors import SemodelError

    with pytest.raises(SemodelError, match="checkpoint not found"):
        semodel.evaluate_model(tmp_path / "missing.pt")
    with pytest.raises(SemodelError, match="no image file matches"):
        semodel.predict_files(str(tmp_path / "*.jpg"), tmp_path / "missing.pt")
    with pytest.raises(AttributeError):
        semodel.no_such_function  # noqa: B018


def test_import_semodel_loads_no_torch():
    code = "import sys, semodel; print('torch' in sys.modules, callable(semodel.fit))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "True"]  # torch only once an API function is looked up
