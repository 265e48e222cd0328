"""The experiment schema: one YAML file, validated, with dotted ``--set`` overrides.

Unknown keys are errors (with the closest valid key), wrong types and out-of-range values are
errors naming the key, the value and what is allowed; every error names the file it came from.
"""

from __future__ import annotations

import difflib
import re
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from semodel.errors import SemodelError, first_line, short_repr
from semodel.files import write_text_atomic
from semodel.models import MODEL_NAMES

ModelName = Literal[MODEL_NAMES]  # type: ignore[valid-type]
Placement = Literal["layer", "block", "final", "none"]


class Section(BaseModel):
    # No inf or nan anywhere (YAML reads `.inf` and `.nan` as floats): `lr: .inf` passes `gt=0`.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class LearnedWidthConfig(Section):
    """SE with ``reduction: learned``: start wide, gate every hidden unit, penalise open gates."""

    start_reduction: float = Field(
        4.0, gt=0, description="every SE block starts with channels / this hidden units"
    )
    penalty: float = Field(
        0.05,
        ge=0,
        description="weight of the sparsity loss: the fraction of the wide SE parameters still open",
    )
    gate_lr_scale: float = Field(10.0, gt=0, description="the unit gates learn at optim.lr x this")


class ModelConfig(Section):
    name: ModelName = Field(
        "se_resnet18",
        description="the backbone: se_resnet18/34/50/101/152, se_densenet121/169/201 (semodel models)",
    )
    attention: Literal["se", "eca", "none"] = Field(
        "se", description="channel attention in every block: se, eca or none (the plain backbone)"
    )
    reduction: float | Literal["learned"] = Field(
        16.0, description="SE reduction ratio r (hidden width = channels / r), or 'learned'"
    )
    learned: LearnedWidthConfig = Field(
        LearnedWidthConfig(), description="the learned-width SE (used only with reduction: learned)"
    )
    min_channels: int = Field(1, ge=1, description="floor on the SE hidden width")
    bias: bool = Field(True, description="biases in the SE block's two FC layers (as in the paper)")
    gate: Literal["sigmoid", "hard_sigmoid"] = Field(
        "sigmoid", description="SE gate: sigmoid, or hard_sigmoid (MobileNetV3 style, usually with r = 4)"
    )
    stem: Literal["imagenet", "cifar"] = Field(
        "imagenet",
        description="SE-ResNet stem: imagenet (7x7/2 conv + max-pool) or cifar (3x3/1 conv, no pool: "
        "32-64 px images)",
    )
    placement: Placement | list[Placement] = Field(
        "block", description="SE-DenseNet: where attention goes: layer, block, final, none, or a list"
    )
    drop_rate: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="dropout rate (SE-ResNet: before the classifier; SE-DenseNet: on new dense features)",
    )
    memory_efficient: bool = Field(
        False, description="SE-DenseNet: recompute the bottlenecks in the backward pass (less memory)"
    )
    pretrained: str | None = Field(
        None,
        description="'imagenet' (torchvision), 'timm:<name>[.<tag>]' (timm's SE weights) or a weights file",
    )
    num_classes: int | None = Field(
        None, ge=2, description="optional check: the data must have exactly this many classes"
    )

    @field_validator("reduction", mode="before")
    @classmethod
    def _reduction_number_or_learned(cls, value: Any) -> Any:
        if isinstance(value, str) and value != "learned":
            try:
                value = float(value)
            except ValueError:
                raise ValueError("must be a number > 0 or 'learned'") from None
        if isinstance(value, bool) or (isinstance(value, (int, float)) and value <= 0):
            raise ValueError("must be a number > 0 or 'learned'")
        return value


class SyntheticConfig(Section):
    """A generated ImageFolder of simple textures, written to data.root when it is missing."""

    classes: int = Field(
        3, ge=2, le=3, description="number of texture classes (2 or 3: checkers, spots, stripes)"
    )
    per_class: int = Field(100, ge=4, description="images per class")
    image_size: int = Field(64, ge=16, description="side of the generated JPEGs in pixels")
    seed: int = Field(0, description="random seed of the generator")


class SplitConfig(Section):
    val: float = Field(0.15, ge=0, lt=1, description="fraction of the images (of each class) for validation")
    test: float = Field(0.15, ge=0, lt=1, description="fraction for the test split (0: none)")
    seed: int = Field(0, description="random seed of the split (and of the fold order in semodel cv)")
    group_by: str | None = Field(
        None, description="regex over the file name; its first group (or whole match) is the group id"
    )
    duplicates: Literal["group", "ignore"] = Field(
        "group",
        description="group: exact and near copies of a photo (flipped, rotated) land in one split; "
        "ignore: the split does not look at copies",
    )

    @field_validator("group_by")
    @classmethod
    def _regex_compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as e:
                raise ValueError(f"not a valid regular expression ({e})") from None
        return value

    @model_validator(mode="after")
    def _fractions_leave_training_data(self) -> SplitConfig:
        if self.val + self.test >= 1:
            raise ValueError(
                f"val + test = {self.val + self.test:g} leaves nothing to train on (must be < 1)"
            )
        if self.val <= 0:
            raise ValueError("val must be > 0: the monitored metric needs a validation split")
        return self


class AugmentConfig(Section):
    scale: tuple[float, float] = Field((0.35, 1.0), description="random-resized-crop area range")
    hflip: float = Field(0.5, ge=0, le=1, description="probability of a horizontal flip")
    vflip: float = Field(0.0, ge=0, le=1, description="probability of a vertical flip")
    auto_augment: Literal["none", "trivial", "rand"] = Field(
        "none", description="none, trivial (TrivialAugmentWide) or rand (RandAugment)"
    )
    color_jitter: float = Field(
        0.0, ge=0, le=1, description="strength of brightness, contrast and saturation jitter (0 = off)"
    )
    random_erasing: float = Field(0.0, ge=0, le=1, description="probability of random erasing (0 = off)")

    @field_validator("scale")
    @classmethod
    def _scale_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not 0 < low <= high <= 1:
            raise ValueError(f"need 0 < low <= high <= 1, got {list(value)}")
        return value


class DataConfig(Section):
    root: str = Field(
        description="an ImageFolder: root/<class>/<image>, or root/{train,val[,test]}/<class>/..."
    )
    leakage: Literal["warn", "error", "ignore"] = Field(
        "warn",
        description="split folders whose images have copies across splits (test in train ...): warn, "
        "error (stop before training) or ignore",
    )
    conflicts: Literal["warn", "error"] = Field(
        "warn", description="copies of one photo in two class folders (a label conflict): warn or error"
    )
    synthetic: SyntheticConfig | None = Field(
        None, description="generate a synthetic ImageFolder into root when it does not exist (the demo)"
    )
    image_size: int = Field(
        224, ge=16, le=2048, description="training crop size and evaluation size in pixels"
    )
    crop_ratio: float = Field(
        0.875, ge=0.25, le=1, description="eval: resize to image_size / crop_ratio, then crop"
    )
    mean: tuple[float, float, float] = Field(
        (0.485, 0.456, 0.406), description="per-channel normalisation mean (RGB; ImageNet's)"
    )
    std: tuple[float, float, float] = Field(
        (0.229, 0.224, 0.225), description="per-channel normalisation std (RGB; ImageNet's)"
    )
    batch_size: int = Field(32, ge=1, description="images per batch, per process")
    num_workers: int | Literal["auto"] = Field(
        "auto", description="DataLoader worker processes, or auto (by the device and the CPU cores)"
    )
    cache: Literal["auto", "gpu", "ram", "none"] = Field(
        "auto",
        description="decode every image once and keep it (uint8) on the GPU or in RAM, training photos "
        "large enough for the smallest crop (auto: gpu, else ram, where it fits in a quarter of what is "
        "free, else none; none: decode every epoch in data.num_workers processes)",
    )
    balance: Literal["none", "sampler", "loss"] = Field(
        "none",
        description="class balancing: none, sampler (draw images weighted 1 / class size) or loss "
        "(class-weighted cross-entropy)",
    )
    mixup: float = Field(0.0, ge=0, description="mixup alpha (0 = off)")
    cutmix: float = Field(0.0, ge=0, description="cutmix alpha (0 = off)")
    split: SplitConfig = Field(
        SplitConfig(), description="how root is split when it has no split folders (train/ ...)"
    )
    augment: AugmentConfig = Field(AugmentConfig(), description="the training images' augmentation")

    @field_validator("num_workers")
    @classmethod
    def _workers(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 0:
            raise ValueError("must be >= 0 or 'auto'")
        return value

    @field_validator("std")
    @classmethod
    def _std_positive(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(value) <= 0:
            raise ValueError("every std must be > 0")
        return value


class OptimConfig(Section):
    name: Literal["sgd", "adamw"] = Field("adamw", description="optimizer: adamw or sgd")
    lr: float = Field(1e-3, gt=0, description="learning rate for batch_size x accum_steps (x processes)")
    weight_decay: float = Field(0.05, ge=0, description="not applied to norm and bias parameters")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    nesterov: bool = Field(True, description="SGD: Nesterov momentum")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW: the betas")
    backbone_lr_scale: float = Field(
        1.0,
        gt=0,
        le=1,
        description="the backbone (all but the classifier and attention layers) learns at lr x this",
    )


class ScheduleConfig(Section):
    name: Literal["cosine", "step", "constant"] = Field(
        "cosine", description="learning-rate schedule after the warm-up: cosine, step or constant"
    )
    warmup_epochs: float = Field(1.0, ge=0, description="linear warm-up from 1% of lr")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine ends at lr x this")
    step_size: int = Field(30, ge=1, description="step: epochs between decays")
    gamma: float = Field(0.1, gt=0, le=1, description="step: decay factor")


class FreezeConfig(Section):
    """Staged fine-tuning: for the first ``epochs`` epochs only the parts in ``train`` learn."""

    epochs: int = Field(0, ge=0, description="epochs with the rest of the model frozen (0: none)")
    train: list[Literal["head", "se"]] = Field(
        ["head"], description="what learns while frozen: the classifier (head), and the SE layers (se)"
    )


class TrainConfig(Section):
    epochs: int = Field(30, ge=1, description="number of epochs")
    freeze: FreezeConfig = Field(
        FreezeConfig(), description="staged fine-tuning: only some parts learn in the first epochs"
    )
    device: str = Field("auto", description="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
    amp: Literal["auto", "bf16", "fp16", "off"] = Field(
        "auto",
        description="mixed precision of the training step (validation and test score in fp32); auto: bf16 "
        "(else fp16) on a GPU, bf16 on a CPU that computes it natively (AVX512-BF16, AMX), else off",
    )
    channels_last: bool = Field(True, description="channels_last memory format for the model and the batches")
    compile: bool = Field(False, description="torch.compile the model")
    accum_steps: int = Field(1, ge=1, description="gradient accumulation: batches per optimizer step")
    clip_grad: float | None = Field(None, gt=0, description="max global grad norm")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="label smoothing of the cross-entropy loss")
    ema: bool = Field(
        False, description="keep an exponential moving average of the weights (validation and best.pt use it)"
    )
    ema_decay: float = Field(0.999, gt=0, lt=1, description="EMA decay per optimizer step")
    monitor: Literal["val_acc", "val_loss", "val_f1", "val_balanced_acc"] = Field(
        "val_acc", description="the metric that picks best.pt and drives early stopping"
    )
    patience: int | None = Field(None, ge=1, description="early stopping: epochs without improvement")
    seed: int = Field(0, description="seed of the initialisation, the shuffling and the augmentation")
    deterministic: bool = Field(
        False, description="deterministic algorithms (on CPU with num_workers: 0, bit-identical resumes)"
    )
    sync_bn: bool = Field(False, description="SyncBatchNorm across processes (CUDA only)")
    target_sensitivity: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="two classes: the operating threshold chosen on val reaches this sensitivity "
        "(default: Youden's J)",
    )

    @model_validator(mode="after")
    def _freeze_leaves_epochs(self) -> TrainConfig:
        if self.freeze.epochs >= self.epochs:
            raise ValueError(
                f"freeze.epochs ({self.freeze.epochs}) must be less than epochs ({self.epochs}): "
                "the whole model must train for at least one epoch"
            )
        return self

    @field_validator("amp", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare `off` (also `no`, `false`) as False: `amp: off` means "off".
        return "off" if value is False else value


class LogConfig(Section):
    out_dir: str = Field("runs", description="the folder that holds the run folders")
    name: str | None = Field(None, description="run folder name (default: the config file's name)")
    tensorboard: bool = Field(True, description="write TensorBoard events into the run folder")
    report: bool = Field(True, description="write the run report (report.html and its files) at the end")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z0-9._-]+", value):
            raise ValueError("use letters, digits, '.', '_' and '-' only")
        return value


class CVConfig(Section):
    """``semodel cv``: K-fold cross-validation, stratified by class, grouped by ``data.split.group_by``."""

    folds: int = Field(5, ge=2, description="number of folds K (--folds overrides)")
    weights: Literal["best", "last", "ema"] = Field(
        "best",
        description="what each fold is tested with: best (best.pt, the weights validation chose), "
        "last (last.pt, the final weights) or ema (last.pt's EMA weights; needs train.ema)",
    )
    augmented: str | None = Field(
        None,
        description="a folder of augmented copies of data.root's images, named <original stem>_<suffix>: "
        "folds train and validate on the copies of their images and test on the originals",
    )


class Config(Section):
    model: ModelConfig = Field(ModelConfig(), description="the network")
    data: DataConfig = Field(description="the images: where they are, how they are split, read and augmented")
    optim: OptimConfig = Field(OptimConfig(), description="the optimizer")
    schedule: ScheduleConfig = Field(ScheduleConfig(), description="the learning-rate schedule")
    train: TrainConfig = Field(TrainConfig(), description="the training loop")
    log: LogConfig = Field(LogConfig(), description="where and what a run writes")
    cv: CVConfig = Field(CVConfig(), description="semodel cv only: k-fold cross-validation")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of builtins (lists, not tuples) for YAML and checkpoints."""
        return _plain(self.model_dump(mode="python"))


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------- loading


def _section_keys(model: type[BaseModel], prefix: str = "") -> dict[str, list[str]]:
    """For every section path ('' for the top, 'data.split', ...) the list of its valid keys."""
    out = {prefix: list(model.model_fields)}
    for name, field in model.model_fields.items():
        for candidate in _section_types(field.annotation):
            out.update(_section_keys(candidate, f"{prefix}{name}."))
    return out


def _section_types(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [
        a for a in getattr(annotation, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)
    ]


SECTION_KEYS = _section_keys(Config)


def _format_error(error: dict[str, Any], source: str) -> str:
    # pydantic puts union branch names into loc ('int', 'literal[...]'); keep field names only.
    loc = [str(p) for p in error["loc"]]
    path = ".".join(p for p in loc if not p.startswith(("literal[", "function-")) and p not in _TYPE_TAGS)
    kind = error["type"]
    if kind == "extra_forbidden":
        parent, _, key = path.rpartition(".")
        valid = SECTION_KEYS.get(f"{parent}." if parent else "", [])
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
        hint = f"; did you mean '{parent + '.' if parent else ''}{close[0]}'?" if close else ""
        where = f"section '{parent}'" if parent else "the top level"
        return f"{source}: unknown key '{short_text(path)}'{hint} (valid keys in {where}: {', '.join(valid)})"
    if kind == "missing":
        return f"{source}: missing required key '{path}'"
    message = re.sub(r"^Value error, ", "", error["msg"])
    return f"{source}: {short_text(path)} = {short_repr(error.get('input'))}: {message}"


def short_text(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


_TYPE_TAGS = {"int", "float", "str", "bool", "list[literal['layer','block','final','none']]", "tuple"}


def validate(raw: dict[str, Any], source: str) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        # One error per key: with unions pydantic reports every branch; the first is clear enough.
        seen, lines = set(), []
        for err in errors:
            line = _format_error(err, source)
            key = line.split(":")[1] if ":" in line else line
            if key not in seen:
                seen.add(key)
                lines.append(line)
        raise SemodelError(
            "; ".join(lines[:3]) + (f" (+{len(lines) - 3} more)" if len(lines) > 3 else "")
        ) from None


MAX_CONFIG_BYTES = 1 << 20  # a real config is a few kB; this bounds parsing time and memory


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, first: int, second: int) -> None:
        super().__init__(f"key '{short_text(str(key))}' appears twice (lines {first} and {second})")


class StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping: YAML lets the second
    silently replace the first (a second ``optim:`` block would drop the first without a word)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` merges, which may repeat
                continue
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                if key in lines:
                    raise _DuplicateKey(key, lines[key], line)
                lines[key] = line
            except TypeError:  # an unhashable key: SafeLoader reports it below
                pass
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML config file; every way a file can fail is one SemodelError."""
    file = Path(path)
    if not file.exists():
        raise SemodelError(f"config file not found: {file}")
    if file.is_dir():
        raise SemodelError(f"config path is a folder, not a YAML file: {file}")
    size = file.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise SemodelError(
            f"{file}: {size:,} bytes is not a config file (at most {MAX_CONFIG_BYTES:,} bytes)"
        )
    try:
        raw = yaml.load(file.read_text(encoding="utf-8"), Loader=StrictLoader)  # a SafeLoader
    except _DuplicateKey as e:
        raise SemodelError(f"{file}: {e}; merge the two into one") from None
    except RecursionError:
        raise SemodelError(f"{file}: malformed YAML: nested too deeply") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or first_line(e)
        raise SemodelError(f"{file}: malformed YAML{where}: {problem}") from None
    except UnicodeDecodeError:
        raise SemodelError(f"{file}: not a text file (cannot decode as UTF-8)") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SemodelError(
            f"{file}: the top level must be a mapping of sections (model:, data:, ...), "
            f"found a {type(raw).__name__}"
        )
    return raw


_UNKNOWN = object()


def _schema_type(parts: list[str]) -> Any:
    """The annotation of the dotted key ``parts`` in the schema, or ``_UNKNOWN``."""
    annotation: Any = Config
    for part in parts:
        sections = _section_types(annotation)
        if not sections or part not in sections[0].model_fields:
            return _UNKNOWN
        annotation = sections[0].model_fields[part].annotation
    return annotation


def _takes_text(annotation: Any, text: str) -> bool:
    """Whether a field of this type takes ``text`` verbatim: a str field, or a Literal listing it."""
    if annotation is str:
        return True
    origin = get_origin(annotation)
    if origin is Literal:
        return text in get_args(annotation)
    if origin in (Union, types.UnionType):
        return any(_takes_text(a, text) for a in get_args(annotation))
    return False


_YAML_NULLS = ("~", "null", "Null", "NULL")


def _takes_none(annotation: Any) -> bool:
    return get_origin(annotation) in (Union, types.UnionType) and type(None) in get_args(annotation)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` strings; values are parsed as YAML (``0.1``, ``true``, ``[a, b]``), except
    that a string field takes the text as it is (``log.name=2024``, ``train.amp=off``)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise SemodelError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. optim.lr=0.01")
        parts = key.split(".")
        for depth in range(1, len(parts)):
            annotation = _schema_type(parts[:depth])
            if annotation is not _UNKNOWN and not _section_types(annotation):
                raise SemodelError(f"--set {item!r}: '{'.'.join(parts[:depth])}' is not a section")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        # A field that takes text gets the text when YAML reads something else: a number or bool
        # (2024, off), a list or null ('-', '---', '~'). Nothing, or null spelled out in a field
        # that may be null, is null.
        stripped, annotation = text.strip(), _schema_type(parts)
        null = not stripped or (stripped in _YAML_NULLS and _takes_none(annotation))
        if not isinstance(value, str) and not null and _takes_text(annotation, stripped):
            value = stripped
        node = raw
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                section = ".".join(parts[: depth + 1])
                raise SemodelError(f"--set {item!r}: '{section}' is not a section")
            node = child
        node[parts[-1]] = value
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    raw = read_yaml(path)
    overrides = list(overrides or [])
    source = str(path) + (f" (with --set {' '.join(overrides)})" if overrides else "")
    return validate(apply_overrides(raw, overrides), source)


@dataclass
class StartOptions:
    """``semodel train --data DIR [--model ...]``: a run started from a folder instead of a YAML file.

    Each option stands for one ``--set`` override (``START_KEYS``) on the schema's defaults or on
    the given config; an explicit ``--set`` of the same key wins.
    """

    data: str | Path | None = None
    model: str | None = None
    epochs: int | None = None
    image_size: int | None = None
    pretrained: str | None = None

    def overrides(self) -> list[str]:
        values = {key: getattr(self, option) for option, key in START_KEYS.items()}
        return [f"{key}={value}" for key, value in values.items() if value is not None]

    def flags(self) -> list[str]:
        """The options again, as command-line arguments (``--data photos --model se_resnet50``)."""
        out = []
        for option in START_KEYS:
            value = getattr(self, option)
            if value is not None:
                out += [f"--{option.replace('_', '-')}", str(value)]
        return out


# The option of ``semodel train`` -> the config key it sets.
START_KEYS = {
    "data": "data.root",
    "model": "model.name",
    "epochs": "train.epochs",
    "image_size": "data.image_size",
    "pretrained": "model.pretrained",
}


def folder_run_name(folder: str | Path) -> str:
    """A run name (``log.name``) from a data folder's name: ``photos/`` -> ``photos``."""
    name = Path(folder).expanduser().resolve().name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "run"


def config_from_options(
    config_path: str | Path | None, overrides: list[str], options: StartOptions
) -> Config:
    """The config of a new run: ``config_path`` (or the schema's defaults when None), then the
    options' overrides (``--data`` etc.), then ``overrides`` (``--set``). Without a config file the
    run is named after the data folder (``log.name``), unless ``--set log.name=...`` says otherwise."""
    if config_path is not None and not options.flags():
        return load_config(config_path, overrides)  # the plain --config run, worded as always
    raw = read_yaml(config_path) if config_path is not None else {}
    start = options.overrides()
    if config_path is None and options.data is not None:
        start.append(f"log.name={folder_run_name(options.data)}")
    given = [*options.flags(), *(a for o in overrides for a in ("--set", o))]
    source = str(config_path) if config_path is not None else "the command line"
    source += f" (with {' '.join(given)})" if given and config_path is not None else ""
    source += f" ({' '.join(given)})" if given and config_path is None else ""
    return validate(apply_overrides(raw, [*start, *overrides]), source)


def config_from_dict(raw: dict[str, Any], source: str = "checkpoint") -> Config:
    return validate(raw, source)


def dump_yaml(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False, default_flow_style=None)


def write_yaml(config: Config, path: Path) -> None:
    """Write atomically: a crash mid-write never leaves half a config."""
    write_text_atomic(path, dump_yaml(config))
