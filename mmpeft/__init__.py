"""mmpeft: parameter-efficient fine-tuning of vision-language dual encoders for classification."""

from .backbones import Backbone, BackboneError, BackboneFamily, get_family, list_backbones, load_backbone
from .config import (
                     Config,
                     DataConfig,
                     HeadConfig,
                     LoraSettings,
                     ModelConfig,
                     QuantConfig,
                     TowerConfig,
                     TrainConfig,
                     load_config,
)
from .data import DataError, read_split
from .data.loaders import build_dataloaders
from .export.inference import Predictions, predict
from .models.adapters import attach_adapters, build_lora_config, lora_module_names, tower_targets, trainable_report
from .models.classifier import FusionClassifier, build_classifier
from .models.heads import build_head
from .models.retrieval import RetrievalModel, build_retrieval_model, contrastive_loss
from .models.saving import load_adapter, load_retrieval_model, save_adapter
from .training.evaluation import evaluate, evaluate_retrieval, predict_logits
from .training.loop import train
from .training.metrics import classification_metrics
from .world import write_sentiment

__version__ = "0.1.0"

__all__ = [
    "Backbone",
    "BackboneError",
    "BackboneFamily",
    "Config",
    "DataConfig",
    "DataError",
    "FusionClassifier",
    "HeadConfig",
    "LoraSettings",
    "ModelConfig",
    "Predictions",
    "QuantConfig",
    "RetrievalModel",
    "TowerConfig",
    "TrainConfig",
    "attach_adapters",
    "build_classifier",
    "build_dataloaders",
    "build_head",
    "build_lora_config",
    "build_retrieval_model",
    "classification_metrics",
    "contrastive_loss",
    "evaluate",
    "evaluate_retrieval",
    "get_family",
    "list_backbones",
    "load_adapter",
    "load_backbone",
    "load_config",
    "load_retrieval_model",
    "lora_module_names",
    "predict",
    "predict_logits",
    "read_split",
    "save_adapter",
    "tower_targets",
    "train",
    "trainable_report",
    "write_sentiment",
]
