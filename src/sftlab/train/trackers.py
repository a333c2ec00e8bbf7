"""Experiment trackers (train.report_to): each gets the scalars of every metrics.jsonl line at its step, and
the resolved config once, from rank 0 only (MetricsLog, which only rank 0 opens, drives them).

A tracker whose package is missing is a ConfigError before any data or weights are read (`check`), naming
the pip install: never a run that silently logs nothing. What a tracker writes in the run dir (tensorboard/,
wandb/, mlruns/) is recorded in the run's manifest first, like every file of the run.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from sftlab import files
from sftlab.config import Config, ConfigError, to_dict

PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "mlflow": ("mlflow", "mlflow"), "trackio": ("trackio", "trackio")}
"""Tracker -> (module it imports, the pip package that provides it)."""
RUN_DIRS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlruns"}
"""Tracker -> the entry it writes in the run dir (trackio keeps its own local database)."""


def requested(cfg: Config) -> list[str]:
    """The trackers the config asks for; train.tensorboard=true is an alias of tensorboard."""
    names = list(dict.fromkeys(cfg.train.report_to))
    if cfg.train.tensorboard and "tensorboard" not in names:
        names.append("tensorboard")
    return names


def check(cfg: Config) -> None:
    """Refuse, before the run starts, a tracker whose package is not installed."""
    for name in requested(cfg):
        module, package = PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            key = "train.tensorboard" if name == "tensorboard" and "tensorboard" not in cfg.train.report_to \
                else "train.report_to"
            raise ConfigError(f"{key}: {name} needs the {package} package, which is not installed here: "
                              f"pip install {package} (or leave {name} out of {key}).")


def run_entries(cfg: Config) -> list[str]:
    """The run-dir entries the config's trackers write (for the run's planned files)."""
    return [RUN_DIRS[name] for name in requested(cfg) if name in RUN_DIRS]


class Tracker:
    def log(self, step: int, scalars: dict[str, float]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class TensorBoard(Tracker):
    def __init__(self, cfg: Config, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(files.owned(run_dir, "tensorboard")))
        self.writer.add_text("config", f"```\n{_config_text(cfg)}\n```")

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class WandB(Tracker):
    """A W&B run in OUTPUT/wandb; online or offline as WANDB_MODE says (offline: `wandb sync` it later)."""

    def __init__(self, cfg: Config, run_dir: Path) -> None:
        import wandb

        where = files.owned(run_dir, "wandb")
        where.mkdir(exist_ok=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "sftlab"), name=run_dir.name, dir=str(where),
                              config=to_dict(cfg), reinit="finish_previous")

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflow(Tracker):
    """An MLflow run at MLFLOW_TRACKING_URI, else in a local file store OUTPUT/mlruns (`mlflow ui
    --backend-store-uri OUTPUT/mlruns` shows it)."""

    def __init__(self, cfg: Config, run_dir: Path) -> None:
        import mlflow

        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            # The file store needs no server nor database package (mlflow-skinny has neither); MLflow 3 keeps it
            # behind this opt-in, which applies to the store chosen here only.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri(files.owned(run_dir, "mlruns").resolve().as_uri())
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "sftlab"))
        self.run = mlflow.start_run(run_name=run_dir.name)
        mlflow.log_params({key: str(value)[:500] for key, value in _flat(to_dict(cfg)).items()})

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.mlflow.log_metrics(scalars, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


class Trackio(Tracker):
    def __init__(self, cfg: Config, run_dir: Path) -> None:
        import trackio

        self.trackio = trackio
        trackio.init(project=os.environ.get("TRACKIO_PROJECT", "sftlab"), name=run_dir.name, config=to_dict(cfg))

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.trackio.log(scalars, step=step)

    def close(self) -> None:
        self.trackio.finish()


TRACKERS: dict[str, type[Tracker]] = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow,
                                      "trackio": Trackio}


def open_trackers(cfg: Config, run_dir: Path) -> list[Tracker]:
    check(cfg)
    return [TRACKERS[name](cfg, Path(run_dir)) for name in requested(cfg)]


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics.jsonl line, without its step (bools are flags, not scalars)."""
    return {key: value for key, value in record.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}


def _config_text(cfg: Config) -> str:
    from sftlab.config import to_yaml

    return to_yaml(cfg)


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat
