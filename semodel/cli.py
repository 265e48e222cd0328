"""The ``semodel`` command line: parse, call the library, print.

Heavy imports (torch, torchvision, the training code) happen inside the commands, so that
``semodel --help`` and ``semodel predict`` start quickly.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from semodel import __version__
from semodel.errors import SemodelError

app = typer.Typer(
    name="semodel",
    help="Train, evaluate and serve Squeeze-and-Excitation image classifiers (SE-ResNet, SE-DenseNet).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
config_app = typer.Typer(help="Inspect experiment configs.", no_args_is_help=True)
app.add_typer(config_app, name="config")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"semodel {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """semodel: one YAML file in, one self-describing checkpoint out."""


@app.command("models")
def models_cmd(
    image_size: int = typer.Option(224, help="Input size for the GFLOPs column."),
    num_classes: int = typer.Option(1000, help="Classifier size for the parameter column."),
    markdown: bool = typer.Option(False, "--markdown", help="Print a Markdown table."),
) -> None:
    """List the models with parameters, GFLOPs and the cost of SE over the plain backbone."""
    from semodel.models.summary import format_table, summarize_all

    rows = summarize_all(image_size=image_size, num_classes=num_classes)
    typer.echo(format_table(rows, image_size=image_size, markdown=markdown))


@config_app.command("show")
def config_show(
    config: Path = typer.Option(..., "--config", "-c", help="Experiment YAML file."),
    overrides: List[str] = typer.Option([], "--set", "-s", help="Override a key: --set optim.lr=0.01 (repeatable)."),
) -> None:
    """Print the resolved config (defaults filled in, overrides applied) as YAML."""
    from semodel.config import dump_yaml, load_config

    typer.echo(dump_yaml(load_config(config, overrides)), nl=False)


@app.command("train")
def train_cmd(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Experiment YAML file."),
    overrides: List[str] = typer.Option([], "--set", "-s", help="Override a key: --set optim.lr=0.01 (repeatable)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue a run from its last.pt."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="One line per epoch, no progress bars."),
) -> None:
    """Train a model from a YAML experiment; writes runs/<name>/ (config, split, TensorBoard, checkpoints)."""
    from semodel.train import train_from_cli

    if config is None and resume is None:
        raise SemodelError("give --config FILE (a new run) or --resume runs/<run>/last.pt (continue one)")
    train_from_cli(config, overrides, resume, quiet)


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2, never a traceback."""
    try:
        app()
    except SemodelError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
