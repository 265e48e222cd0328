"""The experiment config: unknown keys, wrong types and ranges, bad YAML, --set overrides, `config show`.

No training here: every test reads or writes a YAML file and runs in milliseconds (the one
subprocess test takes a few seconds for Python and torch to start).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from helpers_ckpt import assert_one_line_error, run_cli, run_subprocess
from helpers_train import merge, write_config

from semodel.config import Config, load_config, validate
from semodel.errors import SemodelError

BASE = {"data": {"root": "data/x", "image_size": 32}, "optim": {"lr": 0.002}}


def _merged(changes):
    return merge(BASE, changes)


def config_error(tmp_path: Path, raw, overrides: list[str] | None = None, name: str = "exp.yaml") -> str:
    path = tmp_path / name
    if isinstance(raw, str):
        path.write_text(raw)
    else:
        write_config(path, raw)
    with pytest.raises(SemodelError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message, message
    assert str(path) in message, f"the file is not named: {message}"
    return message


# ----------------------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(
    "changes, key, closest",
    [
        ({"optim": {"lrr": 0.1}}, "optim.lrr", "optim.lr"),
        ({"data": {"split": {"vall": 0.1}}}, "data.split.vall", "data.split.val"),
        ({"train": {"epoch": 3}}, "train.epoch", "train.epochs"),
        ({"optimm": {"lr": 0.1}}, "optimm", "optim"),  # an unknown top-level section
    ],
)
def test_unknown_key_names_key_file_and_closest_valid_key(tmp_path, changes, key, closest):
    message = config_error(tmp_path, _merged(changes))
    assert f"unknown key '{key}'" in message
    assert f"did you mean '{closest}'" in message


def test_unknown_key_without_close_match_lists_the_valid_keys(tmp_path):
    message = config_error(tmp_path, _merged({"train": {"zzzzzz": 1}}))
    assert "unknown key 'train.zzzzzz'" in message
    assert "did you mean" not in message
    assert "epochs" in message and "monitor" in message  # the valid keys of the section


# ----------------------------------------------------------------------------- types and ranges


@pytest.mark.parametrize(
    "changes, key, value, allowed",
    [
        ({"optim": {"lr": -0.1}}, "optim.lr", "-0.1", "greater than 0"),
        ({"optim": {"lr": "fast"}}, "optim.lr", "'fast'", "valid number"),
        ({"train": {"epochs": 0}}, "train.epochs", "= 0", "greater than or equal to 1"),
        ({"train": {"epochs": 2.5}}, "train.epochs", "2.5", "valid integer"),
        ({"train": {"ema": "maybe"}}, "train.ema", "'maybe'", "valid boolean"),
        ({"train": {"monitor": "accuracy"}}, "train.monitor", "'accuracy'", "'val_acc'"),
        ({"model": {"name": "resnet9"}}, "model.name", "'resnet9'", "'se_resnet18'"),
        ({"data": {"split": {"val": 0.5, "test": 0.5}}}, "data.split", "'val': 0.5", "must be < 1"),
        ({"data": {"split": {"val": 0.7, "test": 0.4}}}, "data.split", "'test': 0.4", "must be < 1"),
        (
            {"data": {"split": {"group_by": "^(P\\d+_"}}},
            "data.split.group_by",
            "'^(P\\\\d+_'",
            "regular expression",
        ),
        (
            {"data": {"augment": {"scale": [0.9, 0.2]}}},
            "data.augment.scale",
            "[0.9, 0.2]",
            "0 < low <= high <= 1",
        ),
        ({"data": {"num_workers": -1}}, "data.num_workers", "-1", "'auto'"),
        ({"log": {"name": "a/b"}}, "log.name", "'a/b'", "letters, digits"),
        ({"optim": 5}, "optim", "= 5", "dictionary"),
    ],
)
def test_bad_value_names_key_value_and_what_is_allowed(tmp_path, changes, key, value, allowed):
    message = config_error(tmp_path, _merged(changes))
    assert f"{key} = " in message, message
    assert value in message, message
    assert allowed in message, message


def test_missing_data_root_is_named(tmp_path):
    message = config_error(tmp_path, {"data": {"image_size": 32}})
    assert "missing required key 'data.root'" in message


def test_amp_off_in_yaml_means_off(tmp_path):
    # YAML 1.1 reads a bare `off` as false; the documented value must still work in a file.
    path = tmp_path / "exp.yaml"
    path.write_text("data: {root: data/x}\ntrain:\n  amp: off\n")
    assert load_config(path).train.amp == "off"


# ----------------------------------------------------------------------------- YAML files


@pytest.mark.parametrize(
    "text, line",
    [
        ("data:\n  root: data/x\n\timage_size: 32\n", 3),  # a tab
        ("data:\n  root: data/x\noptim:\n  lr: [0.1\ntrain:\n  epochs: 3\n", 5),  # unclosed list
        ("data:\n  root: data/x\n image_size: 32\n", 3),  # bad indentation
    ],
)
def test_malformed_yaml_names_file_and_line(tmp_path, text, line):
    message = config_error(tmp_path, text)
    assert "malformed YAML" in message
    assert f"line {line}," in message


@pytest.mark.parametrize(
    "text, found", [("- data\n- optim\n", "list"), ("just a sentence\n", "str"), ("42\n", "int")]
)
def test_yaml_that_is_not_a_mapping_is_refused(tmp_path, text, found):
    message = config_error(tmp_path, text)
    assert "must be a mapping" in message and f"found a {found}" in message


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(SemodelError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")


# ----------------------------------------------------------------------------- --set


def test_set_overrides_take_the_schema_type(tmp_path):
    path = write_config(tmp_path / "exp.yaml", BASE)
    overrides = [
        "optim.lr=0.01",
        "train.ema=true",
        "train.epochs=7",
        "train.clip_grad=1",
        "train.amp=off",  # YAML alone would make this False
        "log.name=2024",  # ... and this the int 2024
        "train.device=cpu",
        "data.split.group_by=^(P\\d+)_",
        "model.placement=[layer, block]",
        "model.pretrained=null",
        "data.num_workers=2",
        "data.synthetic.classes=2",
    ]
    cfg = load_config(path, overrides)
    assert cfg.optim.lr == 0.01 and type(cfg.optim.lr) is float
    assert cfg.train.ema is True
    assert cfg.train.epochs == 7 and type(cfg.train.epochs) is int
    assert cfg.train.clip_grad == 1.0 and type(cfg.train.clip_grad) is float
    assert cfg.train.amp == "off"
    assert cfg.log.name == "2024"
    assert cfg.train.device == "cpu"
    assert cfg.data.split.group_by == "^(P\\d+)_"
    assert cfg.model.placement == ["layer", "block"]
    assert cfg.model.pretrained is None
    assert cfg.data.num_workers == 2
    assert cfg.data.synthetic is not None and cfg.data.synthetic.classes == 2
    # What the file said and --set did not touch is kept.
    assert cfg.data.image_size == 32 and cfg.data.root == "data/x"
    # Later overrides win; the file itself is not changed.
    assert load_config(path, ["optim.lr=0.1", "optim.lr=0.3"]).optim.lr == 0.3
    assert yaml.safe_load(path.read_text()) == BASE


@pytest.mark.parametrize(
    "override, fragments",
    [
        ("train.epochs=many", ["train.epochs = 'many'", "valid integer"]),
        ("optim.lr=-1", ["optim.lr = -1", "greater than 0"]),
        ("train.ema=perhaps", ["train.ema = 'perhaps'", "valid boolean"]),
        ("optim.lrr=0.1", ["unknown key 'optim.lrr'", "did you mean 'optim.lr'"]),
    ],
)
def test_set_of_wrong_type_or_unknown_key_is_an_error_naming_the_key(tmp_path, override, fragments):
    message = config_error(tmp_path, BASE, [override])
    assert f"--set {override}" in message  # where the value came from
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize("override", ["optim.lr.x=1", "data.root.sub=1", "train.epochs.value=3"])
def test_set_below_a_value_is_an_error(tmp_path, override):
    path = write_config(tmp_path / "exp.yaml", BASE)  # optim.lr in the file, train.epochs not
    section = override.rsplit(".", 1)[0]
    with pytest.raises(SemodelError, match=f"'{section}' is not a section"):
        load_config(path, [override])


@pytest.mark.parametrize("override", ["optim.lr", "=0.1", "optim..lr=0.1"])
def test_set_without_a_dotted_key_and_value_is_an_error(tmp_path, override):
    path = write_config(tmp_path / "exp.yaml", BASE)
    with pytest.raises(SemodelError, match="expected KEY=VALUE"):
        load_config(path, [override])


# ----------------------------------------------------------------------------- the CLI


def test_config_show_prints_the_resolved_config_that_loads_back(tmp_path, capsys):
    path = write_config(tmp_path / "exp.yaml", BASE)
    overrides = ["optim.lr=0.01", "train.amp=off", "log.name=2024", "data.split.group_by=^(P\\d+)_"]
    code, out, err = run_cli(
        ["config", "show", "--config", path, *sum((["--set", o] for o in overrides), [])], capsys
    )
    assert code == 0, err
    shown = yaml.safe_load(out)
    expected = load_config(path, overrides)
    assert set(shown) == set(Config.model_fields)  # every section, defaults filled in
    assert shown["optim"]["lr"] == 0.01 and shown["train"]["amp"] == "off" and shown["log"]["name"] == "2024"
    assert shown["train"]["epochs"] == expected.train.epochs  # a default, printed
    again = validate(shown, "shown")
    assert again == expected
    assert again.to_dict() == expected.to_dict()
    # And printing it again gives the same text: the output is a fixed point.
    write_config(tmp_path / "shown.yaml", shown)
    code, out2, _ = run_cli(["config", "show", "--config", tmp_path / "shown.yaml"], capsys)
    assert code == 0 and out2 == out


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    good = write_config(tmp_path / "good.yaml", BASE)
    unknown = write_config(tmp_path / "unknown.yaml", _merged({"optim": {"lrr": 0.1}}))
    negative = write_config(tmp_path / "negative.yaml", _merged({"optim": {"lr": -0.1}}))
    malformed = tmp_path / "malformed.yaml"
    malformed.write_text("data:\n  root: x\n\tbad: 1\n")
    listed = tmp_path / "listed.yaml"
    listed.write_text("- data\n")
    return {
        "unknown key": (["--config", unknown], "did you mean 'optim.lr'"),
        "out of range": (["--config", negative], "optim.lr = -0.1"),
        "malformed": (["--config", malformed], "malformed YAML at line 3"),
        "not a mapping": (["--config", listed], "must be a mapping"),
        "missing file": (["--config", tmp_path / "nope.yaml"], "config file not found"),
        "bad --set type": (["--config", good, "--set", "train.epochs=many"], "train.epochs = 'many'"),
        "--set below a value": (["--config", good, "--set", "optim.lr.x=1"], "'optim.lr' is not a section"),
    }


@pytest.mark.parametrize("command", ["config show", "train"])
def test_cli_user_errors_exit_2_with_one_line(tmp_path, capsys, command):
    for what, (args, fragment) in _bad_inputs(tmp_path).items():
        code, out, err = run_cli([*command.split(), *args], capsys)
        assert_one_line_error(code, err, fragment)
        assert err.lstrip().startswith("error: "), (what, err)
        assert out == "", (what, out)


def test_cli_error_through_a_real_process(tmp_path):
    path = write_config(tmp_path / "exp.yaml", _merged({"optim": {"lrr": 0.1}}))
    proc = run_subprocess(["config", "show", "--config", path])
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: {path}: unknown key 'optim.lrr'; did you mean 'optim.lr'?"), (
        proc.stderr
    )


@pytest.mark.parametrize(
    "path", sorted(Path(__file__).resolve().parent.parent.glob("configs/**/*.yaml")), ids=lambda p: p.name
)
def test_every_shipped_recipe_validates(path):
    cfg = load_config(path)
    assert cfg.data.root and cfg.model.name
