"""The typed config: defaults, YAML + dotted overrides, and the errors a user sees for a bad key or value."""

from __future__ import annotations

import dataclasses
import doctest
import re
from pathlib import Path

import pytest

import sftlab.config
from sftlab.config import FORMATS, Config, DataConfig, load_config, to_dict
from sftlab.errors import ConfigError


def test_module_doctests_pass() -> None:
    result = doctest.testmod(sftlab.config)
    assert result.attempted >= 3
    assert result.failed == 0


def test_defaults() -> None:
    cfg = load_config()
    assert cfg == Config()
    assert (cfg.model.path, cfg.output_dir) == (None, "runs/run")
    assert to_dict(cfg.data) == {
        "train": None, "eval": None, "eval_fraction": 0.0, "format": "auto", "role_map": {}, "on_bad_row": "error",
        "template": "auto", "train_on": "assistant", "reasoning": "keep", "reasoning_turns": "rendered",
        "max_seq_len": None, "max_row_bytes": None, "truncation": "drop", "packing": False, "share_prefixes": True,
        "add_special_tokens": False, "special_tokens_in_content": "text", "cache_dir": None, "cache": True,
        "num_workers": "auto"}


def test_formats_match_the_literal_and_the_readers() -> None:
    from sftlab.data.formats import CONVERTERS

    assert ("auto", *CONVERTERS) == FORMATS
    assert typing_args(DataConfig, "format") == FORMATS


def typing_args(cls: type, name: str) -> tuple:
    import typing

    return typing.get_args(typing.get_type_hints(cls)[name])


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_yaml_file_then_overrides_win(tmp_path: Path) -> None:
    path = write(tmp_path, """
model: models/tiny
data:
  train: data/train.jsonl
  format: sharegpt
  role_map: {bot: assistant}
  max_seq_len: 1024
  on_bad_row: skip
""")
    cfg = load_config(path, ["data.max_seq_len=4096", "data.role_map.narrator=system", "output_dir=runs/x",
                             "data.add_special_tokens=true", "data.cache_dir=/tmp/c"])
    assert cfg.model.path == "models/tiny"
    assert cfg.output_dir == "runs/x"
    assert cfg.data.train == "data/train.jsonl"
    assert cfg.data.format == "sharegpt"
    assert cfg.data.on_bad_row == "skip"
    assert cfg.data.max_seq_len == 4096
    assert cfg.data.role_map == {"bot": "assistant", "narrator": "system"}
    assert cfg.data.add_special_tokens is True
    assert cfg.data.cache_dir == "/tmp/c"
    assert cfg.data.template == "auto"  # untouched keys keep their defaults


@pytest.mark.parametrize("text", ["", "# nothing yet\n", "data:\n", "data:\n  # train: x.jsonl\n"])
def test_empty_file_or_section_takes_defaults_and_overrides(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    assert load_config(path) == Config()
    assert load_config(path, ["data.format=alpaca"]).data.format == "alpaca"


@pytest.mark.parametrize(("yaml_text", "overrides"), [
    ("data:\n  max_seq_len: null\n", []),
    ("data:\n  max_seq_len: ~\n", []),
    ("", ["data.max_seq_len=null"]),
    ("", ["data.max_seq_len="]),
    ("data:\n  max_seq_len: 10\n", ["data.max_seq_len=null"]),
])
def test_max_seq_len_null_means_no_limit(tmp_path: Path, yaml_text: str, overrides: list[str]) -> None:
    assert load_config(write(tmp_path, yaml_text), overrides).data.max_seq_len is None


def test_override_values_are_parsed_as_yaml() -> None:
    cfg = load_config(overrides=["data.max_seq_len=512", "data.cache=false", "data.template=path/with=sign.jinja",
                                 "data.role_map={bot: assistant, human: user}"])
    assert cfg.data.max_seq_len == 512 and isinstance(cfg.data.max_seq_len, int)
    assert cfg.data.cache is False
    assert cfg.data.template == "path/with=sign.jinja"
    assert cfg.data.role_map == {"bot": "assistant", "human": "user"}


def test_last_override_wins() -> None:
    assert load_config(overrides=["data.train_on=all", "data.train_on=last_assistant"]).data.train_on == (
        "last_assistant")


@pytest.mark.parametrize(("overrides", "message"), [
    (["data.max_seq_lne=1"], "unknown key 'data.max_seq_lne': did you mean 'data.max_seq_len'?"),
    (["data.on_bad_rows=skip"], "unknown key 'data.on_bad_rows': did you mean 'data.on_bad_row'?"),
    (["dta.train=x.jsonl"], "unknown key 'dta': did you mean 'data'?"),
    (["modle=x"], "unknown key 'modle': did you mean 'model'?"),
    (["outptu_dir=x"], "unknown key 'outptu_dir': did you mean 'output_dir'?"),
])
def test_unknown_key_suggests_the_close_one(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides=overrides)
    assert str(info.value) == message


def test_unknown_key_in_yaml_suggests_too(tmp_path: Path) -> None:
    path = write(tmp_path, "data:\n  templat: chatml\n")
    with pytest.raises(ConfigError, match=r"unknown key 'data.templat': did you mean 'data.template'\?"):
        load_config(path)


def test_unknown_key_with_no_close_match_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["data.qqqqqqqq=1"])
    assert str(info.value).startswith("unknown key 'data.qqqqqqqq'; known keys: data.train, data.eval, ")
    assert "data.max_seq_len" in str(info.value)


@pytest.mark.parametrize(("overrides", "message"), [
    (["data.max_seq_len=abc"], "data.max_seq_len must be an integer, found 'abc'"),
    (["data.max_seq_len=1.5"], "data.max_seq_len must be an integer, found 1.5"),
    (["data.max_seq_len=true"], "data.max_seq_len must be an integer, found True"),
    (["data.max_seq_len=1"], "data.max_seq_len must be at least 2 or null (no limit), got 1"),
    (["data.max_seq_len=-1"], "data.max_seq_len must be at least 2 or null (no limit), got -1"),
    (["data.cache=1"], "data.cache must be true or false, found 1"),
    (["data.add_special_tokens='true'"], "data.add_special_tokens must be true or false, found 'true'"),
    (["output_dir=[a, b]"], "output_dir must be a string, found ['a', 'b']"),
    (["output_dir="], "output_dir must be a string, found None"),
    (["data=5"], "data must be a mapping, found 5"),
    (["data.role_map=[bot]"], "data.role_map must be a mapping, found ['bot']"),
    (["data.role_map.bot={a: 1}"], "data.role_map.bot must be a string, found {'a': 1}"),
    (["data.format=auto", "data.format.x=1"], "override data.format.x: format is a value, not a section"),
    (["data.max_seq_len"], "override 'data.max_seq_len' must look like key=value, e.g. data.max_seq_len=1024"),
    (["=3"], "override '=3' must look like key=value"),
])
def test_wrong_types(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides=overrides)
    assert str(info.value).startswith(message)


@pytest.mark.parametrize(("key", "value", "choices"), [
    ("format", "chatgpt", "auto, messages, prompt_completion, alpaca, sharegpt"),
    ("on_bad_row", "drop", "error, skip"),
    ("train_on", "user", "assistant, last_assistant, all"),
    ("truncation", "cut", "drop, truncate"),
    ("train_on", "Assistant", "assistant, last_assistant, all"),
])
def test_bad_literal_values_list_the_choices(key: str, value: str, choices: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[f"data.{key}={value}"])
    assert str(info.value) == f"data.{key} must be one of {choices}; found {value!r}"


@pytest.mark.parametrize(("role_map", "ok"), [
    ({"bot": "assistant", "human": "user", "narrator": "system", "function_response": "tool"}, True),
    ({"bot": "robot"}, False),
    ({"bot": "Assistant"}, False),
    ({"bot": "tools"}, False),
])
def test_role_map_targets_must_be_known_roles(role_map: dict[str, str], ok: bool) -> None:
    overrides = [f"data.role_map.{k}={v}" for k, v in role_map.items()]
    if ok:
        assert load_config(overrides=overrides).data.role_map == role_map
        return
    [(source, target)] = role_map.items()
    with pytest.raises(ConfigError) as info:
        load_config(overrides=overrides)
    assert str(info.value) == (f"data.role_map maps {source!r} to {target!r}; expected one of system, user, "
                               "assistant, tool")
    with pytest.raises(ConfigError):
        DataConfig(role_map=role_map)  # the dataclass checks itself, not only load_config


@pytest.mark.parametrize(("text", "fragment"), [
    ("- a\n- b\n", "expected a mapping of keys at the top level, found list"),
    ("data: [\n", "not valid YAML"),
    ("data: 3\n", "data must be a mapping, found 3"),
])
def test_bad_yaml_files(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert fragment in str(info.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file .*nope.yaml does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_config_is_frozen_and_round_trips_through_to_dict(tmp_path: Path) -> None:
    cfg = load_config(overrides=["model=m", "data.role_map.bot=assistant", "data.max_seq_len=null"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.data.max_seq_len = 5  # type: ignore[misc]
    import yaml

    path = write(tmp_path, yaml.safe_dump(to_dict(cfg)))
    assert load_config(path) == cfg


def test_load_config_does_not_edit_the_callers_overrides() -> None:
    overrides = ["data.format=alpaca"]
    load_config(overrides=overrides)
    assert overrides == ["data.format=alpaca"]


def test_model_shorthand_and_sections_combine(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model: models/tiny\nmethod: full\n", encoding="utf-8")
    cfg = load_config(path, ["model.dtype=float32"])
    assert (cfg.model.path, cfg.model.dtype, cfg.method) == ("models/tiny", "float32", "full")
    path.write_text("model:\n  path: a\n  dtype: bfloat16\n", encoding="utf-8")
    cfg = load_config(path, ["model=b"])
    assert (cfg.model.path, cfg.model.dtype) == ("b", "bfloat16")


def test_resolved_config_round_trips_through_yaml(tmp_path) -> None:
    from sftlab.config import to_yaml

    cfg = load_config(overrides=["model=m", "lora.targets=[q_proj, v_proj]", "train.betas=[0.9, 0.95]",
                                 "data.role_map.bot=assistant"])
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(cfg), encoding="utf-8")
    assert load_config(path) == cfg


@pytest.mark.parametrize("override, message", [
    ("lora.rank=0", "lora.rank must be a positive integer"),
    ("lora.dropout=1.5", "lora.dropout must be in [0, 1)"),
    ("train.micro_batch_size=0", "train.micro_batch_size must be at least 1"),
    ("train.lr=0", "train.lr must be positive"),
    ("method=qlora2", "method must be one of full, lora, qlora, adapter, prompt, ptuning, prefix"),
    ("train.schedule=cosin", "train.schedule must be one of cosine, linear, constant"),
])
def test_training_sections_validate(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(overrides=[override])


@pytest.mark.parametrize("overrides, message", [
    (["data.packing=true", "method=prompt"], "data.packing=true cannot be used with method prompt"),
    (["data.packing=true", "method=prefix"], "data.packing=true cannot be used with method prefix"),
])
def test_packing_combinations_that_cannot_work_are_refused(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(overrides=overrides)
    assert load_config(overrides=["data.packing=true", "method=adapter"]).data.packing


@pytest.mark.parametrize("path",
                         sorted((Path(__file__).resolve().parent.parent / "examples" / "configs").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_every_example_config_loads(path: Path) -> None:
    from sftlab.methods import METHODS

    cfg = load_config(path)
    assert cfg.method in METHODS and cfg.data.train
