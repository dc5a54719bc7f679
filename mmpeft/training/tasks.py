"""What kind of run it is: a task object owns its model builder, loss, evaluation and report (its default metric is
`config.TASK_METRICS[name][0]`), so the
loop never asks which task it runs. A new task (captioning, say) is one new class registered in `TASKS`."""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch
from torch import nn

from ..config import Config
from ..models.classifier import build_classifier
from ..models.retrieval import build_retrieval_model, contrastive_loss_across_processes
from .evaluation import evaluate, evaluate_retrieval
from .metrics import format_report, format_retrieval_report
from .optim import class_weights


@dataclass
class Task(abc.ABC):
    """Base: the parts of a run that depend on what is learnt. `prepare` is called once the accelerator has put the
    model on its device; `loss` and `evaluate` take the prepared (possibly wrapped) model. A task implements the
    four abstract methods; the others have defaults."""

    cfg: Config
    name = "task"
    shown_metric = "loss"  # printed beside `train.metric_for_best` at each evaluation

    def needs_text(self) -> bool:
        """Whether every row must have a caption."""
        return True

    @abc.abstractmethod
    def build_model(self, backbone, data) -> nn.Module:
        """The model over the backbone's towers (adapters attached as the config asks)."""

    def prepare(self, model: nn.Module, accelerator, data) -> None:
        """Set up what the loss and the evaluation need on the accelerator's device."""

    @abc.abstractmethod
    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """The training loss of one batch (a scalar the loop back-propagates)."""

    @abc.abstractmethod
    def evaluate(self, model: nn.Module, loader, accelerator, per_example: bool = False) -> dict:
        """The metrics of a whole split, gathered across processes; with `per_example`, also each example's
        prediction under `evaluation.PER_EXAMPLE` where the task has them (the final test split asks)."""

    @abc.abstractmethod
    def report(self, metrics: dict) -> str:
        """Metrics as the table a run prints."""

    def before_training(self, model: nn.Module, loaders: dict, accelerator) -> dict:
        """Metrics of the model as built, recorded beside the trained ones (e.g. zero-shot recall)."""
        return {}

    def describe(self, data) -> str:
        return f"task {self.name}"


@dataclass
class ClassificationTask(Task):
    """Image + text classification through a fusion head; cross-entropy (with class weights and smoothing)."""

    name = "classification"
    shown_metric = "accuracy"

    def needs_text(self) -> bool:
        return self.cfg.head.reads_captions

    def build_model(self, backbone, data) -> nn.Module:
        return build_classifier(backbone, self.cfg, data.label_names)

    def prepare(self, model: nn.Module, accelerator, data) -> None:
        weights = class_weights(data.class_counts, self.cfg.train.class_weights)
        self.label_names = data.label_names
        self.train_loss = nn.CrossEntropyLoss(weight=weights.to(accelerator.device) if weights is not None else None,
                                              label_smoothing=self.cfg.train.label_smoothing)
        self.eval_loss = nn.CrossEntropyLoss(weight=weights)  # on the gathered CPU logits

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return self.train_loss(model(**batch).float(), batch["labels"])

    def evaluate(self, model: nn.Module, loader, accelerator, per_example: bool = False) -> dict:
        return evaluate(model, loader, accelerator, self.label_names, self.eval_loss, per_example=per_example)

    def report(self, metrics: dict) -> str:
        return format_report(metrics)

    def describe(self, data) -> str:
        return f"labels {data.label_names}"


@dataclass
class RetrievalTask(Task):
    """Image-caption retrieval: the symmetric contrastive loss against every process's pairs; recall@k."""

    name = "retrieval"
    shown_metric = "recall_mean"

    def build_model(self, backbone, data) -> nn.Module:
        return build_retrieval_model(backbone, self.cfg)

    def prepare(self, model: nn.Module, accelerator, data) -> None:
        self.logit_scale = accelerator.unwrap_model(model).logit_scale

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        image, text = model(**batch, embed=True)
        return contrastive_loss_across_processes(image, text, self.logit_scale)

    def evaluate(self, model: nn.Module, loader, accelerator, per_example: bool = False) -> dict:
        return evaluate_retrieval(model, loader, accelerator)  # ranks, not labels: nothing to pair per example

    def report(self, metrics: dict) -> str:
        return format_retrieval_report(metrics)

    def before_training(self, model: nn.Module, loaders: dict, accelerator) -> dict:
        """Recall of the towers before any update (when resuming too: the saved state is loaded later)."""
        zero_shot = {}
        for name in ("eval", "test"):
            if loaders.get(name) is not None:
                zero_shot[f"zero_shot_{name}"] = metrics = self.evaluate(model, loaders[name], accelerator)
                accelerator.print(f"zero-shot {name} ({len(loaders[name].dataset)} pairs)\n{self.report(metrics)}")
        return zero_shot


TASKS: dict[str, type[Task]] = {"classification": ClassificationTask, "retrieval": RetrievalTask}


def get_task(cfg: Config) -> Task:
    """The task object of `cfg.task` (the config has already checked the name)."""
    return TASKS[cfg.task](cfg)
