"""Experiment trackers through accelerate (TensorBoard, W&B, MLflow, Comet, Aim, ClearML, DVCLive): which one a
config asks for, refusing one that is not installed, and the run's name and hyper-parameters for it."""

from __future__ import annotations

from pathlib import Path

from ..config import Config
from ..errors import ConfigError

_TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet_ml",
                     "aim": "aim", "clearml": "clearml", "dvclive": "dvclive"}


def resolve_tracker(choice: str | None):
    """`auto`: TensorBoard when installed, else none; a named tracker must be installed."""
    from accelerate.utils import imports

    if choice == "auto":
        return "tensorboard" if imports.is_tensorboard_available() else None
    if choice is not None and not getattr(imports, f"is_{choice}_available")():
        raise ConfigError(f"`train.tracker={choice}` but {_TRACKER_PACKAGES[choice]} is not installed: "
                          f"`pip install {_TRACKER_PACKAGES[choice]}`, or set `train.tracker=null` for no tracker.")
    return choice


def tracker_init_kwargs(cfg: Config) -> dict:
    """The run's name for the trackers that take one (TensorBoard logs under `logs/<train.project>`)."""
    name = cfg.train.run_name or Path(cfg.train.output_dir).resolve().name
    return {"wandb": {"name": name}, "mlflow": {"run_name": name}, "comet_ml": {"experiment_name": name},
            "aim": {"experiment": name}}


def flat_config(tree: dict, prefix: str = "") -> dict:
    """Nested config as flat scalar hyper-parameters, as trackers want them."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_config(value, name + "."))
        else:
            flat[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat
