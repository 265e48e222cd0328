"""``semodel cv``: K-fold cross-validation, stratified by class, grouped (no patient in two folds).

What it leaves in ``runs/<name>/``::

    config.yaml        the resolved config (cv.folds included)
    folds.csv          fold, class, group, path of every image of data.root: made once, reused
    fold-<k>/          a normal run (config.yaml, split.csv, TensorBoard, best.pt, last.pt,
                       metrics.json) plus test_metrics.json: the chosen weights on the fold's images
    cv.json            per fold, and mean and sample std: accuracy, balanced accuracy, macro-F1, ROC-AUC

Fold k's test set is the groups of fold k. The other groups are split again (grouped,
stratified, ``data.split.val``) into train and val, so that the best-epoch choice and early
stopping never see the test fold. With ``cv.augmented`` (a folder of augmented copies named
``<original stem>_<suffix>``) the folds train and validate on the copies of their images and
test on the originals; a copy always goes where its original goes.

Resume: running the same command again (or ``semodel cv --resume runs/<name>``) skips the folds
that have test_metrics.json, tests a fold that finished training, continues a fold from its
last.pt, and starts the others.
"""

from __future__ import annotations

import random
import re
import shutil
import statistics
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from semodel.analysis import prediction_rows, write_predictions
from semodel.checkpoint import load_resumable
from semodel.config import (
    Config,
    apply_overrides,
    config_from_dict,
    load_config,
    read_yaml,
    validate,
    write_yaml,
)
from semodel.data import (
    Dataset,
    Sample,
    assign_splits,
    check_group_pattern,
    group_of,
    has_presplit,
    majority_label,
    make_synthetic_if_missing,
    merged_groups,
    read_sample_csv,
    report_bad_files,
    scan_dataset,
    write_sample_csv,
)
from semodel.data.prepare import copies_kept_together, count_copies
from semodel.errors import Interrupted, SemodelError
from semodel.files import numbered, read_json, run_name, write_json, write_text_atomic
from semodel.runlog import log_line, quiet
from semodel.tables import align, metric

Log = Callable[[str], None]

# (key in the metrics, column title) of what cv.json and the table report per fold
METRICS = (
    ("acc", "accuracy"),
    ("balanced_acc", "balanced acc"),
    ("f1_macro", "macro-F1"),
    ("auc", "ROC-AUC"),
)

# Keys that say how to run, not what: they may change when a cross-validation continues.
# (cv.weights: the finished folds are then tested again with the other weights, not retrained.)
CHANGEABLE = ("cv.weights", "train.device", "data.num_workers")


# ----------------------------------------------------------------------------- folds


def make_folds(samples: list[Sample], classes: list[str], k: int, seed: int, why: str) -> dict[str, int]:
    """Group -> fold (1..k), stratified by class; every ``Sample.group`` must be set.

    A group belongs to the class most of its images have. Per class, its groups (largest
    first; equal sizes in a seeded random order) each go to the fold that holds the fewest
    images of that class so far (ties: the fewest images in all, then a seeded random order).
    ``why`` says what the groups are, for the error when a class has fewer groups than folds.
    """
    members: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        members[s.group].append(s)
    by_class: dict[int, list[str]] = defaultdict(list)
    for group, files in sorted(members.items()):
        by_class[majority_label(files)].append(group)
    for label, name in enumerate(classes):
        n = len(by_class[label])
        if n < k:
            raise SemodelError(
                f"class '{name}' has {n} group(s) ({why}) but {k} folds were asked for: every fold's "
                f"test set needs each class; use --folds {n} or fewer"
                if n >= 2
                else f"class '{name}' has {n} group(s) ({why}): cross-validation needs at least 2 per class"
            )
    rng = random.Random(seed)
    fold_of: dict[str, int] = {}
    total = [0] * k
    for label in range(len(classes)):
        groups = by_class[label]
        rng.shuffle(groups)
        groups.sort(key=lambda g: -len(members[g]))  # stable: equal sizes keep the random order
        order = list(range(k))
        rng.shuffle(order)
        in_class = [0] * k
        for group in groups:
            fold = min(range(k), key=lambda f: (in_class[f], total[f], order.index(f)))
            fold_of[group] = fold + 1
            in_class[fold] += len(members[group])
            total[fold] += len(members[group])
    return fold_of


def write_folds_csv(path: Path, assigned: list[tuple[int, Sample]], classes: list[str]) -> None:
    write_sample_csv(path, "fold", assigned, classes)


def read_folds_csv(path: Path, classes: list[str], k: int) -> list[tuple[int, Sample]]:
    assigned = []
    for fold_text, s in read_sample_csv(path, "fold", classes):
        try:
            fold = int(fold_text)
        except ValueError:
            raise SemodelError(f"{path}: fold {fold_text!r} of {s.path} is not a number") from None
        if not 1 <= fold <= k:
            raise SemodelError(f"{path}: fold {fold} of {s.path} is not in 1..{k}")
        assigned.append((fold, s))
    return assigned


# ----------------------------------------------------------------------------- augmented copies


def match_copies(
    originals: list[Sample], copies: Dataset, classes: list[str], root: Path
) -> dict[str, list[Sample]]:
    """Original path -> its augmented copies: the files of the same class folder named
    ``<original stem>_<anything>`` (the longest such original wins) or ``<original stem>``."""
    if copies.classes != classes:
        raise SemodelError(
            f"cv.augmented {copies.root}: class folders ({', '.join(copies.classes)}) differ from "
            f"data.root {root} ({', '.join(classes)})"
        )
    by_stem: dict[tuple[int, str], Sample] = {}
    for s in originals:
        key = (s.label, Path(s.path).stem)
        if key in by_stem:
            raise SemodelError(
                f"{root}: {by_stem[key].path} and {s.path} have the same name stem: their augmented "
                "copies cannot be told apart"
            )
        by_stem[key] = s
    out: dict[str, list[Sample]] = defaultdict(list)
    orphans = []
    for copy in copies.samples:
        stem = Path(copy.path).stem
        prefixes = [stem] + [stem[:i] for i in range(len(stem) - 1, 0, -1) if stem[i] == "_"]
        original = next((by_stem[(copy.label, p)] for p in prefixes if (copy.label, p) in by_stem), None)
        if original is None:
            orphans.append(copy.path)
            continue
        out[original.path].append(Sample(copy.path, copy.label, "", original.group))
    if orphans:
        raise SemodelError(
            f"cv.augmented {copies.root}: {len(orphans)} of {len(copies.samples)} file(s) have no original "
            f"in {root} (a copy is named <original stem>_<suffix> and sits in its original's class folder), "
            f"e.g. {orphans[0]}"
        )
    return out


# ----------------------------------------------------------------------------- one fold


def fold_samples(
    fold: int,
    assigned: list[tuple[int, Sample]],
    copies: dict[str, list[Sample]] | None,
    cfg: Config,
    classes: list[str],
) -> tuple[list[Sample], list[Sample]]:
    """(what the fold's run trains on, with its split, for split.csv; the fold's test images).

    The groups outside the fold are split into train and val like a run splits its data (grouped,
    stratified, data.split.val and seed). With copies, the run gets the copies of the train and
    val images (in their original's split) and nothing of the test fold.
    """
    test = [Sample(s.path, s.label, "test", s.group) for f, s in assigned if f == fold]
    rest = [Sample(s.path, s.label, "", s.group) for f, s in assigned if f != fold]
    sp = cfg.data.split
    assign_splits(rest, len(classes), sp.val, 0.0, sp.seed, sp.group_by)
    if copies is None:
        run = rest + test
    else:
        run = [Sample(c.path, c.label, s.split, s.group) for s in rest for c in copies.get(s.path, [])]
    run.sort(key=lambda s: (s.label, s.path))
    return run, test


def fold_config(cfg: Config, cv_dir: Path, fold: int) -> Config:
    """The cross-validation's config as fold ``fold``'s run: in the cv folder, named fold-<k>."""
    raw = cfg.to_dict()
    raw["log"].update(out_dir=str(cv_dir), name=f"fold-{fold}")
    if cfg.cv.augmented:
        raw["data"].update(root=cfg.cv.augmented, synthetic=None)
    return config_from_dict(raw, str(cv_dir / "config.yaml"))


def weights_of(choice: str, ema_trained: bool) -> tuple[str, bool]:
    """cv.weights -> (checkpoint file, EMA weights?). ``best``: the weights validation scored
    (EMA when train.ema), as the run's own test in metrics.json; ``last``: the final plain weights;
    ``ema``: the final EMA weights."""
    if choice == "best":
        return "best.pt", ema_trained
    return "last.pt", choice == "ema"


@dataclass
class CrossValidation:
    """One cross-validation: its config and folder, the images with their folds, how to report."""

    cfg: Config
    cv_dir: Path
    root: Path
    classes: list[str]
    assigned: list[tuple[int, Sample]]  # (fold, image) for every image of data.root
    copies: dict[str, list[Sample]] | None  # cv.augmented: original path -> its copies
    quiet: bool = False
    log: Log = log_line


def train_fold(cv: CrossValidation, fold: int, run_samples: list[Sample]) -> None:
    from semodel.train import Resume, fit

    fold_dir = cv.cv_dir / f"fold-{fold}"
    fold_cfg = fold_config(cv.cfg, cv.cv_dir, fold)
    last = fold_dir / "last.pt"
    try:
        if last.exists():
            try:
                resume = Resume(last, load_resumable(last))
            except SemodelError as e:
                raise SemodelError(f"{e}; delete {fold_dir} to train fold {fold} again") from None
            fit(fold_cfg, resume=resume, quiet=cv.quiet, log=cv.log)
        else:
            if fold_dir.exists():
                shutil.rmtree(fold_dir)  # started, but no epoch finished: start it again
            fit(fold_cfg, quiet=cv.quiet, log=cv.log, split=run_samples)
    except SemodelError as e:
        raise SemodelError(f"fold {fold}: {e}") from None
    except Interrupted:  # Ctrl-C: fit saved last.pt
        cv.log(f"continue the cross-validation with: semodel cv --resume {cv.cv_dir}")
        raise


def evaluate_fold(cv: CrossValidation, fold: int, test: list[Sample]) -> dict[str, Any]:
    """The chosen weights of the fold's run on the fold's test images (semodel eval's code)."""
    from semodel.evaluate import EvalOptions, EvalSet, evaluate_checkpoint

    cfg = cv.cfg
    file, use_ema = weights_of(cfg.cv.weights, cfg.train.ema)
    images = EvalSet(cv.root, test, "test", f"fold {fold} of {cv.cv_dir / 'folds.csv'}")
    workers = cfg.data.num_workers if isinstance(cfg.data.num_workers, int) else None
    options = EvalOptions(
        device=cfg.train.device, batch_size=cfg.data.batch_size * 2, use_ema=use_ema, workers=workers
    )
    try:
        result = evaluate_checkpoint(
            cv.cv_dir / f"fold-{fold}" / file, options=options, images=images, log=quiet
        )
    except SemodelError as e:
        raise SemodelError(f"fold {fold}: {e}") from None
    rows = prediction_rows(result.images.samples, result.report["classes"], result.probs, result.groups)
    write_predictions(cv.cv_dir / f"fold-{fold}" / "test_predictions.csv", rows)
    return {"fold": fold, "choice": cfg.cv.weights, **result.report}


def run_fold(cv: CrossValidation, fold: int) -> dict[str, Any]:
    """Train (or continue) fold ``fold`` and test it, unless that was done earlier; its test report."""
    k, choice, log = cv.cfg.cv.folds, cv.cfg.cv.weights, cv.log
    fold_dir = cv.cv_dir / f"fold-{fold}"
    result_file = fold_dir / "test_metrics.json"
    run_samples, test = fold_samples(fold, cv.assigned, cv.copies, cv.cfg, cv.classes)
    if result_file.exists():
        done = read_fold_result(result_file)
        if done.get("choice") == choice:
            log(f"fold {fold}/{k}: finished earlier ({result_file}); skipped")
            return done
        log(
            f"fold {fold}/{k}: trained earlier; testing its {choice} weights "
            f"(it was tested with {done.get('choice')})"
        )
    elif (fold_dir / "metrics.json").exists():
        log(f"fold {fold}/{k}: trained earlier; testing it")
    else:
        log(fold_plan(cv, fold, run_samples, test))
        train_fold(cv, fold, run_samples)
    report = evaluate_fold(cv, fold, test)
    write_json(result_file, report)
    m = report["metrics"]
    log(
        f"fold {fold}/{k} done: "
        + "  ".join(f"{title} {metric(m.get(key))}" for key, title in METRICS)
        + f"  ({_weights_label(report)}, epoch {report['epoch']}, {m['n']} test images)"
    )
    return report


def fold_plan(cv: CrossValidation, fold: int, run_samples: list[Sample], test: list[Sample]) -> str:
    """The line that says what fold ``fold`` trains, validates and tests on."""
    fold_dir = cv.cv_dir / f"fold-{fold}"
    counts = Counter(s.split for s in run_samples)
    groups = {name: len({s.group for s in run_samples if s.split == name}) for name in ("train", "val")}
    what = "copies" if cv.copies is not None else "images"
    state = "continuing from last.pt" if (fold_dir / "last.pt").exists() else "training"
    return (
        f"fold {fold}/{cv.cfg.cv.folds}: {state}: train {counts['train']} / val {counts['val']} {what} "
        f"({groups['train']} / {groups['val']} groups), test {len(test)} images "
        f"({len({s.group for s in test})} groups) -> {fold_dir}"
    )


def read_fold_result(path: Path) -> dict[str, Any]:
    try:
        return read_json(path)
    except SemodelError as e:
        raise SemodelError(f"{e}; delete it to test that fold again") from None


# ----------------------------------------------------------------------------- summary


def _weights_label(report: dict[str, Any]) -> str:
    return Path(report["checkpoint"]).name + (" ema" if report["weights"] == "ema" else "")


def summarize(cfg: Config, reports: list[dict[str, Any]]) -> dict[str, Any]:
    """cv.json: the folds, and per metric the mean and the sample standard deviation (n - 1)."""
    folds = []
    for r in reports:
        m = r["metrics"]
        folds.append(
            {
                "fold": r["fold"],
                "weights": r["choice"],
                "checkpoint": r["checkpoint"],
                "ema": r["weights"] == "ema",
                "epoch": r["epoch"],
                "n": m["n"],
                **{key: m.get(key) for key, _ in METRICS},
            }
        )
    mean, std = {}, {}
    for key, _ in METRICS:
        values = [f[key] for f in folds if f[key] is not None]
        mean[key] = statistics.fmean(values) if values else None
        std[key] = statistics.stdev(values) if len(values) >= 2 else None
    return {
        "folds": cfg.cv.folds,
        "weights": cfg.cv.weights,
        "data": cfg.data.root,
        "augmented": cfg.cv.augmented,
        "group_by": cfg.data.split.group_by,
        "n": sum(f["n"] for f in folds),
        "per_fold": folds,
        "mean": mean,
        "std": std,
        "std_ddof": 1,
    }


def format_summary(summary: dict[str, Any]) -> list[str]:
    titles = [title for _, title in METRICS]
    rows = [["fold", "images", *titles, "weights", "epoch"]]
    for f in summary["per_fold"]:
        label = Path(f["checkpoint"]).name + (" ema" if f["ema"] else "")
        values = [metric(f[key]) for key, _ in METRICS]
        rows.append([str(f["fold"]), str(f["n"]), *values, label, str(f["epoch"])])
    spread = [f"{metric(summary['mean'][key])} +- {metric(summary['std'][key])}" for key, _ in METRICS]
    rows.append(["mean +- std", str(summary["n"]), *spread, "", ""])
    folds = len(summary["per_fold"])
    note = f"(std: the sample standard deviation over the {folds} folds, n - 1 in the denominator)"
    return align(rows) + [note]


# ----------------------------------------------------------------------------- the cross-validation


def is_cv_dir(folder: Path) -> bool:
    return (folder / "folds.csv").is_file() and (folder / "config.yaml").is_file()


def stored_config(cv_dir: Path) -> Config:
    return validate(read_yaml(cv_dir / "config.yaml"), str(cv_dir / "config.yaml"))


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def differences(a: Config, b: Config) -> list[str]:
    """The dotted keys whose values differ between two configs."""
    fa, fb = _flat(a.to_dict()), _flat(b.to_dict())
    return [key for key in sorted(set(fa) | set(fb)) if fa.get(key) != fb.get(key)]


def find_cv_dir(cfg: Config, config_path: Path | None, log: Log) -> Path:
    """runs/<name>: the first of <name>, <name>-2, ... that holds this cross-validation (to continue
    it) or does not exist yet. A folder with another run or another config is left alone."""
    base = Path(cfg.log.out_dir).expanduser()
    for candidate in numbered(base, run_name(cfg.log.name, config_path, "cv")):
        if not candidate.exists():
            return candidate
        if is_cv_dir(candidate):
            changed = [key for key in differences(stored_config(candidate), cfg) if key not in CHANGEABLE]
            if not changed:
                return candidate
            shown = ", ".join(changed[:4]) + (f" (+{len(changed) - 4} more)" if len(changed) > 4 else "")
            log(
                f"note: {candidate} holds a cross-validation with another config (differs in {shown}); "
                "not continued"
            )
    raise AssertionError("unreachable")  # numbered() never ends


def check_inputs(cfg: Config) -> None:
    """What the config must allow before anything is written."""
    if cfg.cv.weights == "ema" and not cfg.train.ema:
        raise SemodelError(
            "cv.weights = 'ema' needs train.ema: true (EMA weights are kept only when "
            "training averages them); use cv.weights best or last"
        )
    for what, folder in (("data.root", cfg.data.root), ("cv.augmented", cfg.cv.augmented)):
        if folder is not None and has_presplit(Path(folder).expanduser()):
            raise SemodelError(
                f"{what} {folder} has train/ and val/ folders (a fixed split), but cross-validation makes "
                f"its own folds: point {what} at a folder of class folders (<class>/<images>)"
            )
    if cfg.cv.augmented is not None and not Path(cfg.cv.augmented).expanduser().is_dir():
        raise SemodelError(f"cv.augmented folder not found: {cfg.cv.augmented}")


def group_note(samples: list[Sample], cfg: Config, augmented: bool) -> str | None:
    group_by = cfg.data.split.group_by
    if group_by is None:
        unit = "each image of data.root (with its augmented copies)" if augmented else "each image"
        return (
            f"note: data.split.group_by is not set, so {unit} is its own group; images of one patient or "
            "object can land in different folds (set group_by to a regex whose first group names it)"
        )
    return check_group_pattern(samples, group_by)


def load_folds(cfg: Config, cv_dir: Path, log: Log) -> tuple[Path, list[str], list[tuple[int, Sample]], bool]:
    """(data root, classes, (fold, sample) per image): read from folds.csv, or made now."""
    root = Path(cfg.data.root).expanduser()
    k = cfg.cv.folds
    folds_file = cv_dir / "folds.csv"
    if folds_file.is_file():
        data = scan_dataset(root, check=False, exclude=[cfg.log.out_dir])
        assigned = read_folds_csv(folds_file, data.classes, k)
        stored_k = max(f for f, _ in assigned) if assigned else 0
        if stored_k != k:
            raise SemodelError(
                f"{cv_dir} was split into {stored_k} folds (folds.csv); it cannot continue "
                f"with {k}: start a new cross-validation (another log.name) for {k} folds"
            )
        gone = [s.path for _, s in assigned if not (root / s.path).is_file()]
        if gone:
            log(
                f"warning: {len(gone)} file(s) of {folds_file} are gone from {root} (first: {gone[0]}); "
                "they are skipped"
            )
            assigned = [(f, s) for f, s in assigned if (root / s.path).is_file()]
        listed = {s.path for _, s in assigned} | set(gone)
        new = [s.path for s in data.samples if s.path not in listed]
        if new:
            log(
                f"warning: {len(new)} image(s) of {root} are not in {folds_file} (added after the folds were "
                f"made, first: {new[0]}); they are left out"
            )
        return root, data.classes, assigned, True
    data = scan_dataset(root, exclude=[cfg.log.out_dir])
    report_bad_files(data, log)
    check_group_pattern(data.samples, cfg.data.split.group_by)  # matching no file: an error, before any fold
    pattern = re.compile(cfg.data.split.group_by) if cfg.data.split.group_by else None
    for s in data.samples:
        s.group = group_of(s.path, pattern)
    why = (
        f"groups by data.split.group_by {cfg.data.split.group_by!r}"
        if pattern is not None
        else "each image is its own group: data.split.group_by is not set"
    )
    units = copies_as_groups(cfg, data, log)  # copies of one photo: one fold
    fold_of = make_folds(units, data.classes, k, cfg.data.split.seed, why)
    assigned = [(fold_of[u.group], s) for u, s in zip(units, data.samples, strict=True)]
    return root, data.classes, assigned, False


def copies_as_groups(cfg: Config, data: Dataset, log: Log) -> list[Sample]:
    """The samples with their groups merged where copies of one photo (semodel.data.duplicates)
    link them, so that the folds keep each cluster together (``data.split.duplicates: group``)."""
    kept = []
    if data.index is not None:
        count_copies(data)
        kept = copies_kept_together(cfg, data, data.samples, log, unit="fold")
    unit = merged_groups(data.samples, kept)
    return [Sample(s.path, s.label, "", unit.get(s.group, s.group)) for s in data.samples]


def cross_validate(cfg: Config, cv_dir: Path, quiet: bool = False, log: Log | None = None) -> dict[str, Any]:
    """Run (or continue) the cross-validation of ``cfg`` in ``cv_dir``; returns cv.json's content."""
    log = log or log_line
    check_inputs(cfg)
    make_synthetic_if_missing(cfg, log)
    root, classes, assigned, existing = load_folds(cfg, cv_dir, log)
    copies = None
    if cfg.cv.augmented is not None:
        augmented = scan_dataset(Path(cfg.cv.augmented).expanduser(), check=False)
        copies = match_copies([s for _, s in assigned], augmented, classes, root)
    cv = CrossValidation(cfg, cv_dir, root, classes, assigned, copies, quiet, log)
    describe(cv, existing)
    if not existing:
        cv_dir.mkdir(parents=True, exist_ok=True)
        write_folds_csv(cv_dir / "folds.csv", assigned, classes)
    write_yaml(cfg, cv_dir / "config.yaml")  # after folds.csv: a folder with both is a cross-validation

    reports = [run_fold(cv, fold) for fold in range(1, cfg.cv.folds + 1)]
    summary = summarize(cfg, reports)
    write_json(cv_dir / "cv.json", summary)
    for line in format_summary(summary):
        log(line)
    log(f"wrote {cv_dir / 'cv.json'}")
    if cfg.log.report:
        cv_report(cv_dir, log=log)
    return summary


def describe(cv: CrossValidation, existing: bool) -> None:
    """The notes and the plan of a cross-validation, before its first fold."""
    cfg, assigned, copies, log = cv.cfg, cv.assigned, cv.copies, cv.log
    note = group_note([s for _, s in assigned], cfg, copies is not None)
    if note:
        log(note)
    if cfg.data.split.test > 0:
        log(f"note: data.split.test ({cfg.data.split.test:g}) is not used: each fold is in turn the test set")
    if copies is not None:
        without = sum(1 for _, s in assigned if not copies.get(s.path))
        log(
            f"augmented: {sum(len(c) for c in copies.values())} copies in {cfg.cv.augmented} of "
            f"{len(assigned) - without} of the {len(assigned)} images; the folds train and validate on the "
            "copies and test on the originals"
            + (f" ({without} image(s) without a copy are only tested)" if without else "")
        )
    k = cfg.cv.folds
    sizes = Counter(f for f, _ in assigned)
    groups = len({s.group for _, s in assigned})
    per_fold = " / ".join(str(sizes[f]) for f in range(1, k + 1))
    log(
        f"cross-validation: {k} folds of {cv.root} ({len(assigned)} images, {groups} groups; test images per "
        f"fold {per_fold}), weights: {cfg.cv.weights} -> {cv.cv_dir}" + (" (continuing)" if existing else "")
    )


def resume_dir(path: Path) -> Path:
    """The cross-validation folder that ``--resume PATH`` names (the folder, or a file in it)."""
    folder = path if path.is_dir() else path.parent
    if is_cv_dir(folder):
        return folder
    if is_cv_dir(folder.parent):
        raise SemodelError(
            f"--resume {path}: that is one fold; continue the cross-validation with --resume {folder.parent}"
        )
    if not path.exists():
        raise SemodelError(f"--resume {path}: not found")
    raise SemodelError(f"--resume {path}: not a cross-validation folder (no folds.csv and config.yaml in it)")


def cv_from_cli(
    config_path: Path | None,
    folds: int | None,
    overrides: list[str],
    resume: Path | None,
    quiet: bool,
    log: Log | None = None,
) -> dict[str, Any]:
    log = log or log_line
    if folds is not None and folds < 2:
        raise SemodelError(f"--folds {folds}: cross-validation needs at least 2 folds")
    if resume is not None:
        cv_dir = resume_dir(Path(resume))
        stored = stored_config(cv_dir)
        source = str(cv_dir / "config.yaml") + (f" (with --set {' '.join(overrides)})" if overrides else "")
        cfg = config_from_dict(apply_overrides(stored.to_dict(), list(overrides)), source)
        changed = [key for key in differences(stored, cfg) if key not in CHANGEABLE]
        if changed:
            raise SemodelError(
                f"--resume continues {cv_dir} as it was configured; only "
                f"{', '.join(CHANGEABLE)} may change (not {', '.join(changed)}); start a new "
                "cross-validation for that"
            )
        if folds is not None and folds != stored.cv.folds:
            raise SemodelError(
                f"--folds {folds}: {cv_dir} was split into {stored.cv.folds} folds; start a "
                "new cross-validation (another log.name) for another number"
            )
        if config_path is not None:
            log(f"note: --resume continues with the config stored in {cv_dir}; {config_path} is not read")
    else:
        cfg = load_config(config_path, overrides)
        if folds is not None:
            raw = cfg.to_dict()
            raw["cv"]["folds"] = folds
            cfg = config_from_dict(raw, f"{config_path} (with --folds {folds})")
        cv_dir = find_cv_dir(cfg, config_path, log)
    return cross_validate(cfg, cv_dir, quiet, log)


# ----------------------------------------------------------------------------- the report


def fold_predictions(cv_dir: Path, classes: list[str], k: int):
    """Every fold's test predictions (fold-<k>/test_predictions.csv), tested again where missing."""
    from semodel.analysis import read_predictions

    missing = [f for f in range(1, k + 1) if not (cv_dir / f"fold-{f}" / "test_predictions.csv").is_file()]
    if missing:
        cfg = stored_config(cv_dir)
        root, _, assigned, _ = load_folds(cfg, cv_dir, quiet)
        copies = None  # the test images are always the originals
        cv = CrossValidation(cfg, cv_dir, root, classes, assigned, copies, True, quiet)
        for fold in missing:
            if not (cv_dir / f"fold-{fold}" / "best.pt").is_file():
                raise SemodelError(
                    f"{cv_dir}: fold {fold} has no checkpoint (continue with semodel cv --resume {cv_dir})"
                )
            evaluate_fold(cv, fold, fold_samples(fold, assigned, None, cfg, classes)[1])
    return [read_predictions(cv_dir / f"fold-{f}" / "test_predictions.csv", classes) for f in range(1, k + 1)]


def cv_report(cv_dir: Path, options: dict[str, Any] | None = None, log: Log = log_line) -> Path:
    """report.html of a cross-validation: the per-fold table, mean +- std, and the pooled out-of-fold
    predictions (oof_predictions.csv) with their intervals, image- and patient-level."""
    import torch

    from semodel.analysis import analyse, groups_of
    from semodel.evalsets import EvalSet
    from semodel.metrics import classification_metrics
    from semodel.plots import save_eval_plots
    from semodel.report import ReportOptions, Results, cv_page

    o = ReportOptions(**(options or {}))
    cfg = stored_config(cv_dir)
    if not (cv_dir / "cv.json").is_file():
        raise SemodelError(
            f"{cv_dir}: no cv.json yet (an unfinished cross-validation: continue it with "
            f"semodel cv --resume {cv_dir})"
        )
    summary = read_json(cv_dir / "cv.json")
    classes = scan_dataset(Path(cfg.data.root).expanduser(), check=False).classes
    folds = fold_predictions(cv_dir, classes, cfg.cv.folds)
    samples = [s for fold_samples_, _, _ in folds for s in fold_samples_]
    probs = torch.cat([p for _, p, _ in folds])
    targets = torch.tensor([s.label for s in samples])
    groups = groups_of(samples, cfg.data.split.group_by)
    write_predictions(cv_dir / "oof_predictions.csv", prediction_rows(samples, classes, probs, groups))
    metrics = classification_metrics(probs, targets, classes)
    pooled = Results(EvalSet(Path(cfg.data.root), samples, "oof", "pooled"), probs, targets, groups, metrics,
                     analyse(probs, targets, classes, groups, None, o.resamples, o.seed))  # fmt: skip
    per_fold = [
        analyse(
            p,
            torch.tensor([s.label for s in f]),
            classes,
            groups_of(f, cfg.data.split.group_by),
            None,
            o.resamples,
            o.seed,
        )
        for f, p, _ in folds
    ]
    figures = save_eval_plots(cv_dir, metrics["confusion_matrix"], probs, targets, classes)
    path = write_text_atomic(
        cv_dir / "report.html", cv_page(cv_dir, cfg.to_dict(), summary, pooled, per_fold)
    )
    log(f"report: {path} (and oof_predictions.csv, {', '.join(p.name for p in figures)})")
    return path
