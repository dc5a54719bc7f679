"""Run configuration: dataclasses validated on construction, loaded from YAML with `key=value` overrides."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, MissingPathError

TOWER_MODES = ("frozen", "lora", "full")
HEAD_TYPES = ("concat", "gated", "cross_attention", "text_only", "image_only", "prompt")
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
CLASS_WEIGHTS = ("none", "balanced")
DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANT_BITS = (4, 8)
QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")
STORAGE_DTYPES = ("auto", "uint8", "bfloat16", "float16", "float32")
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit")
TASKS = ("classification", "retrieval")
# metric_for_best choices per task; `auto` picks the first of its task's list.
TASK_METRICS = {"classification": ("macro_f1", "accuracy", "weighted_f1", "macro_recall", "weighted_recall", "loss"),
                "retrieval": ("recall_mean", "loss")}
METRICS = ("auto", *dict.fromkeys(m for metrics in TASK_METRICS.values() for m in metrics))


def _check_choice(section: str, name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"`{section}.{name}` must be one of {list(choices)}, got {value!r}.")


def _check_positive(section: str, name: str, value: Any, *, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"`{section}.{name}` must be a number {bound}, got {value!r}.")


@dataclass
class LoraSettings:
    """peft LoRA settings of one tower; `extra` passes any other `LoraConfig` field through (e.g. use_rslora)."""

    r: int = 16
    alpha: float = 32
    dropout: float = 0.05
    targets: str | None = None  # anchored regex over module names; None = the family's preset for this tower
    layers: int | None = None  # LoRA on the last N layers only; None = all layers
    use_dora: bool = False
    extra: dict = field(default_factory=dict)

    def validate(self, section: str) -> None:
        _check_positive(section, "r", self.r)
        _check_positive(section, "alpha", self.alpha)
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"`{section}.dropout` must be in [0, 1), got {self.dropout!r}.")
        if self.layers is not None:
            _check_positive(section, "layers", self.layers)


@dataclass
class TowerConfig:
    """How one tower trains: `frozen`, `lora` (peft adapter) or `full`."""

    mode: str = "lora"
    lora: LoraSettings = field(default_factory=LoraSettings)


@dataclass
class QuantConfig:
    """bitsandbytes quantization of a frozen base (QLoRA): the towers' linear layers in 4 or 8 bits."""

    bits: int = 4
    quant_type: str = "nf4"  # 4-bit only: nf4 | fp4
    double_quant: bool = True  # 4-bit only: quantize the block scales too (about 0.4 bit per weight)
    compute_dtype: str = "bfloat16"  # matmul dtype, and the dtype of every part that is not quantized
    storage_dtype: str = "auto"  # 4-bit packing dtype (bnb_4bit_quant_storage); auto = uint8, compute dtype under FSDP
    towers: list[str] = field(default_factory=lambda: ["text", "vision"])

    def validate(self, section: str = "model.quantization") -> list[str]:
        """Every problem with these settings, each naming its key (empty when all is well)."""
        problems = []
        for name, choices in (("bits", QUANT_BITS), ("quant_type", QUANT_TYPES), ("compute_dtype", COMPUTE_DTYPES),
                              ("storage_dtype", STORAGE_DTYPES)):
            try:
                _check_choice(section, name, getattr(self, name), choices)
            except ValueError as err:
                problems.append(str(err))
        if not isinstance(self.double_quant, bool):
            problems.append(f"`{section}.double_quant` must be true or false, got {self.double_quant!r}.")
        towers = self.towers
        if (not isinstance(towers, list) or not towers or len(set(towers)) != len(towers)
                or not set(towers) <= {"text", "vision"}):
            problems.append(f"`{section}.towers` must be a non-empty list of distinct towers from ['text', 'vision'], "
                            f"got {towers!r}.")
        return problems


@dataclass
class ModelConfig:
    """The backbone: a Hub id, a local folder or a registered short name."""

    name: str = "tiny-clip"
    family: str | None = None  # None = from the checkpoint's config.model_type
    revision: str | None = None
    dtype: str = "auto"  # storage dtype of the backbone weights; auto = float32, or the compute dtype when quantized
    trust_pickle_weights: bool = False  # also read pytorch_model.bin (with torch.load weights_only=True)
    text: TowerConfig = field(default_factory=TowerConfig)
    vision: TowerConfig = field(default_factory=TowerConfig)
    quantization: QuantConfig | None = None  # None = no quantization
    gradient_checkpointing: bool = False  # recompute each encoder layer in the backward pass (non-reentrant)


@dataclass
class HeadConfig:
    """The classifier on top of the towers."""

    type: str = "concat"
    mode: str = "full"  # frozen | lora | full, like a tower
    hidden: int = 256  # MLP width; 0 = a single linear layer (the brief's head)
    dropout: float = 0.1
    normalize: bool = True  # L2-normalise pooled embeddings before fusion
    attention_heads: int = 4  # cross_attention head
    prompt_template: str = "a photo of a {}."
    lora: LoraSettings = field(default_factory=lambda: LoraSettings(r=8, alpha=16, dropout=0.0))

    @property
    def reads_captions(self) -> bool:
        """Whether the head reads each example's text; `prompt` and `image_only` do not (no text column needed)."""
        return self.type not in ("prompt", "image_only")


@dataclass
class AugmentConfig:
    """Training-time augmentation (off by default); randomness is keyed by seed, epoch and example.

    `enabled` switches image augmentation (random resized crop, flip, colour jitter); text augmentation is on
    when `word_dropout` or `synonym_swap` is above 0 (synonyms: the world's vocabulary).
    """

    enabled: bool = False
    crop_scale: tuple = (0.8, 1.0)
    flip: bool = True
    color_jitter: float = 0.2
    word_dropout: float = 0.0  # probability of dropping each word of a caption
    synonym_swap: float = 0.0  # probability of swapping a word for a synonym


@dataclass
class DataConfig:
    """Manifests (CSV, JSONL or a `datasets` folder) and how they are batched."""

    train: str | None = None  # None = the embedded synthetic set
    eval: str | None = None
    test: str | None = None
    image_column: str = "image"
    text_column: str = "text"
    label_column: str = "label"
    max_text_length: int | None = None  # None = the family's default
    batch_size: int = 16
    eval_batch_size: int | None = None
    num_workers: int = 2
    check_images: bool = True  # decode every image once before training so a bad file fails early
    skip_bad_rows: bool = False
    allow_outside_root: bool = False  # accept image paths that resolve outside the manifest's folder
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class TrainConfig:
    """The optimisation loop."""

    output_dir: str = "out/run"
    overwrite: bool = False
    epochs: int = 10
    max_steps: int | None = None
    lr_head: float = 1e-3
    lr_lora: float = 5e-4
    lr_full: float = 2e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    label_smoothing: float = 0.0
    class_weights: str = "none"
    mixed_precision: str = "auto"  # auto = bf16 on CUDA / CPUs with bf16 support, else fp32
    seed: int = 0
    metric_for_best: str = "auto"  # auto = macro_f1 for classification, recall_mean for retrieval
    early_stopping_patience: int | None = None  # in evaluations
    eval_every: int | None = None  # in optimizer steps; None = once per epoch
    log_every: int = 10
    tracker: str | None = "auto"  # auto = tensorboard when installed; None = no tracker
    optimizer: str = "adamw"  # adamw | adamw_8bit | paged_adamw_8bit (the last two through bitsandbytes)
    progress: bool = True
    checkpoint_every: int | None = None  # optimizer steps between full training-state checkpoints
    keep_checkpoints: int = 2
    resume_from: str | None = None  # `latest` or a checkpoints/step-N folder
    skip_nonfinite: bool = False  # skip (and count) batches whose loss is NaN/inf instead of stopping


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    task: str = "classification"  # classification (the head) | retrieval (contrastive, no head: `head` is ignored)

    def __post_init__(self) -> None:
        if self.train.metric_for_best == "auto" and self.task in TASKS:
            self.train.metric_for_best = TASK_METRICS[self.task][0]
        self.validate()

    def validate(self) -> None:
        """Check every value and cross-field constraint; raise one ValueError naming the key."""
        problems = []
        checks = [
            lambda: _check_choice("model", "dtype", self.model.dtype, DTYPES),
            lambda: _check_choice("head", "type", self.head.type, HEAD_TYPES),
            lambda: _check_choice("head", "mode", self.head.mode, TOWER_MODES),
            lambda: _check_choice("train", "mixed_precision", self.train.mixed_precision, MIXED_PRECISION),
            lambda: _check_choice("train", "class_weights", self.train.class_weights, CLASS_WEIGHTS),
            lambda: _check_choice("train", "metric_for_best", self.train.metric_for_best, METRICS),
            lambda: _check_choice("train", "optimizer", self.train.optimizer, OPTIMIZERS),
            lambda: _check_positive("data", "batch_size", self.data.batch_size),
            lambda: _check_positive("data", "num_workers", self.data.num_workers, allow_zero=True),
            lambda: _check_positive("train", "epochs", self.train.epochs),
            lambda: _check_positive("train", "grad_accum", self.train.grad_accum),
            lambda: _check_positive("train", "lr_head", self.train.lr_head),
            lambda: _check_positive("train", "lr_lora", self.train.lr_lora),
            lambda: _check_positive("train", "lr_full", self.train.lr_full),
            lambda: _check_positive("train", "weight_decay", self.train.weight_decay, allow_zero=True),
            lambda: _check_positive("train", "log_every", self.train.log_every),
            lambda: self.head.lora.validate("head.lora"),
        ]
        for tower in ("text", "vision"):
            cfg = getattr(self.model, tower)
            checks.append(lambda t=tower, c=cfg: _check_choice(f"model.{t}", "mode", c.mode, TOWER_MODES))
            checks.append(lambda t=tower, c=cfg: c.lora.validate(f"model.{t}.lora"))
        for check in checks:
            try:
                check()
            except ValueError as err:
                problems.append(str(err))
        problems += self._task_problems()
        if not 0 <= self.train.warmup_ratio < 1:
            problems.append(f"`train.warmup_ratio` must be in [0, 1), got {self.train.warmup_ratio!r}.")
        for key in ("word_dropout", "synonym_swap"):
            value = getattr(self.data.augment, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1:
                problems.append(f"`data.augment.{key}` must be a probability in [0, 1), got {value!r}.")
        if not 0 <= self.train.label_smoothing < 1:
            problems.append(f"`train.label_smoothing` must be in [0, 1), got {self.train.label_smoothing!r}.")
        for key in ("checkpoint_every", "keep_checkpoints"):
            value = getattr(self.train, key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                problems.append(f"`train.{key}` must be a positive integer, got {value!r}.")
        if self.train.max_steps is not None and (not isinstance(self.train.max_steps, int) or self.train.max_steps < 1):
            problems.append(f"`train.max_steps` must be a positive integer or null, got {self.train.max_steps!r}.")
        if self.data.eval is None and self.data.train is not None and (
            self.train.early_stopping_patience is not None
        ):
            problems.append("`train.early_stopping_patience` needs an evaluation set: set `data.eval`.")
        unused = {"text_only": "vision", "image_only": "text"}.get(self.head.type)
        if unused and self.task == "classification" and getattr(self.model, unused).mode != "frozen":
            problems.append(
                f"`head.type={self.head.type}` never runs the {unused} tower, so it cannot train: "
                f"set `model.{unused}.mode=frozen` (it is `{getattr(self.model, unused).mode}`)."
            )
        if self.head.type == "prompt" and self.head.mode == "lora":
            problems.append("`head.type=prompt` has no linear layers for LoRA: use `head.mode=full` or `frozen`.")
        if self.head.type == "prompt" and "{}" not in self.head.prompt_template:
            problems.append(f"`head.prompt_template` must contain '{{}}' for the class name, got {self.head.prompt_template!r}.")
        problems += self._quantization_problems()
        if not isinstance(self.model.gradient_checkpointing, bool):
            problems.append(f"`model.gradient_checkpointing` must be true or false, got "
                            f"{self.model.gradient_checkpointing!r}.")
        if problems:
            raise ConfigError("Invalid config:\n  - " + "\n  - ".join(problems))

    def _task_problems(self) -> list[str]:
        if self.task not in TASKS:
            return [f"`task` must be one of {list(TASKS)}, got {self.task!r}."]
        problems = []
        metric, allowed = self.train.metric_for_best, TASK_METRICS[self.task]
        if metric in METRICS and metric not in allowed:
            problems.append(f"`train.metric_for_best={metric}` is not a {self.task} metric; with `task={self.task}` "
                            f"use one of {list(allowed)} (or `auto`).")
        if self.task == "retrieval" and self.model.text.mode == self.model.vision.mode == "frozen":
            problems.append("`task=retrieval` trains the towers themselves (there is no head): set `model.text.mode` "
                            "or `model.vision.mode` to `lora` or `full`.")
        return problems

    def _quantization_problems(self) -> list[str]:
        quant = self.model.quantization
        if quant is None:
            return []
        problems = quant.validate("model.quantization")
        towers = quant.towers if isinstance(quant.towers, list) else []
        for tower in ("text", "vision"):
            if tower in towers and getattr(self.model, tower).mode == "full":
                other = "vision" if tower == "text" else "text"
                problems.append(
                    f"`model.quantization.towers` includes {tower} but `model.{tower}.mode=full`: {quant.bits}-bit "
                    f"weights cannot be trained. Use `model.{tower}.mode=lora` (QLoRA) or `frozen`, or quantize "
                    f"the other tower only (`model.quantization.towers=[{other}]`)."
                )
        return problems

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class _Yaml12Loader(yaml.SafeLoader):
    """YAML with 1.2 booleans: only true/false; `no`, `off`, `yes` stay strings (`mixed_precision: no`)."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
for _first in "tTfF":
    _Yaml12Loader.add_implicit_resolver(
        "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list(_first)
    )


# YAML 1.1 reads `1e-3` (no dot) as a string; learning rates are written that way.
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"), list("-+0123456789.")
)


def parse_yaml(text: str):
    """Parse YAML as a config (1.2 booleans, `1e-3` as a float)."""
    return yaml.load(text, Loader=_Yaml12Loader)


def _build(cls: type, data: Any, where: str) -> Any:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys with the list of valid ones."""
    if not dataclasses.is_dataclass(cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"`{where or 'config'}` must be a mapping, got {data!r}.")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"Unknown config key(s) {[prefix + k for k in unknown]}; valid keys here: {names}.")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
            if value is None and type(None) in typing.get_args(hint):
                kwargs[key] = None  # an optional section switched off (`model.quantization: null`)
                continue
            hint = next((a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)), hint)
        sub = f"{where}.{key}" if where else key
        kwargs[key] = _build(hint, value, sub) if dataclasses.is_dataclass(hint) else value
    return cls(**kwargs)


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"Override `{dotted}`: `{key}` is not a section.")
    node[keys[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> Config:
    """Read a YAML config (or the defaults), apply `a.b=value` overrides (values parsed as YAML), validate."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise MissingPathError(f"Config file {path} does not exist.")
        try:
            tree = parse_yaml(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"Config file {path} is not valid YAML: {err}") from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"Override {item!r} must look like `section.key=value`, e.g. `train.epochs=5`.")
        key, raw = item.split("=", 1)
        _set_path(tree, key.strip(), parse_yaml(raw) if raw != "" else None)
    try:
        return _build(Config, tree, "")
    except TypeError as err:  # a wrong type reaching a dataclass constructor
        raise ConfigError(f"Invalid config{f' in {path}' if path else ''}: {err}") from None
