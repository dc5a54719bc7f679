"""The run configuration: one dataclass per section, each validating itself (see `rules.py`)."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import re
from dataclasses import dataclass, field

from ..errors import ConfigError
from .rules import PROBABILITY, Section, choice, value

TOWER_MODES = ("frozen", "lora", "full")
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
CLASS_WEIGHTS = ("none", "balanced")
DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTENTION_IMPLEMENTATIONS = ("auto", "sdpa", "eager")
QUANT_BITS = (4, 8)
QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")
STORAGE_DTYPES = ("auto", "uint8", "bfloat16", "float16", "float32")
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit")
FEATURE_CACHES = ("off", "memory", "disk")
TRACKERS = ("auto", "tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive")
TASKS = ("classification", "retrieval")
# metric_for_best choices per task; `auto` picks the first of its task's list.
TASK_METRICS = {"classification": ("macro_f1", "accuracy", "weighted_f1", "macro_recall", "weighted_recall", "loss"),
                "retrieval": ("recall_mean", "loss")}
METRICS = ("auto", *dict.fromkeys(m for metrics in TASK_METRICS.values() for m in metrics))


@dataclass(frozen=True)
class HeadSpec:
    """What a head type reads: the towers it runs, whether it reads each example's caption (the `prompt` head
    reads class-name prompts instead), and whether it has linear layers for `head.mode=lora`."""

    towers: tuple[str, ...] = ("text", "vision")
    reads_captions: bool = True
    has_linears: bool = True


# The facts of every head type, in one table; `mmpeft.models.heads` registers one class per name.
HEAD_SPECS = {
    "concat": HeadSpec(),
    "gated": HeadSpec(),
    "cross_attention": HeadSpec(),
    "text_only": HeadSpec(towers=("text",)),
    "image_only": HeadSpec(towers=("vision",), reads_captions=False),
    "prompt": HeadSpec(reads_captions=False, has_linears=False),
}
HEAD_TYPES = tuple(HEAD_SPECS)


@dataclass
class LoraSettings(Section):
    """peft LoRA settings of one tower; `extra` passes any other `LoraConfig` field through (e.g. use_rslora)."""

    r: int = value(16, low=1)
    alpha: float = value(32, kind=float, low=0, low_open=True)
    dropout: float = value(0.05, **PROBABILITY)
    # anchored regex over module names; None = the family's preset for this tower
    targets: str | None = value(None, kind=str, optional=True)
    layers: int | None = value(None, low=1, optional=True)  # LoRA on the last N layers only; None = all layers
    use_dora: bool = value(False)
    extra: dict = value({}, kind=dict)


@dataclass
class TowerConfig(Section):
    """How one tower trains: `frozen`, `lora` (peft adapter) or `full`."""

    mode: str = choice("lora", TOWER_MODES)
    lora: LoraSettings = field(default_factory=LoraSettings)


@dataclass
class QuantConfig(Section):
    """bitsandbytes quantization of a frozen base (QLoRA): the towers' linear layers in 4 or 8 bits."""

    bits: int = choice(4, QUANT_BITS)
    quant_type: str = choice("nf4", QUANT_TYPES)  # 4-bit only
    double_quant: bool = value(True)  # 4-bit only: quantize the block scales too (about 0.4 bit per weight)
    compute_dtype: str = choice("bfloat16", COMPUTE_DTYPES)  # matmul dtype, and that of every unquantized part
    # 4-bit packing dtype (bnb_4bit_quant_storage); auto = uint8, the compute dtype under FSDP
    storage_dtype: str = choice("auto", STORAGE_DTYPES)
    towers: list[str] = field(default_factory=lambda: ["text", "vision"])

    def cross_problems(self, where: str) -> list[str]:
        towers = self.towers
        if (not isinstance(towers, list) or not towers or len(set(map(str, towers))) != len(towers)
                or not set(towers) <= {"text", "vision"}):
            return [f"`{where}.towers` must be a non-empty list of distinct towers from ['text', 'vision'], "
                    f"got {towers!r}."]
        return []

    def validate(self, section: str = "model.quantization") -> list[str]:
        """Every problem with these settings, each naming its key (empty when all is well)."""
        return self.problems(section)


@dataclass
class ModelConfig(Section):
    """The backbone: a Hub id, a local folder or a registered short name."""

    name: str = value("tiny-clip", kind=str)
    family: str | None = value(None, kind=str, optional=True)  # None = from the checkpoint's config.model_type
    revision: str | None = value(None, kind=str, optional=True)
    # storage dtype of the backbone weights; auto = float32, or the compute dtype when quantized, or bfloat16 when
    # the run trains under bf16 with no full tower (models/precision.py)
    dtype: str = choice("auto", DTYPES)
    # transformers towers' attention; auto = eager on the CPU under bf16, else as loaded (sdpa)
    attn_implementation: str = choice("auto", ATTENTION_IMPLEMENTATIONS)
    trust_pickle_weights: bool = value(False)  # also read pytorch_model.bin (with torch.load weights_only=True)
    text: TowerConfig = field(default_factory=TowerConfig)
    vision: TowerConfig = field(default_factory=TowerConfig)
    quantization: QuantConfig | None = None  # None = no quantization
    gradient_checkpointing: bool = value(False)  # recompute each encoder layer in the backward pass (non-reentrant)
    # accept a tower that starts from random weights (a `dual:` torchvision / timm tower named without weights)
    allow_random_init: bool = value(False)

    def cross_problems(self, where: str) -> list[str]:
        quant = self.quantization
        if quant is None:
            return []
        found = []
        for tower in ("text", "vision"):
            if isinstance(quant.towers, list) and tower in quant.towers and getattr(self, tower).mode == "full":
                other = "vision" if tower == "text" else "text"
                found.append(
                    f"`{where}.quantization.towers` includes {tower} but `{where}.{tower}.mode=full`: {quant.bits}-bit "
                    f"weights cannot be trained. Use `{where}.{tower}.mode=lora` (QLoRA) or `frozen`, or quantize "
                    f"the other tower only (`{where}.quantization.towers=[{other}]`)."
                )
        return found


@dataclass
class HeadConfig(Section):
    """The classifier on top of the towers."""

    type: str = choice("concat", HEAD_TYPES)
    mode: str = choice("full", TOWER_MODES)  # frozen | lora | full, like a tower
    hidden: int = value(256, low=0)  # MLP width; 0 = a single linear layer (the brief's head)
    dropout: float = value(0.1, **PROBABILITY)
    normalize: bool = value(True)  # L2-normalise pooled embeddings before fusion
    attention_heads: int = value(4, low=1)  # cross_attention head
    prompt_template: str = value("a photo of a {}.", kind=str)
    lora: LoraSettings = field(default_factory=lambda: LoraSettings(r=8, alpha=16, dropout=0.0))

    @property
    def spec(self) -> HeadSpec:
        return HEAD_SPECS[self.type]

    @property
    def reads_captions(self) -> bool:
        """Whether the head reads each example's text; `prompt` and `image_only` do not (no text column needed)."""
        return self.spec.reads_captions

    def cross_problems(self, where: str) -> list[str]:
        if self.type not in HEAD_SPECS:
            return []
        found = []
        if self.mode == "lora" and not self.spec.has_linears:
            found.append(f"`{where}.type={self.type}` has no linear layers for LoRA: use `{where}.mode=full` or "
                         "`frozen`.")
        if self.type == "prompt" and isinstance(self.prompt_template, str) and "{}" not in self.prompt_template:
            found.append(f"`{where}.prompt_template` must contain '{{}}' for the class name, got "
                         f"{self.prompt_template!r}.")
        return found


@dataclass
class AugmentConfig(Section):
    """Training-time augmentation (off by default); randomness is keyed by seed, epoch and example.

    `enabled` switches image augmentation (random resized crop, flip, colour jitter); text augmentation is on
    when `word_dropout` or `synonym_swap` is above 0 (synonyms: the world's vocabulary).
    """

    enabled: bool = value(False)
    crop_scale: tuple = (0.8, 1.0)
    flip: bool = value(True)
    color_jitter: float = value(0.2, **PROBABILITY)
    word_dropout: float = value(0.0, **PROBABILITY)  # probability of dropping each word of a caption
    synonym_swap: float = value(0.0, **PROBABILITY)  # probability of swapping a word for a synonym

    def __post_init__(self) -> None:
        if isinstance(self.crop_scale, list):  # YAML and JSON give a list; the default (and resume settings): tuple
            self.crop_scale = tuple(self.crop_scale)

    def cross_problems(self, where: str) -> list[str]:
        scale = self.crop_scale
        ok = (isinstance(scale, (list, tuple)) and len(scale) == 2
              and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in scale)
              and 0 < scale[0] <= scale[1] <= 1)
        return [] if ok else [f"`{where}.crop_scale` must be [low, high] with 0 < low <= high <= 1, got {scale!r}."]


@dataclass
class DataConfig(Section):
    """Manifests (CSV, JSONL or a `datasets` folder) and how they are batched."""

    train: str | None = value(None, kind=str, optional=True)  # None = the embedded synthetic set
    eval: str | None = value(None, kind=str, optional=True)
    test: str | None = value(None, kind=str, optional=True)
    image_column: str = value("image", kind=str)
    text_column: str = value("text", kind=str)
    label_column: str = value("label", kind=str)
    max_text_length: int | None = value(None, low=1, optional=True)  # None = the family's default
    batch_size: int = value(32, low=1)
    eval_batch_size: int | None = value(None, low=1, optional=True)  # None = batch_size
    # loader processes; None = from the machine (none on 2 cores, where workers compete with the step for them);
    # a number is capped at the cores this process may use minus one
    num_workers: int | None = value(None, low=0, optional=True)
    check_images: bool = value(True)  # decode every image once before training so a bad file fails early
    skip_bad_rows: bool = value(False)
    # merge labels that differ only by case or surrounding spaces ("Positive", "positive "); off: warned about
    normalize_labels: bool = value(False)
    allow_outside_root: bool = value(False)  # accept image paths that resolve outside the manifest's folder
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class TrainConfig(Section):
    """The optimisation loop."""

    output_dir: str = value("out/run", kind=str)
    overwrite: bool = value(False)  # start a clean run in output_dir, removing what an earlier run wrote there
    epochs: int = value(8, low=1)  # passes over the training set, unless max_steps is set
    max_steps: int | None = value(None, low=1, optional=True)  # set: exactly this many optimizer steps
    lr_head: float = value(3e-3, kind=float, low=0, low_open=True)
    lr_lora: float = value(3e-3, kind=float, low=0, low_open=True)
    lr_full: float = value(2e-5, kind=float, low=0, low_open=True)
    weight_decay: float = value(0.01, kind=float, low=0)
    warmup_ratio: float = value(0.1, **PROBABILITY)
    grad_accum: int = value(1, low=1)
    max_grad_norm: float | None = value(1.0, kind=float, low=0, low_open=True, optional=True)  # None = no clipping
    label_smoothing: float = value(0.0, **PROBABILITY)
    class_weights: str = choice("none", CLASS_WEIGHTS)
    mixed_precision: str = choice("auto", MIXED_PRECISION)  # auto = bf16 on CUDA / CPUs with bf16 support, else fp32
    seed: int = value(0, low=0)
    metric_for_best: str = choice("auto", METRICS)  # auto = macro_f1 for classification, recall_mean for retrieval
    early_stopping_patience: int | None = value(None, low=1, optional=True)  # in evaluations
    eval_every: int | None = value(None, low=1, optional=True)  # in optimizer steps; None = once per epoch
    log_every: int = value(10, low=1)
    tracker: str | None = choice("auto", TRACKERS, optional=True)  # auto = tensorboard when installed; null = none
    project: str = value("mmpeft", kind=str)  # the tracker's project (W&B project, MLflow experiment, ...)
    run_name: str | None = value(None, kind=str, optional=True)  # the tracker's run name; None = the output folder's
    optimizer: str = choice("adamw", OPTIMIZERS)  # adamw_8bit / paged_adamw_8bit through bitsandbytes
    progress: bool = value(True)
    checkpoint_every: int | None = value(None, low=1, optional=True)  # optimizer steps between training-state saves
    keep_checkpoints: int = value(2, low=1)
    resume_from: str | None = value(None, kind=str, optional=True)  # `latest` or a checkpoints/step-N folder
    skip_nonfinite: bool = value(False)  # skip (and count) batches whose loss is NaN/inf instead of stopping
    evaluate_only: bool = value(False)  # evaluate the model as built (e.g. zero-shot) without training it
    # frozen towers' pooled outputs computed once and reused every epoch, where nothing can change them (the run
    # says why not otherwise): in this process's memory, or on disk under feature_cache_dir for later processes
    feature_cache: str = choice("memory", FEATURE_CACHES)
    feature_cache_dir: str | None = value(None, kind=str, optional=True)  # None = $MMPEFT_CACHE or ~/.cache/mmpeft
    timing_warmup_steps: int = value(2, low=0)  # steps left out of train_samples_per_s (start-up, first batches)


# A Hub repo id: owner/name.
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass
class HubConfig(Section):
    """The `hub:` section: push the best adapter to the Hub when training ends (`mmpeft push` does it by hand)."""

    push: bool = value(False)
    repo_id: str | None = value(None, kind=str, optional=True)  # owner/name
    private: bool = value(True)
    revision: str | None = value(None, kind=str, optional=True)  # branch to push to; None = main
    base_model_id: str | None = value(None, kind=str, optional=True)  # the Hub id of a locally loaded base
    include_checkpoints: bool = value(False)
    include_logs: bool = value(False)

    def cross_problems(self, where: str) -> list[str]:
        found = []
        if self.push and not self.repo_id:
            found.append(f"`{where}.push=true` needs `{where}.repo_id` (owner/name).")
        for name in ("repo_id", "base_model_id"):
            given = getattr(self, name)
            if isinstance(given, str) and not REPO_ID.fullmatch(given):
                found.append(f"`{where}.{name}` must be a Hub id (owner/name), got {given!r}.")
        return found


@dataclass
class Config(Section):
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    hub: HubConfig = field(default_factory=HubConfig)
    # classification (the head) | retrieval (contrastive, no head: `head` is ignored)
    task: str = choice("classification", TASKS)

    def __post_init__(self) -> None:
        if self.train.metric_for_best == "auto" and self.task in TASKS:
            self.train.metric_for_best = TASK_METRICS[self.task][0]
        if not _UNCHECKED.get():
            self.validate()

    def validate(self) -> None:
        """Check every value and cross-field constraint; raise one `ConfigError` listing every problem."""
        problems = self.problems("")
        if problems:
            raise ConfigError("Invalid config:\n  - " + "\n  - ".join(problems))

    def cross_problems(self, where: str) -> list[str]:
        found = []
        if self.task in TASKS:
            metric, allowed = self.train.metric_for_best, TASK_METRICS[self.task]
            if metric in METRICS and metric not in allowed:
                found.append(f"`train.metric_for_best={metric}` is not a {self.task} metric; with "
                             f"`task={self.task}` use one of {list(allowed)} (or `auto`).")
        nothing_trains = (self.model.text.mode == self.model.vision.mode == "frozen"
                          and (self.task == "retrieval" or self.head.mode == "frozen"))
        if nothing_trains and not self.train.evaluate_only:
            if self.task == "retrieval":
                found.append("`task=retrieval` trains the towers themselves (there is no head): set "
                             "`model.text.mode` or `model.vision.mode` to `lora` or `full`, or "
                             "`train.evaluate_only=true` to evaluate them as built.")
            else:
                found.append("Nothing to train: every tower and the head are frozen. Set `model.text.mode`, "
                             "`model.vision.mode` or `head.mode` to `lora` or `full`, or `train.evaluate_only=true` "
                             "to evaluate the model as built.")
        if self.hub.push and self.hub.base_model_id is None and not REPO_ID.fullmatch(self.model.name):
            found.append(f"`hub.push=true` but `model.name={self.model.name}` is not a Hub id, so nobody else could "
                         "load the base: set `hub.base_model_id` to the Hub id it corresponds to.")
        if self.data.eval is None and self.data.train is not None and self.train.early_stopping_patience is not None:
            found.append("`train.early_stopping_patience` needs an evaluation set: set `data.eval`.")
        spec = HEAD_SPECS.get(self.head.type)
        if spec is not None and self.task == "classification":
            for unused in (t for t in ("text", "vision") if t not in spec.towers):
                if getattr(self.model, unused).mode != "frozen":
                    found.append(f"`head.type={self.head.type}` never runs the {unused} tower, so it cannot train: "
                                 f"set `model.{unused}.mode=frozen` (it is `{getattr(self.model, unused).mode}`).")
        return found

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_UNCHECKED = contextvars.ContextVar("mmpeft_config_unchecked", default=False)


@contextlib.contextmanager
def unchecked():
    """Build configs without validating them: for configs saved by earlier runs (see `config_from_dict`)."""
    token = _UNCHECKED.set(True)
    try:
        yield
    finally:
        _UNCHECKED.reset(token)
