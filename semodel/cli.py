"""The ``semodel`` command line: parse, call the library, print.

Heavy imports (torch, torchvision, the training code) happen inside the commands, so that
``semodel --help`` and ``semodel predict`` start quickly.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from semodel._version import __version__
from semodel.errors import Interrupted, SemodelError

app = typer.Typer(
    name="semodel",
    help="Train, evaluate and serve Squeeze-and-Excitation image classifiers (SE-ResNet, SE-DenseNet).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: rich help shows a "<bool>" value for flags, which take none
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
    attention: str = typer.Option("se", help="Attention: se, eca or none."),
    reduction: str = typer.Option(
        "16", help="SE reduction ratio r, or 'learned' (the wide model as trained)."
    ),
    placement: str = typer.Option(
        "block", help="SE-DenseNet placement: layer, block, final (comma-separated)."
    ),
    variants: bool = typer.Option(
        False, "--variants", help="Compare parameter counts of every attention variant instead."
    ),
    markdown: bool = typer.Option(False, "--markdown", help="Print a Markdown table."),
) -> None:
    """List the models with parameters, GFLOPs and the cost of attention over the plain backbone."""
    from semodel.models.summary import format_table, summarize_all, variant_table

    places = [p.strip() for p in placement.split(",") if p.strip()]
    options: dict = {"placement": places[0] if len(places) == 1 else places}
    if variants:
        typer.echo(variant_table(num_classes=num_classes, markdown=markdown, **options))
        return
    if reduction != "learned":
        try:
            options["reduction"] = float(reduction)
        except ValueError:
            raise SemodelError(f"--reduction {reduction!r}: a number (e.g. 16) or 'learned'") from None
    else:
        options["reduction"] = "learned"
    rows = summarize_all(image_size=image_size, num_classes=num_classes, attention=attention, **options)
    typer.echo(format_table(rows, image_size=image_size, markdown=markdown))


@config_app.command("show")
def config_show(
    config: Path = typer.Option(..., "--config", "-c", help="Experiment YAML file."),
    overrides: list[str] = typer.Option(
        [], "--set", "-s", help="Override a key: --set optim.lr=0.01 (repeatable)."
    ),
) -> None:
    """Print the resolved config (defaults filled in, overrides applied) as YAML."""
    from semodel.config import dump_yaml, load_config

    typer.echo(dump_yaml(load_config(config, overrides)), nl=False)


@app.command("train")
def train_cmd(
    config: Path | None = typer.Option(None, "--config", "-c", help="Experiment YAML file."),
    overrides: list[str] = typer.Option(
        [], "--set", "-s", help="Override a key: --set optim.lr=0.01 (repeatable)."
    ),
    resume: Path | None = typer.Option(None, "--resume", help="Continue a run from its last.pt."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="One line per epoch, no progress bars."),
    nproc: int | None = typer.Option(
        None,
        "--nproc",
        min=1,
        help="Train with N processes on this machine (DistributedDataParallel through "
        "torch.distributed.run): one per GPU, or N CPU processes.",
    ),
) -> None:
    """Train a model from a YAML experiment; writes runs/<name>/ (config, split, TensorBoard, checkpoints)."""
    if config is None and resume is None:
        raise SemodelError("give --config FILE (a new run) or --resume runs/<run>/last.pt (continue one)")
    if nproc is not None and nproc > 1:
        args = ["--config", str(config)] if config is not None else []
        args += [a for o in overrides for a in ("--set", o)]
        args += ["--resume", str(resume)] if resume is not None else []
        args += ["--quiet"] if quiet else []
        code = _launch(nproc, args)
        if code:
            raise typer.Exit(code)
        return
    from semodel.train import train_from_cli

    train_from_cli(config, overrides, resume, quiet)


def _launch(nproc: int, train_args: list[str]) -> int:
    """``semodel train TRAIN_ARGS`` in ``nproc`` processes through torch.distributed.run; its exit code."""
    import subprocess

    if "RANK" in os.environ:
        raise SemodelError("--nproc starts its own processes; leave it out when torchrun starts semodel")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "semodel",
        "train",
        *train_args,
    ]
    process = subprocess.Popen(command)
    interrupted = False
    while True:
        try:
            code = process.wait()
            break
        except KeyboardInterrupt:
            # The launcher got the same Ctrl-C: it passes it on to the processes, which save
            # last.pt (rank 0 prints how to resume) and stop.
            interrupted = True
    if interrupted:
        return 130
    if code:
        typer.echo(
            f"error: training with {nproc} processes failed (exit code {code}); "
            "the failing process's message is above",
            err=True,
        )
    return code


@app.command("cv")
def cv_cmd(
    config: Path | None = typer.Option(None, "--config", "-c", help="Experiment YAML file."),
    folds: int | None = typer.Option(None, "--folds", "-k", help="Number of folds K (default: cv.folds, 5)."),
    overrides: list[str] = typer.Option(
        [], "--set", "-s", help="Override a key: --set cv.weights=last (repeatable)."
    ),
    resume: Path | None = typer.Option(
        None, "--resume", help="Continue the cross-validation in this folder (runs/<name>)."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="One line per epoch, no progress bars."),
) -> None:
    """K-fold cross-validation, stratified by class and grouped by data.split.group_by: one run per fold
    in runs/<name>/fold-<k>/, then cv.json and a table (mean +- std). Run it again to continue."""
    if config is None and resume is None:
        raise SemodelError(
            "give --config FILE (a new cross-validation, or the one it started) or --resume runs/<name>"
        )
    from semodel.cv import cv_from_cli

    cv_from_cli(config, folds, overrides, resume, quiet)


@app.command("eval")
def eval_cmd(
    checkpoint: Path = typer.Argument(..., help="A checkpoint (best.pt / last.pt) written by semodel train."),
    data: Path | None = typer.Option(
        None, "--data", help="Evaluate this ImageFolder (same class names) instead of the run's own split."
    ),
    split: str = typer.Option(
        "auto", "--split", help="auto (test if there is one, else val), train, val, test or all."
    ),
    output: Path | None = typer.Option(None, "--output", "-o", help="Also write the figures as JSON here."),
    plot: Path | None = typer.Option(
        None, "--plot", help="Write confusion_matrix.png (and roc.png for two classes) to this folder."
    ),
    ema: bool | None = typer.Option(
        None,
        "--ema/--no-ema",
        help="EMA or raw weights (default: the ones the run selected: EMA with train.ema).",
    ),
    tta: bool = typer.Option(
        False, "--tta", help="Average the prediction with the horizontally flipped image."
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    batch_size: int = typer.Option(64, "--batch-size", "-b", help="Images per batch."),
    workers: int | None = typer.Option(None, "--workers", help="Data loader processes (default: by device)."),
) -> None:
    """Metrics of a checkpoint: accuracy, per-class P/R/F1, confusion matrix, ROC-AUC, top-k."""
    from semodel.evaluate import EvalOptions, eval_from_cli

    eval_from_cli(checkpoint, data, EvalOptions(split, device, batch_size, ema, tta, workers), output, plot)


@app.command("inspect")
def inspect_cmd(
    checkpoint: Path = typer.Argument(..., help="A checkpoint (best.pt / last.pt) written by semodel train."),
    data: Path = typer.Option(..., "--data", help="An ImageFolder with the checkpoint's class names."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the PNG figures and inspect.json."),
    per_class: int = typer.Option(32, "--per-class", help="Images per class for the excitation analysis."),
    cams: int = typer.Option(4, "--cams", help="Images per class in the Grad-CAM grid (0: none)."),
    sites: str | None = typer.Option(
        None,
        "--sites",
        help="Attention modules to analyse, comma-separated (default: the last of every stage).",
    ),
    tensorboard: bool = typer.Option(
        False, "--tensorboard", help="Also write the figures to OUT/tensorboard."
    ),
    ema: bool | None = typer.Option(
        None,
        "--ema/--no-ema",
        help="EMA or raw weights (default: the ones the run selected: EMA with train.ema).",
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    batch_size: int = typer.Option(32, "--batch-size", "-b", help="Images per batch."),
    seed: int = typer.Option(0, "--seed", help="Which images are sampled."),
) -> None:
    """What the attention does: mean excitation per channel and class at every stage, learned SE
    widths, and a Grad-CAM grid; PNGs and inspect.json in --out."""
    from semodel.inspection import InspectOptions, inspect_checkpoint

    names = [s.strip() for s in sites.split(",") if s.strip()] if sites else None
    options = InspectOptions(per_class, cams, names, device, ema, batch_size, tensorboard, seed)
    inspect_checkpoint(checkpoint, data, out, options)


@app.command("predict")
def predict_cmd(
    images: list[str] = typer.Argument(
        ..., help="Image files, folders (searched recursively) or glob patterns."
    ),
    checkpoint: Path | None = typer.Option(
        None, "--checkpoint", "-c", help="Checkpoint to use (default: the newest best.pt under ./runs)."
    ),
    topk: int | None = typer.Option(
        None, "--topk", "-k", help="Classes per image (default: min(3, classes))."
    ),
    fmt: str = typer.Option("table", "--format", "-f", help="table, json or csv (one row per image)."),
    batch_size: int = typer.Option(32, "--batch-size", "-b", help="Images per batch."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    cam: Path | None = typer.Option(
        None, "--cam", help="Write a Grad-CAM overlay PNG per image (predicted class) to this folder."
    ),
    ema: bool | None = typer.Option(
        None,
        "--ema/--no-ema",
        help="EMA or raw weights (default: the ones the run selected: EMA with train.ema).",
    ),
) -> None:
    """Top-k classes and probabilities per image; exit code 1 if any input could not be read."""
    from semodel.predict import PredictOptions, predict_from_cli

    code = predict_from_cli(images, checkpoint, PredictOptions(topk, fmt, batch_size, device, cam, ema))
    if code:
        raise typer.Exit(code)


@app.command("export")
def export_cmd(
    checkpoint: Path = typer.Argument(..., help="A checkpoint written by semodel train."),
    fmt: str = typer.Option("onnx", "--format", "-f", help="onnx or torchscript."),
    output: Path | None = typer.Option(
        None, "--output", "-o", help="Output file (default: beside the checkpoint, .onnx / .torchscript.pt)."
    ),
    ema: bool | None = typer.Option(
        None,
        "--ema/--no-ema",
        help="EMA or raw weights (default: the ones the run selected: EMA with train.ema).",
    ),
    atol: float = typer.Option(1e-4, "--atol", help="Largest allowed |exported - PyTorch| logit difference."),
    opset: int | None = typer.Option(None, "--opset", help="ONNX opset (default: the exporter's)."),
) -> None:
    """ONNX or TorchScript with class names and preprocessing inside, verified against PyTorch."""
    from semodel.export import export_from_cli

    export_from_cli(checkpoint, fmt, output, ema, atol, opset)


def _process_name() -> str:
    """``[rank 1 of 2] `` when torchrun started several processes, so that a failure names its process."""
    world = os.environ.get("WORLD_SIZE", "1")
    return f"[rank {os.environ.get('RANK', '?')} of {world}] " if world != "1" else ""


def _by_ctrl_c(exit: SystemExit) -> bool:
    """Whether the CLI framework turned a Ctrl-C into this exit (typer raises Exit(130) from it)."""
    seen, error = set(), exit.__context__
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2, never a traceback."""
    # A file name that is not valid UTF-8 reaches us with surrogate escapes; print its bytes.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="surrogateescape")
    try:
        app()
    except SystemExit as e:
        if e.code == 130 and _by_ctrl_c(e):
            typer.echo("interrupted", err=True)
        raise
    except SemodelError as e:
        typer.echo(f"error: {_process_name()}{e}", err=True)
        sys.exit(2)
    except Interrupted as e:  # the command stopped cleanly and said what it kept
        if str(e):
            typer.echo(str(e), err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
