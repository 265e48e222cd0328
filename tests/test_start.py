"""Starting without writing YAML: ``train --data``, ``config init``, ``config show --defaults``; one
meaning per short option across the commands; shell completion.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main
import yaml
from helpers_ckpt import make_folder, make_image, run_cli
from helpers_train import one_torch_thread, write_config  # noqa: F401 (fixture)
from pydantic import BaseModel

import semodel.cli
from semodel.config import Config, StartOptions, config_from_options, load_config
from semodel.data import group_of
from semodel.errors import SemodelError
from semodel.template import guess_group_by

# A 1-epoch run on 16 px images in about a second (the rest of the config: the schema's defaults).
TINY = [
    "model.stem=cifar",
    "data.num_workers=0",
    "data.split.val=0.25",
    "data.split.test=0",
    "train.device=cpu",
    "log.report=false",
]
TINY_SETS = [a for s in TINY for a in ("--set", s)]


def msld_like(root: Path) -> Path:
    """MSLD's naming: <patient>_<image>.jpg, patients M01... (monkeypox) and NM01... (others)."""
    images = {
        "Monkeypox": [(1, 3), (2, 2), (3, 1), (4, 2), (5, 1)],
        "Others": [(1, 1), (2, 2), (3, 1), (4, 3)],
    }
    for cls, patients in images.items():
        prefix = "M" if cls == "Monkeypox" else "NM"
        for patient, count in patients:
            for i in range(1, count + 1):
                make_image(
                    root / cls / f"{prefix}{patient:02d}_{i:02d}.jpg",
                    (128, 64, 64),
                    patient * 10 + i,
                    (20, 20),
                )
    return root


# ----------------------------------------------------------------------------- train --data


def test_train_from_a_folder_without_yaml(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    make_folder(tmp_path / "photos", per_class=8)
    args = ["train", "--data", "photos", "--epochs", "1", "--image-size", "16", "-q", *TINY_SETS]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    run_dir = tmp_path / "runs" / "photos"  # named after the data folder
    assert (run_dir / "best.pt").exists()
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    expected = Config.model_validate(
        {
            "data": {"root": "photos", "image_size": 16, "num_workers": 0, "split": {"val": 0.25, "test": 0}},
            "model": {"stem": "cifar"},
            "train": {"epochs": 1, "device": "cpu"},
            "log": {"name": "photos", "report": False},
        }
    )
    assert saved == expected.to_dict()  # the defaults plus the options, nothing else
    # The run can be repeated from its config.yaml.
    assert load_config(run_dir / "config.yaml") == expected
    code, out, err = run_cli(["config", "show", "--config", run_dir / "config.yaml"], capsys)
    assert code == 0 and yaml.safe_load(out) == saved


def test_data_overrides_the_config_files_root_and_set_wins(tmp_path):
    config = write_config(tmp_path / "exp.yaml", {"data": {"root": "elsewhere"}, "optim": {"lr": 0.01}})
    options = StartOptions(data=tmp_path / "photos", model="se_resnet50", epochs=3, pretrained="imagenet")
    cfg = config_from_options(config, ["model.name=se_resnet34"], options)
    assert cfg.data.root == str(tmp_path / "photos")
    assert cfg.model.name == "se_resnet34"  # an explicit --set beats --model
    assert (cfg.train.epochs, cfg.model.pretrained, cfg.optim.lr) == (3, "imagenet", 0.01)
    assert cfg.log.name is None  # with --config, the run is named after the config file
    # Without a config file the run is named after the folder (made safe for a folder name).
    cfg = config_from_options(None, [], StartOptions(data=tmp_path / "my photos"))
    assert cfg.log.name == "my-photos" and cfg.model.name == "se_resnet18"
    with pytest.raises(
        SemodelError, match="the command line \\(--data .* --model nope\\): model.name = 'nope'"
    ):
        config_from_options(None, [], StartOptions(data="photos", model="nope"))


@pytest.mark.parametrize("folder", ["empty", "missing"])
def test_train_data_on_an_empty_or_missing_folder_is_one_line(tmp_path, monkeypatch, capsys, folder):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    code, out, err = run_cli(["train", "--data", folder, "-q"], capsys)
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert ("no class folders found" if folder == "empty" else "data folder not found") in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # no runs/ folder


def test_train_needs_config_data_or_resume_and_resume_takes_no_start_options(capsys):
    code, _, err = run_cli(["train"], capsys)
    assert code == 2 and "give --config FILE or --data DIR" in err
    code, _, err = run_cli(
        ["train", "--resume", "runs/x/last.pt", "--data", "photos", "--epochs", "5"], capsys
    )
    assert code == 2 and "leave out --data, --epochs" in err and len(err.strip().splitlines()) == 1


def test_nproc_passes_the_start_options_on(monkeypatch, capsys):
    launched = []
    monkeypatch.setattr(semodel.cli, "_launch", lambda nproc, args: launched.append((nproc, args)) or 0)
    args = [
        "train",
        "--data",
        "photos",
        "--model",
        "se_resnet50",
        "--image-size",
        "64",
        "-s",
        "a.b=1",
        "--nproc",
        "2",
    ]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    assert launched == [
        (2, ["--data", "photos", "--model", "se_resnet50", "--image-size", "64", "--set", "a.b=1"])
    ]


# ----------------------------------------------------------------------------- config init / --defaults


def test_config_init_lists_the_data_suggests_group_by_and_loads_back(tmp_path, capsys):
    root = msld_like(tmp_path / "msld")
    code, out, err = run_cli(["config", "init", "--data", root, "--model", "se_resnet50"], capsys)
    assert code == 0, err
    assert f"# {root}: 2 classes, 16 images" in out
    assert re.search(r"^#   Monkeypox +9$", out, re.M) and re.search(r"^#   Others +7$", out, re.M)
    assert "    group_by: null" in out  # the suggestion is a comment, never applied
    assert "    # group_by: '^([A-Za-z]+\\d+)_'" in out
    my = tmp_path / "my.yaml"
    my.write_text(out)
    code, shown, err = run_cli(["config", "show", "--config", my], capsys)
    assert code == 0, err
    cfg = load_config(my)
    expected = config_from_options(None, [], StartOptions(data=root, model="se_resnet50"))
    assert cfg.to_dict() == {**expected.to_dict(), "log": {**expected.to_dict()["log"], "name": None}}
    # Taking the suggestion (uncomment it, drop the null line) groups the files by patient.
    taken = out.replace("    group_by: null", "    #").replace("    # group_by: '", "    group_by: '")
    my.write_text(taken)
    pattern = re.compile(load_config(my).data.split.group_by)
    assert (
        group_of("Monkeypox/M01_02.jpg", pattern) == "M01"
        and group_of("Others/NM04_03.jpg", pattern) == "NM04"
    )


def test_config_init_suggests_nothing_for_names_without_ids(tmp_path, capsys):
    code, out, err = run_cli(
        ["config", "init", "--data", make_folder(tmp_path / "photos", per_class=6)], capsys
    )
    assert code == 0, err
    assert "SUGGESTION" not in out and "3 classes, 18 images" in out


@pytest.mark.parametrize(
    "names, pattern",
    [
        (
            ["M01_01.jpg", "M01_02.jpg", "M02_01.jpg", "NM01_01.jpg", "NM01_02.jpg", "NM02_01.jpg"],
            r"^([A-Za-z]+\d+)_",
        ),
        # augmented copies: the shortest id prefix (the patient), not patient + image
        (
            [f"M{p:02d}_{i:02d}_{k:02d}.jpg" for p in range(1, 6) for i in (1, 2) for k in range(3)],
            r"^([A-Za-z]+\d+)_",
        ),
        ([f"{p}-{i}.png" for p in range(100, 110) for i in range(3)], r"^(\d+)\-"),
        ([f"IMG_{i:04d}.jpg" for i in range(30)], None),  # one file per number: nothing shared
        ([f"cat_{i}.jpg" for i in range(30)], None),  # no id before the number
        ([f"scan{i}.jpg" for i in range(30)], None),  # nothing after the id
    ],
)
def test_guess_group_by(names, pattern):
    guess = guess_group_by(names)
    assert (guess.pattern if guess else None) == pattern


def schema_fields(model: type[BaseModel] = Config, prefix: str = ""):
    for name, info in model.model_fields.items():
        yield prefix + name, info
        for candidate in (info.annotation, *getattr(info.annotation, "__args__", ())):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                yield from schema_fields(candidate, f"{prefix}{name}.")


def test_every_config_key_has_a_description():
    """config init's comments come from the schema: a new key needs its Field(description=...)."""
    missing = [key for key, info in schema_fields() if not (info.description or "").strip()]
    assert not missing, f"keys without a description in semodel/config.py: {', '.join(missing)}"


def template_comments(text: str) -> dict[str, str]:
    """Dotted key -> its comment, read from the template's indentation (keys of a null section are
    shown commented out, one level deeper)."""
    found: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    for line in text.splitlines():
        m = re.match(r"^( *)(?:# )?([a-z_]+):(.*?)(?:  # (.*))?$", line)
        if not m:
            continue
        indent = len(m.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key = ".".join([*(name for _, name in stack), m.group(2)])
        found.setdefault(key, (m.group(4) or "").strip())
        stack.append((indent, m.group(2)))
    return found


def test_config_show_defaults_prints_every_key_with_its_default_and_meaning(capsys):
    code, out, err = run_cli(["config", "show", "--defaults"], capsys)
    assert code == 0, err
    values = yaml.safe_load(out)
    assert values["data"]["root"] is None
    values["data"]["root"] = "x"
    assert values == Config.model_validate({"data": {"root": "x"}}).to_dict()
    comments = template_comments(out)
    for key, info in schema_fields():
        assert comments.get(key, "").startswith(info.description.strip()), key
    code, _, err = run_cli(["config", "show", "--defaults", "-c", "x.yaml"], capsys)
    assert code == 2 and "leave out --config" in err


# ----------------------------------------------------------------------------- the command line


def all_commands(command, path: str = "semodel"):
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from all_commands(sub, f"{path} {name}")


def test_a_short_option_means_one_thing_in_every_command():
    """Wherever a short option exists it stands for the same long one (-c is always --config, never
    --checkpoint; inspect's -o is --out and also --output, as in eval and export)."""
    meanings: dict[str, list[set[str]]] = {}
    for path, command in all_commands(typer.main.get_command(semodel.cli.app)):
        for param in command.params:
            if param.opts and all(o.startswith("-") for o in param.opts):  # an option, not an argument
                longs = {o for o in param.opts if o.startswith("--")} or {f"{path} {param.name}"}
                for short in (o for o in param.opts if not o.startswith("--")):
                    meanings.setdefault(short, []).append(longs)
    shared = {short: set.intersection(*longs) for short, longs in meanings.items()}
    several = {short: sorted(set.union(*meanings[short])) for short, common in shared.items() if not common}
    assert not several, f"short options with several meanings: {several}"
    assert shared["-c"] == {"--config"} and shared["-k"] == {"--topk"} and shared["-o"] == {"--output"}
    assert shared["-s"] == {"--set"} and shared["-q"] == {"--quiet"} and shared["-b"] == {"--batch-size"}


def test_help_offers_shell_completion_and_shows_flags_without_a_value():
    result = subprocess.run(
        [sys.executable, "-m", "semodel", "train", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    assert re.search(r"-q, --quiet\s+One line", result.stdout) and "<bool>" not in result.stdout
    help_text = subprocess.run(
        [sys.executable, "-m", "semodel", "--help"], capture_output=True, text=True, timeout=60
    ).stdout
    assert "--install-completion" in help_text and "lr-find" in help_text
