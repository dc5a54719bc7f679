"""Explanations of a fine-tuned dual-encoder classifier: how much each modality contributes (permutation and
Shapley shares), saliency per tower, calibration and errors, and the report `mmpeft explain` writes."""

from .calibration import calibration_report, reliability
from .contribution import modality_contribution, permutation_contribution, shapley_contribution, shapley_example
from .report import explain_run
from .saliency import Saliency, saliency, saliency_batch
from .split import encode_split, load_split

__all__ = [
    "Saliency",
    "calibration_report",
    "encode_split",
    "explain_run",
    "load_split",
    "modality_contribution",
    "permutation_contribution",
    "reliability",
    "saliency",
    "saliency_batch",
    "shapley_contribution",
    "shapley_example",
]
