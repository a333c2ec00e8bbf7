"""Fuzzing (hypothesis) of the config: any value for any key — NaN, ±inf, huge or negative numbers, integers
of hundreds of digits, wrong types (lists, dicts, strings, bools, null), markup like `[/]` and `[bold]`,
broken YAML — given as a YAML file, as a `key=value` override or as plain data, loads into a Config or
fails with a `ConfigError` naming the key, in a bounded message; never another exception.

The keys are enumerated from the config dataclasses, so a new key is fuzzed without touching this file.
CI runs a fixed (derandomized) sample; SFTLAB_PROPERTY_EXAMPLES=5000 searches deeper.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sftlab.config import Config, build, load_config
from sftlab.errors import ConfigError

EXAMPLES = int(os.environ.get("SFTLAB_PROPERTY_EXAMPLES", "0"))
FUZZ: dict[str, Any] = {"deadline": None, "derandomize": True, "database": None,
                        "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large,
                                                  HealthCheck.function_scoped_fixture]}
MAX_MESSAGE_CHARS = 2000


def fuzz(default_examples: int) -> Any:
    return settings(max_examples=EXAMPLES or default_examples, **FUZZ)


def config_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key of the config tree, sections included (`lora`, `lora.rank`, ...)."""
    keys = []
    hints = typing.get_type_hints(cls)
    written = {name: key for key, name in getattr(cls, "ALIASES", {}).items()}  # orpo.lambda, not its field lambda_
    for field in dataclasses.fields(cls):
        keys.append(prefix + written.get(field.name, field.name))
        if dataclasses.is_dataclass(hints[field.name]):
            keys += config_keys(hints[field.name], f"{prefix}{field.name}.")
    return keys


KEYS = config_keys()
MARKUP = ("[/]", "[bold]", "[bold]x[/bold]", "[red]", "[/red]", "[link=file:///etc/passwd]x[/link]", "[name]",
          "\\[x]", "[", "]", "[[x]]", ":smile:", "[on red]")
EDGES = (math.nan, math.inf, -math.inf, -0.0, 1e308, 5e-324, -1, 0, 1, 2, 2**31, 2**32, 2**32 - 1, 2**63,
         -(2**63), 2**64, 10**30, 10**400, -(10**400), 1e23, True, False, None, "", " ", "nan", ".nan", "inf",
         "-inf", "1e999", "1e23", "-1", "0x10", "null", "yes", "~", "all-linear", "lora", "x" * 3000)

scalars = st.one_of(
    st.sampled_from(EDGES), st.sampled_from(MARKUP),
    st.integers(), st.integers(min_value=-(10**500), max_value=10**500),
    st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none(),
    st.text(max_size=20), st.text(alphabet="[]/ab=: ", max_size=12))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.one_of(st.sampled_from(MARKUP), st.text(max_size=6)),
                                                 inner, max_size=3)), max_leaves=8)


def yaml_text(value: Any) -> str:
    """`value` as one line of YAML (flow style), as a user would write it after `key=`."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9, allow_unicode=True)
    return text.removesuffix("\n").removesuffix("\n...").strip()


def nested(key: str, value: Any) -> dict[str, Any]:
    """{'a': {'b': value}} for key 'a.b'."""
    tree: Any = value
    for part in reversed(key.split(".")):
        tree = {part: tree}
    return tree


def check(load: Any, keys: list[str]) -> None:
    """`load()` gives a Config or a ConfigError naming one of `keys` in a bounded message."""
    try:
        result = load()
    except ConfigError as exc:
        message = str(exc)
        assert any(key in message for key in keys), f"{message[:500]!r} names none of {keys}"
        assert len(message) <= MAX_MESSAGE_CHARS, f"a message of {len(message):,} characters"
        return
    assert isinstance(result, Config)
    for key, value in leaves(dataclasses.asdict(result)):  # what loads is in range: no NaN slipped past a `<=`
        if isinstance(value, float):
            assert math.isfinite(value), (key, value)
        if isinstance(value, int) and not isinstance(value, bool):
            assert -(2**63) < value < 2**63, (key, value)
    assert 0 <= result.train.seed < 2**32


def leaves(tree: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(tree, dict):
        return [leaf for key, value in tree.items() for leaf in leaves(value, f"{prefix}{key}.")]
    if isinstance(tree, (list, tuple)):
        return [leaf for value in tree for leaf in leaves(value, prefix)]
    return [(prefix.rstrip("."), tree)]


@fuzz(150)
@given(key=st.sampled_from(KEYS), value=values, how=st.sampled_from(["data", "override", "yaml-file"]))
def test_any_value_for_any_key_loads_or_is_a_config_error_naming_it(key, value, how, tmp_path_factory) -> None:
    if how == "data":  # plain Python data, as a YAML file would have loaded it
        check(lambda: build(Config, nested(key, value), prefix=""), [key])
    elif how == "override":
        check(lambda value=value: load_config(overrides=[f"{key}={yaml_text(value)}"]), [key])
    else:
        path = Path(tmp_path_factory.mktemp("cfg")) / "config.yaml"
        path.write_text(yaml.safe_dump(nested(key, value), allow_unicode=True), encoding="utf-8")
        check(lambda: load_config(path), [key, str(path)])


@fuzz(100)
@given(key=st.sampled_from(KEYS),
       text=st.one_of(st.text(max_size=30), st.text(alphabet="[]{}&*!|>:,-'\" \nab1.", max_size=30)))
def test_any_text_after_key_equals_is_a_value_or_a_config_error_naming_the_key(key, text) -> None:
    check(lambda: load_config(overrides=[f"{key}={text}"]), [key])


@fuzz(100)
@given(assignments=st.lists(st.tuples(st.sampled_from(KEYS), values), min_size=2, max_size=5,
                            unique_by=lambda item: item[0]))
def test_several_keys_at_once_fail_naming_one_of_them(assignments) -> None:
    overrides = [f"{key}={yaml_text(value)}" for key, value in assignments]
    keys = [key for key, _ in assignments]
    # A section set whole and then one of its keys (or the reverse) is refused naming either.
    check(lambda: load_config(overrides=overrides), keys + [key.split(".")[0] for key in keys])


@pytest.mark.parametrize("key", KEYS)
def test_every_key_refuses_markup_nan_and_a_huge_integer_or_takes_them(key) -> None:
    for value in (*MARKUP, math.nan, -math.inf, 10**400, [math.nan], {"[/]": "[bold]"}):
        check(lambda value=value: load_config(overrides=[f"{key}={yaml_text(value)}"]), [key])
