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
    add_completion=True,  # --install-completion / --show-completion (bash, zsh, fish, PowerShell)
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: rich help shows a "<bool>" value for flags, which take none
    context_settings={"help_option_names": ["-h", "--help"]},
)
config_app = typer.Typer(help="Write and inspect experiment configs.", no_args_is_help=True)
app.add_typer(config_app, name="config")

# Short options mean one thing in every command: -c --config, -s --set, -q --quiet, -o --output,
# -b --batch-size, -f --format, -k --topk, -h --help.


# Starting from a folder instead of a YAML file (train, lr-find, config init): each option sets one
# config key (semodel.config.START_KEYS); an explicit --set of that key wins.
def _data_option(more: str = "") -> typer.models.OptionInfo:
    return typer.Option(
        None, "--data", help="A folder of class folders (DIR/<class>/<image>): sets data.root." + more
    )


NAMED_AFTER_DATA = " Without --config the rest are the defaults and the run is named after the folder."


def _model_option() -> typer.models.OptionInfo:
    return typer.Option(None, "--model", help="Sets model.name, e.g. se_resnet50 (see: semodel models).")


def _epochs_option() -> typer.models.OptionInfo:
    return typer.Option(None, "--epochs", help="Sets train.epochs.")


def _image_size_option() -> typer.models.OptionInfo:
    return typer.Option(None, "--image-size", help="Sets data.image_size (pixels).")


def _pretrained_option() -> typer.models.OptionInfo:
    return typer.Option(
        None, "--pretrained", help="Sets model.pretrained: imagenet, timm:<name>[.<tag>] or a weights file."
    )


# Options of every command that runs a checkpoint (eval, inspect, predict, export).
def _ema_option() -> typer.models.OptionInfo:
    return typer.Option(
        None,
        "--ema/--no-ema",
        help="EMA or raw weights (default: the ones the run selected: EMA with train.ema).",
    )


def _device_option() -> typer.models.OptionInfo:
    return typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps.")


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
    config: Path | None = typer.Option(None, "--config", "-c", help="Experiment YAML file."),
    overrides: list[str] = typer.Option(
        [], "--set", "-s", help="Override a key: --set optim.lr=0.01 (repeatable)."
    ),
    defaults: bool = typer.Option(
        False, "--defaults", help="Print every key's default with what it does instead (as comments)."
    ),
) -> None:
    """Print the resolved config (defaults filled in, overrides applied) as YAML."""
    from semodel.config import StartOptions, dump_yaml, load_config

    if defaults:
        if config is not None or overrides:
            raise SemodelError("--defaults prints the schema's defaults: leave out --config and --set")
        from semodel.template import config_template

        typer.echo(config_template(StartOptions(), "semodel config show --defaults"), nl=False)
        return
    if config is None:
        raise SemodelError("give --config FILE (or --defaults: every key's default with what it does)")
    typer.echo(dump_yaml(load_config(config, overrides)), nl=False)


@config_app.command("init")
def config_init(
    data: Path | None = _data_option(),
    model: str | None = _model_option(),
    epochs: int | None = _epochs_option(),
    image_size: int | None = _image_size_option(),
    pretrained: str | None = _pretrained_option(),
) -> None:
    """Print a commented config: every key with its value and what it does; with --data, the classes
    and image counts found there and, for file names that start with an id, a suggested
    data.split.group_by (commented out). Save it: semodel config init --data photos > my.yaml"""
    import shlex

    from semodel.config import StartOptions
    from semodel.template import config_template

    options = StartOptions(data, model, epochs, image_size, pretrained)
    command = shlex.join(["semodel", "config", "init", *options.flags()])
    typer.echo(config_template(options, command), nl=False)


@app.command("train")
def train_cmd(
    config: Path | None = typer.Option(None, "--config", "-c", help="Experiment YAML file."),
    data: Path | None = _data_option(NAMED_AFTER_DATA),
    model: str | None = _model_option(),
    epochs: int | None = _epochs_option(),
    image_size: int | None = _image_size_option(),
    pretrained: str | None = _pretrained_option(),
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
    """Train a model from a YAML experiment (--config) or from a folder of photos (--data DIR, the
    defaults for the rest); writes runs/<name>/ (config, split, TensorBoard, checkpoints)."""
    from semodel.config import StartOptions

    start = StartOptions(data, model, epochs, image_size, pretrained)
    if config is None and data is None and resume is None:
        raise SemodelError(
            "give --config FILE or --data DIR (a new run), or --resume runs/<run>/last.pt (continue one)"
        )
    if resume is not None and start.flags():
        raise SemodelError(
            f"--resume continues with the config stored in the checkpoint; leave out "
            f"{', '.join(start.flags()[::2])} (--set train.epochs=N extends a finished run)"
        )
    if nproc is not None and nproc > 1:
        args = ["--config", str(config)] if config is not None else []
        args += start.flags()
        args += [a for o in overrides for a in ("--set", o)]
        args += ["--resume", str(resume)] if resume is not None else []
        args += ["--quiet"] if quiet else []
        code = _launch(nproc, args)
        if code:
            raise typer.Exit(code)
        return
    from semodel.report import report_after_training
    from semodel.train import train_from_cli

    run_dir = train_from_cli(config, overrides, resume, quiet, start)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 writes the report
        report_after_training(run_dir, log=typer.echo)


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


@app.command("lr-find")
def lr_find_cmd(
    config: Path | None = typer.Option(None, "--config", "-c", help="Experiment YAML file."),
    data: Path | None = _data_option(NAMED_AFTER_DATA),
    model: str | None = _model_option(),
    epochs: int | None = typer.Option(
        None, "--epochs", help="Sets train.epochs (not used by the scan; kept in the suggested command)."
    ),
    image_size: int | None = _image_size_option(),
    pretrained: str | None = _pretrained_option(),
    overrides: list[str] = typer.Option(
        [], "--set", "-s", help="Override a key: --set data.batch_size=64 (repeatable)."
    ),
    start: float = typer.Option(1e-7, "--start", help="The smallest learning rate of the scan."),
    end: float = typer.Option(10.0, "--end", help="The largest learning rate of the scan."),
    steps: int = typer.Option(
        100, "--steps", help="Learning rates to try, one optimizer step each (at most one epoch's batches)."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """The learning-rate range test (Smith 2017): train from the config's starting weights with the lr
    rising exponentially from --start to --end, for at most one epoch, until the loss diverges; writes
    lr_find.csv and lr_find.png into a new folder runs/<name>-lr-find and prints the suggested optim.lr."""
    import shlex

    from semodel.config import StartOptions
    from semodel.lrfind import ScanOptions, lr_find_from_cli, rounded_lr

    options = StartOptions(data, model, epochs, image_size, pretrained)
    if config is None and data is None:
        raise SemodelError("give --config FILE or --data DIR (the run whose learning rate to find)")
    result = lr_find_from_cli(config, overrides, options, ScanOptions(start, end, steps), quiet)
    if result.suggestion is not None:
        args = ["semodel", "train", *(["--config", str(config)] if config is not None else [])]
        args += [*options.flags(), *(a for o in overrides for a in ("--set", o))]
        typer.echo(f"use it: {shlex.join([*args, '--set', f'optim.lr={rounded_lr(result.suggestion)}'])}")


@app.command("report")
def report_cmd(
    run_dir: Path = typer.Argument(..., help="A run folder (runs/<name>) or a cross-validation folder."),
    ci: int = typer.Option(1000, "--ci", help="Bootstrap resamples of the 95% intervals (0: none)."),
    worst: int = typer.Option(8, "--worst", help="How many most confidently wrong images to show."),
    device: str = typer.Option("auto", "--device", help="For runs whose test split must be predicted again."),
) -> None:
    """(Re)write a finished run's report: report.html, results.csv, test_predictions.csv and the figures."""
    if ci < 0:
        raise SemodelError(f"--ci {ci}: the number of bootstrap resamples must be 0 (off) or more")
    if worst < 1:
        raise SemodelError(f"--worst {worst}: must be at least 1 (the number of images shown)")
    if not run_dir.is_dir():
        raise SemodelError(f"{run_dir}: not a folder (give a run folder such as runs/<name>)")
    from semodel.cv import is_cv_dir

    options_args = dict(resamples=ci, worst=worst, device=device)
    if is_cv_dir(run_dir):
        from semodel.cv import cv_report

        cv_report(run_dir, options_args, log=typer.echo)
    else:
        from semodel.report import ReportOptions, build_report

        build_report(run_dir, ReportOptions(**options_args), log=typer.echo)


@app.command("cv")
def cv_cmd(
    config: Path | None = typer.Option(None, "--config", "-c", help="Experiment YAML file."),
    folds: int | None = typer.Option(None, "--folds", help="Number of folds K (default: cv.folds, 5)."),
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
    checkpoint: Path = typer.Argument(
        ..., help="A checkpoint (best.pt / last.pt), or a cross-validation folder (its folds' ensemble)."
    ),
    data: Path | None = typer.Option(
        None, "--data", help="Evaluate this ImageFolder (same class names) instead of the run's own split."
    ),
    split: str = typer.Option(
        "auto", "--split", help="auto (test if there is one, else val), train, val, test or all."
    ),
    output: Path | None = typer.Option(None, "--output", "-o", help="Also write the figures as JSON here."),
    plot: Path | None = typer.Option(
        None, "--plot", help="Write confusion_matrix.png, roc.png and reliability.png to this folder."
    ),
    predictions: Path | None = typer.Option(
        None, "--predictions", help="Write one row per image (path, group, true, predicted, probabilities)."
    ),
    worst: int | None = typer.Option(
        None, "--worst", help="Write worst.png: the N most confidently wrong images with their Grad-CAM."
    ),
    ci: int = typer.Option(1000, "--ci", help="Bootstrap resamples of the 95% intervals (0: none)."),
    by_group: bool | None = typer.Option(
        None,
        "--by-group/--no-by-group",
        help="Per-patient metrics too (default: when data.split.group_by is set).",
    ),
    calibrated: bool = typer.Option(
        False, "--calibrated", help="Apply the temperature the run fitted on its validation split."
    ),
    ema: bool | None = _ema_option(),
    tta: bool = typer.Option(
        False, "--tta", help="Average the prediction with the horizontally flipped image."
    ),
    device: str = _device_option(),
    batch_size: int = typer.Option(64, "--batch-size", "-b", help="Images per batch."),
    workers: int | None = typer.Option(None, "--workers", help="Data loader processes (default: by device)."),
) -> None:
    """Metrics of a checkpoint with 95% bootstrap intervals: accuracy, balanced accuracy, macro-F1,
    ROC-AUC, per-class P/R/F1, confusion matrix; per patient; operating points; calibration."""
    from semodel.evaluate import EvalOptions, EvalOutputs, eval_from_cli

    options = EvalOptions(split, device, batch_size, ema, tta, workers, False, ci, by_group, calibrated)
    eval_from_cli(checkpoint, data, options, EvalOutputs(output, plot, predictions, worst))


@app.command("inspect")
def inspect_cmd(
    checkpoint: Path = typer.Argument(..., help="A checkpoint (best.pt / last.pt) written by semodel train."),
    data: Path = typer.Option(..., "--data", help="An ImageFolder with the checkpoint's class names."),
    out: Path = typer.Option(
        ..., "--out", "--output", "-o", help="Folder for the PNG figures and inspect.json."
    ),
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
    ema: bool | None = _ema_option(),
    device: str = _device_option(),
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
        None, "--checkpoint", help="Checkpoint to use (default: the newest best.pt under ./runs)."
    ),
    topk: int | None = typer.Option(
        None, "--topk", "-k", help="Classes per image (default: min(3, classes))."
    ),
    fmt: str = typer.Option("table", "--format", "-f", help="table, json or csv (one row per image)."),
    batch_size: int = typer.Option(32, "--batch-size", "-b", help="Images per batch."),
    device: str = _device_option(),
    cam: Path | None = typer.Option(
        None, "--cam", help="Write a Grad-CAM overlay PNG per image (predicted class) to this folder."
    ),
    ema: bool | None = _ema_option(),
    threshold: str | None = typer.Option(
        None,
        "--threshold",
        help="Two classes: add a decision column at 'val' (the run's threshold) or a probability.",
    ),
    calibrated: bool = typer.Option(
        False, "--calibrated", help="Apply the temperature the run fitted on its validation split."
    ),
) -> None:
    """Top-k classes and probabilities per image; exit code 1 if any input could not be read.
    --checkpoint may be a cross-validation folder: the mean of its folds' best models."""
    from semodel.predict import PredictOptions, predict_from_cli

    options = PredictOptions(topk, fmt, batch_size, device, cam, ema, threshold, calibrated)
    code = predict_from_cli(images, checkpoint, options)
    if code:
        raise typer.Exit(code)


@app.command("export")
def export_cmd(
    checkpoint: Path = typer.Argument(..., help="A checkpoint written by semodel train."),
    fmt: str = typer.Option("onnx", "--format", "-f", help="onnx or torchscript."),
    output: Path | None = typer.Option(
        None, "--output", "-o", help="Output file (default: beside the checkpoint, .onnx / .torchscript.pt)."
    ),
    ema: bool | None = _ema_option(),
    atol: float = typer.Option(1e-4, "--atol", help="Largest allowed |exported - PyTorch| logit difference."),
    opset: int | None = typer.Option(None, "--opset", help="ONNX opset (default: the exporter's)."),
    calibrated: bool = typer.Option(
        False,
        "--calibrated",
        help="Divide the logits by the temperature the run fitted on its validation split.",
    ),
) -> None:
    """ONNX or TorchScript with class names and preprocessing inside, verified against PyTorch."""
    from semodel.export import ExportOptions, export_from_cli

    export_from_cli(checkpoint, ExportOptions(fmt, output, ema, atol, opset, calibrated))


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
