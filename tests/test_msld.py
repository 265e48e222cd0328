"""Integration on the real MSLD photos beside the checkout (``../shared/data/msld``).

Skipped where that folder is absent (a user's clone). The originals (228 photos of 162
patients) at 32 px, one epoch: the point is the patient-grouped split and a full run on real
JPEGs, not accuracy.
"""

from __future__ import annotations

import csv
import re
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from semodel.config import validate
from semodel.train import fit

MSLD = Path(__file__).resolve().parents[2] / "shared" / "data" / "msld" / "original"
PATIENT = r"^(N?M\d+)_"

pytestmark = pytest.mark.skipif(not MSLD.is_dir(), reason=f"MSLD data not found at {MSLD}")


def test_patient_grouped_run_on_msld_originals(tmp_path):
    cfg = validate(
        {
            "model": {"name": "se_resnet18", "stem": "cifar"},
            "data": {
                "root": str(MSLD),
                "image_size": 32,
                "batch_size": 32,
                "num_workers": 0,
                "split": {"val": 0.2, "test": 0.2, "seed": 0, "group_by": PATIENT},
            },
            "train": {"epochs": 1, "device": "cpu", "channels_last": False},
            "log": {"out_dir": str(tmp_path), "name": "msld", "tensorboard": False},
        },
        "test",
    )
    run = fit(cfg, quiet=True, log=lambda message: None)

    with open(run / "split.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 228
    splits_of_patient = defaultdict(set)
    for row in rows:
        patient = re.match(PATIENT, Path(row["path"]).name).group(1)
        splits_of_patient[patient].add(row["split"])
    assert len(splits_of_patient) == 162
    straddling = {p: s for p, s in splits_of_patient.items() if len(s) > 1}
    assert not straddling, straddling
    # stratified by class: each split holds both classes in about the data's proportion (45 % monkeypox)
    for split in ("train", "val", "test"):
        labels = [row["class"] for row in rows if row["split"] == split]
        share = labels.count("Monkeypox") / len(labels)
        assert 0.3 < share < 0.6, (split, share)

    best = torch.load(run / "best.pt", weights_only=True)
    assert best["classes"] == ["Monkeypox", "Others"]
    assert (run / "metrics.json").is_file()
