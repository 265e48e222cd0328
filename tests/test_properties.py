"""Properties, with hypothesis: the data split and config overrides (no images, no training).

The split (``semodel.data.assign_splits``): every file gets exactly one split; the files of one
group (patient) never straddle two splits; per class, val and test hold their share of the
class's files. The share is ``round(files x fraction)`` (Python's round, half to even: what the
code computes as each split's target). Without groups every file is its own group and the counts
are exactly the targets. With groups, a split takes a group only while it is short of its target,
and then only a group that overshoots by no more than the split was short (size <= 2 x shortfall),
or any group while the split is still empty; so it overshoots by less than one group, and it stays
short only by less than half of a group that was too large (or, for val, by less than test
overshot, when test took every group). Asserted: per class ``|count - target| <= largest group of
the class - 1``, for data where each patient has one class. When a group holds files of several
classes it goes with its majority class, and only the first two properties hold.

Config overrides: random valid ``--set`` sets applied by ``load_config`` set what the rule of
``apply_overrides`` says (YAML, but text for a field that takes text), and ``dump_yaml`` (what
``semodel config show`` prints) loads back to an equal Config and prints the same text again;
likewise for any printable text given to a string field.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from semodel.config import Config, dump_yaml, load_config
from semodel.data import Sample, assign_splits, group_of
from semodel.models import MODEL_NAMES

SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
GROUP_BY = r"^(P\d+)_"
SPLITS = ("train", "val", "test")


# ----------------------------------------------------------------------------- the split


@st.composite
def fractions(draw) -> tuple[float, float]:
    """val in (0, 0.6], test in [0, 0.5], val + test < 1 (what the config allows and a run uses)."""
    val = draw(st.floats(0.01, 0.6))
    test = draw(st.one_of(st.just(0.0), st.floats(0.0, min(0.5, 0.98 - val))))
    return val, test


@st.composite
def grouped_files(draw, pure: bool) -> tuple[int, list[Sample]]:
    """Files ``<class>/P<patient>_<k>.jpg`` (some without a patient id: a group of their own).

    ``pure``: every patient has files of one class only; else a patient's files may be of any class.
    """
    num_classes = draw(st.integers(2, 4))
    patients = draw(st.integers(1, 25))
    patient_class = [draw(st.integers(0, num_classes - 1)) for _ in range(patients)]
    samples = []
    for k in range(draw(st.integers(1, 80))):
        if draw(st.integers(0, 9)) == 0:
            label, name = draw(st.integers(0, num_classes - 1)), f"loose_{k}.jpg"
        else:
            patient = draw(st.integers(0, patients - 1))
            label = patient_class[patient] if pure else draw(st.integers(0, num_classes - 1))
            name = f"P{patient}_{k}.jpg"
        samples.append(Sample(f"c{label}/{name}", label))
    return num_classes, samples


@st.composite
def plain_files(draw) -> tuple[int, list[Sample]]:
    num_classes = draw(st.integers(2, 5))
    counts = [draw(st.integers(0, 40)) for _ in range(num_classes)]
    return num_classes, [Sample(f"c{c}/f{i}.jpg", c) for c in range(num_classes) for i in range(counts[c])]


def split_of(samples: list[Sample]) -> dict[str, str]:
    return {s.path: s.split for s in samples}


def assert_every_file_once(before: list[str], samples: list[Sample]) -> None:
    assert [s.path for s in samples] == before  # the same files, in the same order, none twice
    assert all(s.split in SPLITS for s in samples)


def class_counts(samples: list[Sample], label: int, split: str) -> int:
    return sum(1 for s in samples if s.label == label and s.split == split)


@SETTINGS
@given(files=plain_files(), fracs=fractions(), seed=st.integers(0, 2**32))
def test_split_without_groups_gives_every_class_exactly_its_share(files, fracs, seed):
    num_classes, samples = files
    val, test = fracs
    before = [s.path for s in samples]
    out = assign_splits(samples, num_classes, val, test, seed, None)
    assert_every_file_once(before, out)
    for label in range(num_classes):
        n = sum(1 for s in out if s.label == label)
        for split, fraction in (("val", val), ("test", test)):
            assert class_counts(out, label, split) == round(n * fraction), (label, split, n, fraction)


@SETTINGS
@given(files=grouped_files(pure=True), fracs=fractions(), seed=st.integers(0, 2**32))
def test_grouped_split_keeps_patients_whole_and_shares_within_one_group(files, fracs, seed):
    num_classes, samples = files
    val, test = fracs
    before = [s.path for s in samples]
    out = assign_splits(samples, num_classes, val, test, seed, GROUP_BY)
    assert_every_file_once(before, out)
    patients = patient_splits(out)
    assert all(len(splits) == 1 for splits in patients.values()), patients
    for label in range(num_classes):
        mine = [s for s in out if s.label == label]
        largest = max(Counter(patient_of(s.path) for s in mine).values(), default=1)
        for split, fraction in (("val", val), ("test", test)):
            target = round(len(mine) * fraction)
            count = class_counts(out, label, split)
            assert abs(count - target) <= largest - 1, (label, split, count, target, largest)


@SETTINGS
@given(files=grouped_files(pure=False), fracs=fractions(), seed=st.integers(0, 2**32))
def test_grouped_split_keeps_mixed_patients_whole(files, fracs, seed):
    num_classes, samples = files
    val, test = fracs
    before = [s.path for s in samples]
    out = assign_splits(samples, num_classes, val, test, seed, GROUP_BY)
    assert_every_file_once(before, out)
    patients = patient_splits(out)
    assert all(len(splits) == 1 for splits in patients.values()), patients
    # The group written to split.csv is the patient (or the file, for a name without one).
    assert all(s.group == patient_of(s.path) for s in out)


@SETTINGS
@given(files=grouped_files(pure=True), fracs=fractions(), seed=st.integers(0, 2**32))
def test_split_depends_only_on_the_seed(files, fracs, seed):
    num_classes, samples = files

    def split_once() -> dict[str, str]:
        fresh = [Sample(s.path, s.label) for s in samples]
        return split_of(assign_splits(fresh, num_classes, *fracs, seed, GROUP_BY))

    assert split_once() == split_once()


def patient_of(path: str) -> str:
    """The group, computed here independently of ``group_of``: P<n> before the underscore, else the path."""
    m = re.match(r"P\d+(?=_)", Path(path).name)
    return m.group(0) if m else path


def patient_splits(samples: list[Sample]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for s in samples:
        out[patient_of(s.path)].add(s.split)
    return out


def test_group_of_matches_the_independent_rule():
    pattern = re.compile(GROUP_BY)
    for path in ["c0/P12_3.jpg", "c1/loose_4.jpg", "c1/P7_x.png", "c0/XP1_2.jpg"]:
        assert group_of(path, pattern) == patient_of(path)


# ----------------------------------------------------------------------------- config round trip


def _float_text(low: float, high: float, **kwargs):
    return st.floats(low, high, allow_nan=False, allow_infinity=False, **kwargs).map(repr)


# key -> strategy for the text after `=`; every value valid for the base config below.
OVERRIDES = {
    "optim.lr": _float_text(1e-7, 10.0, exclude_min=False),
    "optim.name": st.sampled_from(["sgd", "adamw"]),
    "optim.weight_decay": _float_text(0.0, 1.0),
    "optim.betas": st.tuples(st.floats(0, 0.999), st.floats(0, 0.999)).map(lambda b: f"[{b[0]!r}, {b[1]!r}]"),
    "train.epochs": st.integers(1, 10**6).map(str),
    "train.amp": st.sampled_from(["auto", "bf16", "fp16", "off"]),
    "train.ema": st.sampled_from(["true", "false", "yes", "no", "on", "off", "True"]),
    "train.clip_grad": st.one_of(st.just("null"), _float_text(1e-3, 100.0)),
    "train.patience": st.one_of(st.just("null"), st.integers(1, 1000).map(str)),
    "train.seed": st.integers(-(2**40), 2**40).map(str),
    "train.monitor": st.sampled_from(["val_acc", "val_loss", "val_f1", "val_balanced_acc"]),
    "train.device": st.sampled_from(["auto", "cpu", "cuda", "cuda:1", "mps"]),
    "data.split.val": _float_text(0.01, 0.5),
    "data.split.seed": st.integers(0, 10**9).map(str),
    "data.split.group_by": st.sampled_from([r"^(P\d+)_", r"(\w+)-", "null", r"^[A-Z]{2}"]),
    "data.augment.scale": st.tuples(st.floats(0.01, 1.0), st.floats(0.01, 1.0)).map(
        lambda pair: f"[{min(pair)!r}, {max(pair)!r}]"
    ),
    "data.augment.hflip": _float_text(0.0, 1.0),
    "data.image_size": st.integers(16, 2048).map(str),
    "data.num_workers": st.one_of(st.just("auto"), st.integers(0, 64).map(str)),
    "data.balance": st.sampled_from(["none", "sampler", "loss"]),
    "model.name": st.sampled_from(list(MODEL_NAMES)),
    "model.reduction": _float_text(0.5, 64.0),
    "model.placement": st.sampled_from(["block", "layer", "[layer, final]", "none"]),
    "model.pretrained": st.sampled_from(["null", "imagenet", "weights/resnet18.pth", "2024"]),
    # Names that YAML reads as something else: a number, a bool, a null, a list ("-"), a document marker.
    "log.name": st.one_of(
        st.from_regex(r"[A-Za-z0-9._-]{1,12}", fullmatch=True),
        st.sampled_from(["2024", "1e5", "0x1F", "1_000", ".inf", "yes", "off", "null", "-", "---", "..."]),
    ),
    "log.tensorboard": st.sampled_from(["true", "false"]),
    "schedule.warmup_epochs": _float_text(0.0, 10.0),
}
YAML_NULLS = {"null", "Null", "NULL", "~"}
# Fields that take text: str fields (those that may be null marked True) and Literal fields.
STRING_FIELDS = {
    "train.device": False,
    "log.out_dir": False,
    "data.root": False,
    "log.name": True,
    "model.pretrained": True,
    "data.split.group_by": True,
}
LITERAL_FIELDS = {"train.amp", "model.name", "optim.name", "train.monitor", "data.balance"}
FLOAT_FIELDS = {
    "optim.lr",
    "optim.weight_decay",
    "train.clip_grad",
    "data.split.val",
    "data.augment.hflip",
    "model.reduction",
    "schedule.warmup_epochs",
}


def expected_value(key: str, text: str):
    """What ``--set key=text`` must set (the rule apply_overrides documents).

    The text is read as YAML, except that a field that takes text gets the text itself when YAML
    reads something else than a string (a number, a bool, a list, a null); nothing, or a null
    spelled out (null, ~) in a field that may be null, is null.
    """
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    if key in STRING_FIELDS:
        if not text.strip() or (text.strip() in YAML_NULLS and STRING_FIELDS[key]):
            return None
        return value if isinstance(value, str) else text.strip()
    if key in LITERAL_FIELDS:
        return text
    if isinstance(value, list):
        # float pairs ("1e-07" is a string to YAML 1.1, a float to the schema)
        return tuple(float(v) for v in value) if key in ("optim.betas", "data.augment.scale") else value
    if key in FLOAT_FIELDS and value is not None:
        return float(value)
    return value


def get(config: Config, key: str):
    node = config
    for part in key.split("."):
        node = getattr(node, part)
    return node


@pytest.fixture(scope="module")
def base_config(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("properties")
    path = folder / "base.yaml"
    path.write_text("data:\n  root: data/x\n  split: {val: 0.2, test: 0.2}\noptim: {lr: 0.002}\n")
    return path


@SETTINGS
@given(data=st.data())
def test_config_show_output_loads_back_to_the_same_config(base_config, data):
    keys = data.draw(st.lists(st.sampled_from(sorted(OVERRIDES)), unique=True, max_size=8), label="keys")
    overrides = [f"{key}={data.draw(OVERRIDES[key], label=key)}" for key in keys]
    config = load_config(base_config, overrides)
    for item in overrides:
        key, _, text = item.partition("=")
        assert get(config, key) == expected_value(key, text), item

    shown = dump_yaml(config)  # what `semodel config show` prints
    again_path = base_config.with_name("shown.yaml")
    again_path.write_text(shown, encoding="utf-8")
    again = load_config(again_path)
    assert again == config
    assert again.to_dict() == config.to_dict()
    assert dump_yaml(again) == shown  # a fixed point
    # And the same overrides on top of the printed config change nothing.
    assert load_config(again_path, overrides) == config


@SETTINGS
@given(
    key=st.sampled_from(["data.root", "log.out_dir", "train.device", "model.pretrained"]),
    text=st.text(st.characters(min_codepoint=32, max_codepoint=126), min_size=1, max_size=16)
    .map(str.strip)
    .filter(bool),
)
def test_a_string_field_takes_any_text(base_config, key, text):
    """Whatever YAML makes of the text (a number, a list for '-', null for '---' or '~', a mapping
    for 'a: b', an error for '@x'), a string field gets a string, and `config show` loads back."""
    config = load_config(base_config, [f"{key}={text}"])
    assert get(config, key) == expected_value(key, text), text
    if key != "model.pretrained" or text not in YAML_NULLS:
        assert isinstance(get(config, key), str) or not text
    shown = dump_yaml(config)
    again_path = base_config.with_name("shown.yaml")
    again_path.write_text(shown, encoding="utf-8")
    assert load_config(again_path) == config
