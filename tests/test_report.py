"""The run report, error analysis, intervals, operating points, calibration and fold ensembles (issue 17).

One small two-class run with patient groups (log.report on) and one 2-fold cross-validation serve
every test of the module.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers_ckpt import assert_one_line_error, make_image, run_cli
from helpers_train import tiny_config, write_config

from semodel.checkpoint import build_from_checkpoint, load_checkpoint
from semodel.predict import Classifier

CHROMIUM = Path("/usr/bin/chromium")
CHECK_REPORT = Path(__file__).resolve().parents[1] / "scripts" / "check_report.py"
GROUP_BY = r"^([cd]\d+)_"


def patient_folder(root: Path, patients: int = 6, per_patient: int = 2) -> Path:
    """cat/c<p>_<i>.jpg and dog/d<p>_<i>.jpg: two images per patient."""
    for cls, tint in (("cat", (200, 60, 60)), ("dog", (60, 200, 60))):
        for p in range(patients):
            for i in range(per_patient):
                make_image(
                    root / cls / f"{cls[0]}{p}_{i}.jpg", tint, seed=100 * p + i + (0 if cls == "cat" else 50)
                )
    return root


def semodel_in_a_process(*args: str) -> str:
    """``python -m semodel ARGS`` as a user runs it (the report is written by the CLI); its stdout."""
    result = subprocess.run(
        [sys.executable, "-m", "semodel", *args], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("report")
    root = patient_folder(base / "data")
    raw = tiny_config(
        root,
        base / "runs",
        "rep",
        data={"split": {"val": 0.34, "test": 0.34, "group_by": GROUP_BY}},
        train={"epochs": 2},
        log={"report": True},
    )
    config = write_config(base / "rep.yaml", raw)
    stdout = semodel_in_a_process("train", "--config", str(config), "--quiet")
    return {"base": base, "root": root, "run_dir": base / "runs" / "rep", "stdout": stdout}


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def same_predictions(rows: list[dict[str, str]], expected: list[dict[str, str]]) -> None:
    """The same images, groups and classes; probabilities equal but for float rounding (the run's
    test pass and eval batch the images differently)."""
    assert [{k: v for k, v in r.items() if not k.startswith("p_")} for r in rows] == [
        {k: v for k, v in r.items() if not k.startswith("p_")} for r in expected
    ]
    for r, e in zip(rows, expected, strict=True):
        assert all(abs(float(r[k]) - float(e[k])) < 1e-5 for k in r if k.startswith("p_"))


def test_a_run_leaves_its_report(run):
    run_dir = run["run_dir"]
    for name in ("results.csv", "curves.png", "test_predictions.csv", "confusion_matrix.png", "roc.png",
                 "reliability.png", "worst.png", "report.html"):  # fmt: skip
        assert (run_dir / name).is_file() and (run_dir / name).stat().st_size > 0, name
    results = read_rows(run_dir / "results.csv")
    assert [r["epoch"] for r in results] == ["1", "2"]
    history = json.loads((run_dir / "metrics.json").read_text())["history"]
    assert float(results[1]["val_acc"]) == pytest.approx(history[1]["val"]["acc"], rel=1e-5)
    assert float(results[0]["lr"]) > 0 and float(results[0]["epoch_time_s"]) > 0
    page = (run_dir / "report.html").read_text()
    assert "http://" not in page and "https://" not in page and "<script" not in page  # offline, no JS
    assert page.count("data:image/png;base64,") == 5
    assert "Per patient" in page and "chosen on val" in page
    assert f"report: {run_dir / 'report.html'}" in run["stdout"]
    budget = json.loads((run_dir / "metrics.json").read_text())["time_budget"]
    assert "Where the training time went" in page
    assert f"<td>train step</td><td>{budget['train_step']:.1f}</td>" in page
    assert f"<td>wall time</td><td>{budget['wall']:.1f}</td>" in page


def test_test_predictions_are_the_models_probabilities(run):
    run_dir, root = run["run_dir"], run["root"]
    rows = read_rows(run_dir / "test_predictions.csv")
    split = [r for r in read_rows(run_dir / "split.csv") if r["split"] == "test"]
    assert sorted(r["path"] for r in rows) == sorted(r["path"] for r in split)
    assert all(re.match(GROUP_BY, Path(r["path"]).name).group(1) == r["group"] for r in rows)
    state = load_checkpoint(run_dir / "best.pt")
    classifier = Classifier.load(run_dir / "best.pt", "cpu")
    from semodel.data import load_rgb
    from semodel.preprocess import preprocess_image

    x = torch.stack([preprocess_image(load_rgb(root / r["path"]), state["preprocess"]) for r in rows])
    probs = classifier.probs(x)
    stored = torch.tensor([[float(r["p_cat"]), float(r["p_dog"])] for r in rows])
    torch.testing.assert_close(stored, probs, atol=1e-5, rtol=0)
    assert [r["predicted"] for r in rows] == [["cat", "dog"][int(i)] for i in probs.argmax(1)]


def test_best_pt_stores_the_calibration_fitted_on_val(run):
    cal = load_checkpoint(run["run_dir"] / "best.pt")["calibration"]
    assert cal["fitted_on"] == "val" and cal["threshold_rule"] == "youden"
    assert 0 < cal["threshold"] < 1 and 0.05 <= cal["temperature"] <= 20
    summary = json.loads((run["run_dir"] / "metrics.json").read_text())
    assert summary["calibration"] == cal
    intervals = summary["test_analysis"]["intervals"]
    assert summary["test_analysis"]["resampled"] == "groups"
    assert intervals["acc"]["low"] <= intervals["acc"]["value"] <= intervals["acc"]["high"]


def test_eval_reports_intervals_operating_points_and_writes_predictions(run, tmp_path, capsys):
    ckpt = run["run_dir"] / "best.pt"
    code, out, err = run_cli(
        ["eval", ckpt, "-o", tmp_path / "r.json", "--predictions", tmp_path / "p.csv", "--worst", "3",
         "--plot", tmp_path / "plots"], capsys,
    )  # fmt: skip
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["analysis"]["resampled"] == "groups" and report["analysis"]["by_group"]["groups"] == 4
    points = report["analysis"]["operating_points"]
    assert set(points["points"]) == {"0.5", "val"}
    assert "95% interval" in out and "resamples of the patients" in out and "chosen on val" in out
    same_predictions(read_rows(tmp_path / "p.csv"), read_rows(run["run_dir"] / "test_predictions.csv"))
    assert (tmp_path / "plots" / "worst.png").stat().st_size > 0
    code, out, err = run_cli(["eval", ckpt, "--ci", "0", "-o", tmp_path / "n.json"], capsys)
    assert code == 0 and "95% interval" not in out
    assert json.loads((tmp_path / "n.json").read_text())["analysis"]["intervals"]["acc"]["low"] is None


def test_calibrated_applies_the_stored_temperature(run, tmp_path, capsys):
    ckpt = run["run_dir"] / "best.pt"
    temperature = load_checkpoint(ckpt)["calibration"]["temperature"]
    plain = tmp_path / "plain.csv"
    scaled = tmp_path / "scaled.csv"
    assert run_cli(["eval", ckpt, "--predictions", plain], capsys)[0] == 0
    assert run_cli(["eval", ckpt, "--predictions", scaled, "--calibrated"], capsys)[0] == 0
    p = torch.tensor([[float(r["p_cat"]), float(r["p_dog"])] for r in read_rows(plain)])
    q = torch.tensor([[float(r["p_cat"]), float(r["p_dog"])] for r in read_rows(scaled)])
    torch.testing.assert_close(q, torch.softmax(p.log() / temperature, 1), atol=2e-5, rtol=0)


def test_predict_threshold_val_decides_at_the_stored_threshold(run, capsys):
    ckpt = run["run_dir"] / "best.pt"
    threshold = load_checkpoint(ckpt)["calibration"]["threshold"]
    code, out, err = run_cli(
        ["predict", run["root"], "--checkpoint", ckpt, "-f", "csv", "--threshold", "val"], capsys
    )
    assert code == 0, err
    rows = list(csv.DictReader(out.splitlines()))
    for r in rows:
        p_dog = float(r["prob1"]) if r["top1"] == "dog" else float(r["prob2"])
        if abs(p_dog - threshold) > 1e-5:  # the printed 6 digits can round across it (a val image's own)
            assert r["decision"] == ("dog" if p_dog >= threshold else "cat")


def test_report_rebuilds_an_old_run(run, tmp_path, capsys):
    old = tmp_path / "old"
    shutil.copytree(run["run_dir"], old)
    for name in ("test_predictions.csv", "results.csv", "report.html", "curves.png", "worst.png"):
        (old / name).unlink()
    code, out, err = run_cli(["report", old, "--ci", "200", "--worst", "2"], capsys)
    assert code == 0, err
    same_predictions(
        read_rows(old / "test_predictions.csv"), read_rows(run["run_dir"] / "test_predictions.csv")
    )
    assert (old / "report.html").is_file() and (old / "worst.png").is_file()


@pytest.mark.skipif(
    not CHROMIUM.exists(), reason="Chromium is not installed (apt-get install chromium chromium-driver)"
)
def test_the_report_renders_in_a_real_browser(run, tmp_path):
    shot = tmp_path / "report.png"
    result = subprocess.run(
        [sys.executable, str(CHECK_REPORT), str(run["run_dir"] / "report.html"), "--screenshot", str(shot)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert shot.stat().st_size > 10_000


def test_bad_input_to_the_report_features(run, tmp_path, capsys):
    ckpt = run["run_dir"] / "best.pt"
    code, _, err = run_cli(["eval", ckpt, "--worst", "0"], capsys)
    assert_one_line_error(code, err, "--worst 0: must be at least 1")
    code, _, err = run_cli(["eval", ckpt, "--ci", "-1"], capsys)
    assert_one_line_error(code, err, "--ci -1")
    code, _, err = run_cli(["report", run["run_dir"], "--ci", "-1"], capsys)
    assert_one_line_error(code, err, "--ci -1")
    # A checkpoint without a stored threshold (an older run): --threshold val says so.
    state = load_checkpoint(ckpt)
    del state["calibration"]
    torch.save(state, tmp_path / "old.pt")
    code, _, err = run_cli(
        ["predict", run["root"], "--checkpoint", tmp_path / "old.pt", "--threshold", "val"], capsys
    )
    assert_one_line_error(code, err, "has no stored threshold", tmp_path / "old.pt")
    # A run folder without a test split: the report's figures are test figures.
    no_test = tmp_path / "notest"
    shutil.copytree(run["run_dir"], no_test)
    (no_test / "test_predictions.csv").unlink()
    rows = read_rows(no_test / "split.csv")
    with open(no_test / "split.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({**r, "split": "train" if r["split"] == "test" else r["split"]} for r in rows)
    before = sorted(p.name for p in no_test.iterdir())
    code, _, err = run_cli(["report", no_test], capsys)
    assert_one_line_error(code, err, "has no test split")
    assert sorted(p.name for p in no_test.iterdir()) == before


# ----------------------------------------------------------------------------- fold ensembles


@pytest.fixture(scope="module")
def cv(tmp_path_factory):
    base = tmp_path_factory.mktemp("cvrep")
    root = patient_folder(base / "data", patients=4)
    raw = tiny_config(
        root,
        base / "runs",
        "cv2",
        data={"split": {"val": 0.34, "test": 0.0, "group_by": GROUP_BY}},
        cv={"folds": 2},
        log={"report": True},
    )
    config = write_config(base / "cv.yaml", raw)
    semodel_in_a_process("cv", "--config", str(config), "--quiet")
    return {"base": base, "root": root, "cv_dir": base / "runs" / "cv2"}


def test_the_fold_ensemble_averages_the_folds_probabilities(cv, capsys):
    cv_dir, root = cv["cv_dir"], cv["root"]
    image = root / "cat" / "c0_0.jpg"
    code, out, err = run_cli(["predict", image, "--checkpoint", cv_dir, "-f", "json"], capsys)
    assert code == 0, err
    got = {p["class"]: p["prob"] for p in json.loads(out)[0]["predictions"]}
    assert "mean of 2 folds" in err
    from semodel.data import load_rgb
    from semodel.preprocess import preprocess_image

    probs = []
    for fold in (1, 2):
        state = load_checkpoint(cv_dir / f"fold-{fold}" / "best.pt")
        model = build_from_checkpoint(state)
        with torch.no_grad():
            probs.append(model(preprocess_image(load_rgb(image), state["preprocess"])[None]).softmax(1)[0])
    mean = torch.stack(probs).mean(0)
    assert got["cat"] == pytest.approx(float(mean[0]), abs=1e-5)
    assert got["dog"] == pytest.approx(float(mean[1]), abs=1e-5)


def test_cv_report_pools_the_out_of_fold_predictions(cv, capsys, tmp_path):
    cv_dir = cv["cv_dir"]
    oof = read_rows(cv_dir / "oof_predictions.csv")
    folds = [read_rows(cv_dir / f"fold-{k}" / "test_predictions.csv") for k in (1, 2)]
    assert len(oof) == 16 and sorted(r["path"] for r in oof) == sorted(r["path"] for f in folds for r in f)
    page = (cv_dir / "report.html").read_text()
    assert "mean +- std" in page and "Pooled out-of-fold predictions" in page
    code, out, err = run_cli(["eval", cv_dir, "--data", cv["root"], "-o", tmp_path / "e.json"], capsys)
    assert code == 0, err
    assert len(json.loads((tmp_path / "e.json").read_text())["ensemble"]) == 2


def test_cv_folders_refused_where_one_model_is_needed(cv, tmp_path, capsys):
    cv_dir = cv["cv_dir"]
    code, _, err = run_cli(["export", cv_dir, "-f", "torchscript", "-o", tmp_path / "m.pt"], capsys)
    assert_one_line_error(code, err, "is a cross-validation (one model per fold)")
    broken = tmp_path / "broken"
    shutil.copytree(cv_dir, broken)
    (broken / "fold-2" / "best.pt").unlink()
    code, _, err = run_cli(["predict", cv["root"], "--checkpoint", broken], capsys)
    assert_one_line_error(code, err, "fold(s) 2 of 2 have no best.pt")
