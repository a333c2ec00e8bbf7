"""Every number is checked when the config is read: finite, in range, an integer where one is meant; NaN
(which passes every `<=` check) and infinities are refused by name before any weights load. The same for
generate/chat's sampling settings, lora.rank against the layers' widths, and YAML that expands without
bound (an alias bomb) or values too long to quote whole."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest
import torch

from conftest import tiny_model_dir
from sftlab.cli import main
from sftlab.config import MAX_YAML_VALUES, load_config
from sftlab.errors import ConfigError

GOOD = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("model"))


@pytest.fixture
def no_weights(monkeypatch):
    """Any attempt to load model weights fails the test."""
    import transformers

    from sftlab import runs
    from sftlab.train import setup

    def trap(*args, **kwargs):
        raise AssertionError("model weights were read before the settings were checked")

    monkeypatch.setattr(setup, "load_model", trap)
    monkeypatch.setattr(runs, "load_for_inference", trap)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", trap)


def train(tmp_path: Path, model_dir: Path, capsys, *overrides: str,
          config_text: str = "method: lora\n") -> tuple[int, str]:
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps(GOOD) + "\n", encoding="utf-8")
    config = tmp_path / "config.yaml"
    config.write_text(config_text, encoding="utf-8")
    code = main(["train", str(config), f"model={model_dir}", f"data.train={data}", f"output_dir={tmp_path / 'run'}",
                 "data.cache=false", *overrides])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err.replace("\n", "")


NUMBER_CASES = {
    "lr-nan": (["train.lr=.nan"], "train.lr must be a finite number, found nan"),
    "lr-nan-word": (["train.lr=nan"], "train.lr must be a finite number, found 'nan'"),
    "lr-inf": (["train.lr=.inf"], "train.lr must be a finite number, found inf"),
    "lr-overflow": (["train.lr=1e999"], "train.lr must be a finite number, found '1e999'"),
    "lr-huge-int": ([f"train.lr={10 ** 400}"], "train.lr must be a finite number"),
    "epochs-nan": (["train.epochs=.nan"], "train.epochs must be a finite number, found nan"),
    "epochs-nan-with-max-steps": (["train.epochs=.nan", "train.max_steps=5"], "train.epochs must be a finite number"),
    "epochs-negative": (["train.epochs=-1"], "train.epochs must be positive and finite, got -1.0"),
    "seed-negative": (["train.seed=-1"], "train.seed must be an integer in [0, 2**32), got -1"),
    "seed-1e23": (["train.seed=1e23"], "train.seed must be an integer, found '1e23'"),
    "seed-1e23-float": (["train.seed=1.0e+23"], "train.seed must be an integer, found 1e+23"),
    "seed-2-32": ([f"train.seed={2 ** 32}"], "train.seed must be an integer in [0, 2**32), got 4294967296"),
    "seed-5000-digits": (["train.seed=" + "9" * 5000], "override 'train.seed': a value cannot be read"),
    "alpha-nan": (["lora.alpha=nan"], "lora.alpha must be a finite number, found 'nan'"),
    "alpha-inf": (["lora.alpha=-.inf"], "lora.alpha must be a finite number, found -inf"),
    "dropout-nan": (["lora.dropout=.nan"], "lora.dropout must be a finite number"),
    "max-grad-norm-inf": (["train.max_grad_norm=.inf"], "train.max_grad_norm must be a finite number"),
    "weight-decay-nan": (["train.weight_decay=.nan"], "train.weight_decay must be a finite number"),
    "betas-nan": (["train.betas=[.nan, 0.9]"], "train.betas must be a finite number"),
    "eval-fraction-nan": (["data.eval_fraction=.nan"], "data.eval_fraction must be a finite number"),
    "max-steps-past-int64": ([f"train.max_steps={2 ** 70}"], "train.max_steps must be an integer below 2**63"),
    "rank-a-float": (["lora.rank=8.5"], "lora.rank must be an integer, found 8.5"),
    "rank-a-bool": (["lora.rank=true"], "lora.rank must be an integer, found True"),
    "micro-batch-a-list": (["train.micro_batch_size=[4]"], "train.micro_batch_size must be an integer, found [4]"),
    "dpo-beta-nan": (["stage=dpo", "dpo.beta=.nan"], "dpo.beta must be a finite number"),
    "block-size-zero": (["method=qlora", "qlora.block_size=0"], "qlora.block_size must be a positive even integer"),
    "targets-empty": (["lora.targets=[]"], "lora.targets is empty"),
}


@pytest.mark.parametrize("case", list(NUMBER_CASES))
def test_a_bad_number_is_a_config_error_naming_the_key_before_weights_load(case, tmp_path, model_dir, capsys,
                                                                           no_weights) -> None:
    overrides, named = NUMBER_CASES[case]
    code, err = train(tmp_path, model_dir, capsys, *overrides)
    assert code == 2
    assert named in err, err
    assert len(err) < 2000


def test_the_defaults_and_edges_still_load() -> None:
    cfg = load_config(overrides=["train.seed=0", f"train.seed={2 ** 32 - 1}", "train.lr=1e-4", "lora.alpha=1.0e+3"])
    assert (cfg.train.seed, cfg.train.lr, cfg.lora.alpha) == (2 ** 32 - 1, 1e-4, 1000.0)


def test_lora_rank_wider_than_a_target_layer_is_refused_naming_it_before_weights_load(tmp_path, model_dir, capsys,
                                                                                     no_weights) -> None:
    # The tiny llama: hidden 64, 4 heads of 16, 2 key/value heads -> k_proj and v_proj are 64 in, 32 out.
    code, err = train(tmp_path, model_dir, capsys, "lora.rank=33")
    assert code == 2
    assert "lora.rank=33 is larger than the layer model.layers.0.self_attn.k_proj (64 in, 32 out features)" in err, err
    assert "Set lora.rank to 32 or less" in err


def test_lora_rank_equal_to_the_narrowest_layer_and_narrow_targets_are_accepted(model_dir) -> None:
    from sftlab.methods import METHODS
    from sftlab.models.load import skeleton

    model = skeleton(load_config(overrides=[f"model={model_dir}"]).model)
    assert model is not None and next(model.parameters()).device.type == "meta"  # no weights read
    METHODS["lora"](load_config(overrides=["lora.rank=32"])).check_layers(model)
    METHODS["lora"](load_config(overrides=["lora.rank=64", "lora.targets=[q_proj]"])).check_layers(model)
    with pytest.raises(ConfigError, match="q_proj"):
        METHODS["lora"](load_config(overrides=["lora.rank=65", "lora.targets=[q_proj]"])).check_layers(model)


@pytest.mark.parametrize(("option", "value", "named"), [
    ("--temperature", "nan", "temperature (--temperature) must be 0 (greedy) or a positive finite number; found nan"),
    ("--temperature", "-0.5", "found -0.5"),
    ("--temperature", "inf", "found inf"),
    ("--top-p", "nan", "top_p (--top-p) must be in (0, 1]; found nan"),
    ("--top-p", "0", "top_p (--top-p) must be in (0, 1]; found 0.0"),
    ("--top-p", "1.5", "found 1.5"),
    ("--max-new-tokens", "0", "max_new_tokens (--max-new-tokens) must be at least 1; found 0"),
    ("--seed", "-1", "seed (--seed) must be an integer in [0, 2**32); found -1"),
    ("--seed", str(2 ** 64), "found 18446744073709551616"),
])
@pytest.mark.parametrize("command", ["generate", "chat"])
def test_sampling_settings_are_refused_before_the_model_loads(command, option, value, named, model_dir, capsys,
                                                              no_weights) -> None:
    prompt = ["--prompt", "Hi"] if command == "generate" else []
    code = main([command, str(model_dir), *prompt, option, value])
    err = capsys.readouterr().err.replace("\n", "")
    assert code == 2 and "Traceback" not in err
    assert named in err, err


def test_max_new_tokens_is_cut_to_the_positions_the_prompt_leaves(model_dir, capsys) -> None:
    from sftlab.generate import sample

    model = __import__("transformers").AutoModelForCausalLM.from_pretrained(model_dir)
    prompt = list(range(5, 25))  # 20 tokens
    model.config.max_position_embeddings = 23
    new = sample(model, prompt, stop_ids=[], max_new_tokens=500, temperature=0.0)
    assert len(new) == 3  # the 3 positions left, not 500
    assert "max_new_tokens 500 cut to 3: the prompt takes 20 of the model's 23 positions" in capsys.readouterr().err
    model.config.max_position_embeddings = 20
    with pytest.raises(ConfigError, match="the prompt is 20 tokens, and the model takes at most 20 positions"):
        sample(model, prompt, stop_ids=[], max_new_tokens=5, temperature=0.0)
    model.config.max_position_embeddings = 64
    assert len(sample(model, prompt, stop_ids=[], max_new_tokens=4, temperature=0.0)) == 4  # room: unchanged
    assert capsys.readouterr().err == ""


BOMB = "".join(f"{a}: &{a} [{', '.join([f'*{p}'] * 9 if p else ['lol'] * 9)}]\n"
               for p, a in zip(["", *"abcdefgh"], "abcdefghi"))
"""9 lines, under 400 bytes, that expand to 9**9 (387 million) strings."""


def test_a_yaml_alias_bomb_is_refused_quickly_in_little_memory(tmp_path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB, encoding="utf-8")
    assert len(BOMB) < 432
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError) as caught:
            load_config(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(caught.value)
    assert f"{path}: refused: line " in message and f"more than {MAX_YAML_VALUES:,} values" in message
    assert len(message) < 500 and peak < 20_000_000, (len(message), peak)


def test_a_yaml_alias_bomb_in_an_override_is_refused_too() -> None:
    value = "[" + ", ".join(["&a [x, x, x, x, x, x, x, x, x, x]"] + ["&b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]"]
                            + ["[*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]"] * 10) + "]"
    with pytest.raises(ConfigError, match="override 'data.role_map': refused: .* more than 10,000 values"):
        load_config(overrides=[f"data.role_map={value}"])


def test_modest_aliases_still_work(tmp_path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("x_betas: &b [0.9, 0.95]\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="unknown key 'x_betas'"):
        load_config(path)
    path.write_text("train: &t {lr: 0.001, betas: [0.9, 0.95]}\ndpo: {}\n", encoding="utf-8")
    assert load_config(path).train.betas == (0.9, 0.95)


def test_an_alias_cycle_is_refused(tmp_path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("train: &t {betas: *t}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="an alias refers to a value that contains it"):
        load_config(path)


@pytest.mark.parametrize("value", ["x" * 100_000, "[" + ", ".join(["1"] * 5_000) + "]",
                                   "{" + ", ".join(f"k{i}: {i}" for i in range(3_000)) + "}"])
def test_a_huge_value_is_quoted_shortened_with_a_count(value) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(overrides=[f"data.train_on={value}"])
    message = str(caught.value)
    assert message.startswith("data.train_on must be one of") and len(message) < 600, message[:1000]
    assert any(f"{n:,} " in message for n in (100_000, 5_000, 3_000)), message


def test_a_config_file_that_is_not_text_or_too_big_is_named(tmp_path) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(b"train:\n  lr: \xff\xfe\n")
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_config(path)
    path.write_text("#" * (2 << 20), encoding="utf-8")
    with pytest.raises(ConfigError, match="a config is at most"):
        load_config(path)


def test_sampling_check_is_part_of_generate_too(model_dir) -> None:
    from sftlab.generate import generate

    with pytest.raises(ConfigError, match="temperature"):
        generate(torch.nn.Linear(1, 1), None, None, [], temperature=float("nan"))


def test_shown_bounds_every_value_it_quotes() -> None:
    import doctest

    import sftlab.errors
    from sftlab.errors import SHOWN_CHARS, shown

    assert doctest.testmod(sftlab.errors).failed == 0
    nested: list = [1]
    for _ in range(40):
        nested = [nested] * 9  # 9**40 leaves through shared references: repr() would never finish
    for value in (nested, "y" * 10**6, list(range(10**5)), {str(i): i for i in range(10**4)}, 10**4000, -(10**5000)):
        assert len(shown(value)) < SHOWN_CHARS + 80, shown(value)
    assert shown("[/]") == "'[/]'" and shown(1.5) == "1.5"


def test_chat_says_when_the_conversation_fills_the_context_and_keeps_the_session(model_dir) -> None:
    import transformers

    from sftlab.data.templates import load_template
    from sftlab.generate import chat_repl, prompt_ids

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    template = load_template("chatml", tokenizer)
    short = len(prompt_ids(tokenizer, template, [{"role": "user", "content": "Hi"}]))
    model.config.max_position_embeddings = short + 2
    printed: list[str] = []
    lines = iter(["Hi", "a much longer question than the model has room for", "/reset", "Hi", "/exit"])
    final = chat_repl(model, tokenizer, template, temperature=0, max_new_tokens=2, input_fn=lambda _: next(lines),
                      print_fn=lambda *a: printed.append(" ".join(map(str, a))))
    refused = [line for line in printed if "no room to answer" in line]
    assert len(refused) == 1 and "(in chat: /reset)" in refused[0]
    assert [m["content"] for m in final if m["role"] == "user"] == ["Hi"]  # the refused question is not kept
