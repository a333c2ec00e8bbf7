"""One registry entry per method (methods/registry.py) and per export format (export/registry.py): what the rest
of sftlab asks instead of comparing names. config.py cannot import methods/ (a lower floor), so the facts it
keeps for its own checks (the sections each method reads, the methods that refuse packing) are held equal to
the entries' here."""

from __future__ import annotations

import pytest

from sftlab.config import METHOD_SECTIONS, SOFT_PROMPT_METHODS
from sftlab.config import METHODS as CONFIG_METHODS
from sftlab.errors import ConfigError
from sftlab.export import FORMATS
from sftlab.methods import METHODS, method_class


def test_every_config_method_has_one_entry_and_the_same_facts() -> None:
    assert tuple(METHODS) == CONFIG_METHODS
    for name, entry in METHODS.items():
        assert entry.name == name
        assert entry.sections == METHOD_SECTIONS[name], name
        assert entry.packing == (name not in SOFT_PROMPT_METHODS), name


def test_every_method_names_an_export_format_with_a_writer_and_a_reader() -> None:
    for entry in METHODS.values():
        fmt = FORMATS[entry.export_format]
        assert fmt.save is not None
        assert (fmt.load is None) == entry.whole_model  # a plain model dir loads as a model, not onto one
        assert entry.export_dir() == ("model" if entry.whole_model else "adapter")
    assert {e.export_format for e in METHODS.values()} == set(FORMATS)  # no format without a method


def test_an_unknown_method_is_refused_with_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"method 'dora' is not available .* use one of full, lora, qlora"):
        method_class("dora")


def test_only_a_quantised_base_loads_in_nf4() -> None:
    from sftlab.config import load_config

    cfg = load_config(overrides=["method=qlora", "qlora.block_size=32"])
    spec = method_class("qlora").nf4(cfg)
    assert spec is not None and spec.block_size == 32
    assert all(entry.nf4(cfg) is None for name, entry in METHODS.items() if name != "qlora")
