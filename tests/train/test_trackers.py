"""train.report_to: the trackers log what metrics.jsonl holds (read back with each library's own reader), a
missing package is a config error before the run starts, and train.tensorboard stays an alias."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import tiny_model_dir
from sftlab.cli import main
from sftlab.config import load_config
from sftlab.errors import ConfigError
from sftlab.train import trackers

ROWS = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in [("Ping?", "Pong."), ("Hi!", "Hello there."), ("2+2?", "Four."), ("Sky?", "Blue.")]]


def _config(root: Path, *extra: str) -> Path:
    if not (root / "base").exists():
        tiny_model_dir(root / "base")
        (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    config = root / "config.yaml"
    config.write_text(f"model: {root / 'base'}\nmethod: lora\noutput_dir: {root / 'run'}\n"
                      f"data:\n  train: {root / 'train.jsonl'}\n  cache: false\n"
                      "lora:\n  rank: 4\ntrain:\n  max_steps: 4\n  micro_batch_size: 2\n" + "".join(extra),
                      encoding="utf-8")
    return config


def _losses(run: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return {line["step"]: line["loss"] for line in lines if "loss" in line}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """One run logging to tensorboard (by the old key) and, where mlflow is installed, to MLflow."""
    import importlib.util

    pytest.importorskip("tensorboard")
    root = tmp_path_factory.mktemp("trackers")
    mlflow = "  report_to: [mlflow]\n" if importlib.util.find_spec("mlflow") else ""
    assert main(["train", str(_config(root, "  tensorboard: true\n", mlflow))]) == 0
    return root / "run"


def test_tensorboard_by_its_old_key_logs_the_metrics_jsonl_values(run) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    logged = {event.step: event.value for event in events.Scalars("loss")}
    assert logged == pytest.approx(_losses(run), rel=1e-6) and len(logged) == 4
    assert "tensorboard" in json.loads((run / ".sftlab-manifest.json").read_text(encoding="utf-8"))["files"]


def test_mlflow_file_store_logs_the_metrics_jsonl_values_and_the_config(run) -> None:
    pytest.importorskip("mlflow")  # mlflow-skinny: not in the test extra (25 packages)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(run / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("sftlab")
    (found,) = client.search_runs([experiment.experiment_id])
    logged = {metric.step: metric.value for metric in client.get_metric_history(found.info.run_id, "loss")}
    assert logged == pytest.approx(_losses(run), rel=1e-6) and len(logged) == 4
    assert found.data.params["lora.rank"] == "4" and found.data.params["method"] == "lora"


def test_a_missing_tracker_package_is_a_config_error_before_the_run_starts(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(trackers.PACKAGES, "wandb", ("sftlab_no_such_module", "wandb"))
    assert main(["train", str(_config(tmp_path, "  report_to: wandb\n"))]) == 2
    err = capsys.readouterr().err
    assert "train.report_to: wandb needs the wandb package" in err and "pip install wandb" in err
    assert not (tmp_path / "run").exists()  # refused before the output dir, the data or the model
    monkeypatch.setitem(trackers.PACKAGES, "tensorboard", ("sftlab_no_such_module", "tensorboard"))
    with pytest.raises(ConfigError, match=r"train.tensorboard: tensorboard needs .* pip install tensorboard"):
        trackers.check(load_config(overrides=["train.tensorboard=true"]))


def test_an_unknown_tracker_is_refused_with_the_choices() -> None:
    with pytest.raises(ConfigError, match="'wandbb' is not a tracker .* tensorboard, wandb, mlflow, trackio"):
        load_config(overrides=["train.report_to=[wandbb]"])


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory) -> Path:
    """One run logging to W&B in offline mode and to trackio's local database (in a temporary dir)."""
    pytest.importorskip("wandb")
    pytest.importorskip("trackio")
    import trackio.sqlite_storage
    import trackio.utils

    root = tmp_path_factory.mktemp("offline-trackers")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        patch.setenv("WANDB_SILENT", "true")
        for key in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):  # nothing written in ~/
            patch.setenv(key, str(root / key.lower()))
        patch.setenv("TRACKIO_DIR", str(root / "trackio"))
        for module in (trackio.utils, trackio.sqlite_storage):  # read when trackio is imported
            patch.setattr(module, "TRACKIO_DIR", root / "trackio")
        assert main(["train", str(_config(root, "  report_to: [wandb, trackio]\n"))]) == 0
        yield root / "run"


def _wandb_history(path: Path) -> dict[int, dict[str, object]]:
    """step -> logged values, read from an offline run's .wandb file: a ':W&B' header, then LevelDB-log
    records (32 KiB blocks; each chunk has a 7-byte header: crc32, length, type) holding W&B's protobuf
    Records."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, block, pending, history = 7, 32768, b"", {}
    while position + 7 <= len(data):
        left = block - position % block
        length, kind = int.from_bytes(data[position + 4:position + 6], "little"), data[position + 6]
        if left < 7 or (length == 0 and kind == 0):  # the padding at the end of a block
            position += left
            continue
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                items = {item.key or ".".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item}
                history[int(items.get("_step", record.history.step.num))] = items
    return history


def test_wandb_offline_run_logs_the_metrics_jsonl_values_and_the_config(offline_run) -> None:
    (run_file,) = (offline_run / "wandb" / "wandb").glob("offline-run-*/run-*.wandb")  # `wandb sync` uploads it
    history = _wandb_history(run_file)
    logged = {step: items["loss"] for step, items in history.items() if "loss" in items}
    assert logged == pytest.approx(_losses(offline_run), rel=1e-6) and len(logged) == 4
    assert b"lora" in run_file.read_bytes()  # the config record


def test_trackio_local_database_logs_the_metrics_jsonl_values(offline_run) -> None:
    from trackio.sqlite_storage import SQLiteStorage

    logs = SQLiteStorage.get_logs("sftlab", "run")
    logged = {row["step"]: row["loss"] for row in logs if "loss" in row}
    assert logged == pytest.approx(_losses(offline_run), rel=1e-6) and len(logged) == 4
