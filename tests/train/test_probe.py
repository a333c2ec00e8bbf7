"""The forgetting probe: the reference is the base's, probe_kl starts at exactly 0 for every method family, a
resumed run reads the same reference back, full fine-tuning at a high learning rate drifts far more than gentle
LoRA, and bad probe files fail with file:line."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

from conftest import only_for, tiny_model_dir
from sftlab.config import load_config
from sftlab.errors import ConfigError, DataError
from sftlab.models.decoding import candidates, common_prefix
from sftlab.runs import prepare, train
from sftlab.train.checkpoint import TrainState
from sftlab.train.forgetting import RunProbe, Watch
from sftlab.train.probe import BUILTIN, TEMPERATURE, TOP_P, read_prompts, tax_numbers, top_k_kl
from sftlab.train.setup import pad_id

QUIET = Console(quiet=True)
PROMPTS = [("What is the capital of France?", False), ("Say hello.", True), ("What is 2+2?", False),
           ("Imagine two magic dice.", True), ("Explain quantum entanglement like I'm five.", True),
           ("How can I help you today?", False)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("model"), init_range=0.2)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("data")
    data, probe = root / "train.jsonl", root / "probe.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"What is {i}+{i}?"},
                          {"role": "assistant", "content": f"It is {2 * i}."}]} for i in range(24)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    probe.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}], "open": o}) + "\n"
                             for q, o in PROMPTS), encoding="utf-8")
    return data, probe


def config(model_dir: Path, files: tuple[Path, Path], out: Path, *overrides: str):
    data, probe = files
    return load_config(overrides=[f"model={model_dir}", f"data.train={data}", f"output_dir={out}", "data.cache=false",
                                  f"eval.probe={probe}", "eval.probe_max_new_tokens=10", *overrides])


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_the_builtin_set_has_about_a_hundred_varied_prompts_ending_with_the_user() -> None:
    prompts = read_prompts("builtin")
    rows = [json.loads(line) for line in BUILTIN.read_text(encoding="utf-8").splitlines()]
    assert 90 <= len(prompts) <= 120 and len({p.id for p in prompts}) == len(prompts)
    assert {r["kind"] for r in rows} == {"fact", "instruction", "writing", "arithmetic", "code", "multilingual",
                                         "advice"}
    assert 25 <= sum(p.open for p in prompts) <= 60
    assert all(p.messages[-1]["role"] == "user" for p in prompts)


@pytest.mark.parametrize("method", ["lora", "dora", "full", "prompt", "prefix", "adapter"])
def test_probe_kl_is_exactly_zero_at_step_0(model_dir, files, tmp_path, method) -> None:
    name, extra = ("lora", ["lora.dora=true"]) if method == "dora" else (method, [])
    cfg = config(model_dir, files, tmp_path / method, *only_for(name, f"method={name}", "train.max_steps=1",
                                                                 "prompt.num_virtual_tokens=4",
                                                                 "prefix.num_virtual_tokens=4", *extra))
    setup = prepare(cfg, console=QUIET)
    probe = RunProbe.start(setup, tmp_path / method, QUIET, TrainState(), pad_id=pad_id(setup.tokenizer))
    # adapters that start as the identity take the top-k while decoding; soft prompts (random at step 0) score
    assert probe.reference.scored_by == ("score" if method in ("prompt", "prefix") else "decode")
    found = probe.prober.measure(probe.reference, generate=True)  # soft prompts decode through their prefill
    assert found["probe_kl"] == 0.0
    assert len(found["samples"]) == 3 and 0 < found["probe_length"] <= 10
    assert found["probe_nll"] == probe.reference.base["probe_nll"]
    assert len(probe.reference.answer_ids) == len(PROMPTS) and all(probe.reference.answer_ids)
    # an eval point's measure runs the greedy rows without the sampled ones beside them: the same numbers, but a
    # batch of other rows may round a step differently, so only to float rounding
    unsampled = probe.prober.measure(probe.reference, generate=False)
    assert unsampled["probe_kl"] == pytest.approx(0.0, abs=1e-6)
    assert unsampled["probe_nll"] == pytest.approx(found["probe_nll"], rel=1e-5)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_the_top_k_taken_while_decoding_are_a_scoring_forwards(model_dir, files, tmp_path, method) -> None:
    """The reference's top-k, taken at each greedy decoding step against a KV cache, against an independent
    forward over prompt + answer (Prober.score): the same log-probs to float rounding, the greedy token first."""
    setup = prepare(config(model_dir, files, tmp_path / method, f"method={method}", "train.max_steps=1"),
                    console=QUIET)
    probe = RunProbe.start(setup, tmp_path / method, QUIET, TrainState(), pad_id=pad_id(setup.tokenizer))
    reference, prober = probe.reference, probe.prober
    assert reference.scored_by == "decode"
    nll, top_ids, top_logps = prober.score(reference.prompt_ids, reference.answer_ids,
                                           keep_top=setup.config.eval.probe_top_k)
    greedy = [token for answer in reference.answer_ids for token in answer]
    assert reference.top_ids[:, 0].tolist() == greedy and len(greedy) == reference.top_ids.shape[0]
    # the scoring forward's log-probs of the tokens the decode kept, position by position
    _, kl = prober.score(reference.prompt_ids, reference.answer_ids, against=reference)
    torch.testing.assert_close(top_logps[:, 0], reference.top_logps[:, 0], rtol=1e-4, atol=1e-5)
    assert nll == pytest.approx(reference.base["probe_nll"], rel=1e-5) and kl == pytest.approx(0.0, abs=1e-5)
    same = (top_ids == reference.top_ids).float().mean()
    assert same > 0.95  # the same ids, but for near-ties that rounding may order either way


def test_a_reference_scored_by_a_forward_is_measured_by_one(model_dir, files, tmp_path, monkeypatch) -> None:
    """A reference written before the top-k were taken while decoding (no scored_by in its file, as a run
    resumed from one has) is measured the way it was made, by a scoring forward: exactly 0 at step 0."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from sftlab.train.probe import Prober, load_reference

    setup = prepare(config(model_dir, files, tmp_path / "run", "method=lora", "train.max_steps=1"), console=QUIET)
    probe = RunProbe.start(setup, tmp_path / "run", QUIET, TrainState(), pad_id=pad_id(setup.tokenizer))
    prober, made = probe.prober, probe.reference
    nll, top_ids, top_logps = prober.score(made.prompt_ids, made.answer_ids, keep_top=setup.config.eval.probe_top_k)
    path = tmp_path / "run" / "probe_reference.safetensors"
    with safe_open(str(path), framework="pt") as opened:
        record = json.loads(opened.metadata()["sftlab_probe"])
    del record["scored_by"]
    record["base"]["probe_nll"] = nll
    save_file({"top_ids": top_ids, "top_logps": top_logps}, str(path), metadata={"sftlab_probe": json.dumps(record)})
    old = load_reference(path)
    assert old.scored_by == "score"
    original, scored = Prober.score, []
    monkeypatch.setattr(Prober, "score", lambda self, *a, **k: scored.append(1) or original(self, *a, **k))
    found = prober.measure(old, generate=False)
    assert scored == [1] and found["probe_kl"] == 0.0 and found["probe_nll"] == nll


def test_resume_reads_the_same_reference_back(model_dir, files, tmp_path) -> None:
    common = ("method=lora", "train.max_steps=4", "train.save_every_steps=2", "train.lr=1e-2")
    out = tmp_path / "run"

    def kill_at_3(step: int) -> None:
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(prepare(config(model_dir, files, out, *common), console=QUIET), console=QUIET, on_step=kill_at_3)
    written = (out / "probe_reference.safetensors").read_bytes()
    train(prepare(config(model_dir, files, out, *common), console=QUIET), console=QUIET)
    assert (out / "probe_reference.safetensors").read_bytes() == written
    summary = json.loads((out / "probe.json").read_text())
    assert summary["base"]["probe_nll"] > 0 and summary["history"][-1][0] == 4
    final = [m for m in metrics(out) if "probe_kl" in m]
    assert [m["step"] for m in final] == [4] and final[0]["probe_kl"] > 0
    assert {"probe_distinct2", "probe_repetition", "probe_length"} <= set(final[0])


def test_full_fine_tuning_at_a_high_lr_drifts_far_more_than_gentle_lora(model_dir, files, tmp_path) -> None:
    found = {}
    for name, overrides in {"full": ("method=full", "train.lr=1e-2"),
                            "lora": ("method=lora", "train.lr=1e-4", "lora.rank=4")}.items():
        out = tmp_path / name
        train(prepare(config(model_dir, files, out, "train.max_steps=12", "train.micro_batch_size=8", *overrides),
                      console=QUIET), console=QUIET)
        found[name] = (metrics(out)[-1], json.loads((out / "probe.json").read_text()))
    (full, full_summary), (lora, _) = found["full"], found["lora"]
    assert full["probe_kl"] > 0.5 and lora["probe_kl"] < 0.1 * full["probe_kl"]
    assert full["probe_nll"] > full_summary["base"]["probe_nll"] + 1.0
    assert full["probe_distinct2"] < full_summary["base"]["probe_distinct2"]
    assert full_summary["flagged"] and "forgetting" in full_summary["flagged"]


def test_the_recommended_checkpoint_is_kept(model_dir, files, tmp_path) -> None:
    out = tmp_path / "run"
    cfg = config(model_dir, files, out, "method=full", "train.lr=1e-2", "train.max_steps=6", "data.eval_fraction=0.25",
                 "train.eval_every_steps=1", "train.keep_checkpoints=1", "eval.probe_kl_threshold=0.7")
    train(prepare(cfg, console=QUIET), console=QUIET)
    summary = json.loads((out / "probe.json").read_text())
    step = summary["recommended_step"]
    assert step is not None and step < 6  # the later steps drift past the tiny threshold
    assert (out / "checkpoints" / f"step-{step}").is_dir() and (out / "checkpoints" / "step-6").is_dir()
    assert all(e["probe_kl"] <= 0.7 for e in metrics(out) if e["step"] == step and "probe_kl" in e)
    report = (out / "report.html").read_text(encoding="utf-8")
    assert 'id="forgetting-curve"' in report and f"checkpoints/step-{step}</code> (kept)" in report
    assert "fine-tuned" in report and summary["samples"] and summary["samples"][0]["base"] in report


def test_the_probes_share_of_the_run_counts_its_base_answers(model_dir, files, tmp_path) -> None:
    """The end's line compares the probe's seconds with the run's over the same span: the base's answers before
    step 1 count in both (they once counted in the probe's only, so the share could pass 100%)."""
    from rich.console import Console

    out = tmp_path / "run"
    console = Console(record=True, width=400)
    train(prepare(config(model_dir, files, out, "method=lora", "train.max_steps=2"), console=QUIET), console=console)
    summary = json.loads((out / "probe.json").read_text())
    assert 0 < summary["probe_seconds"] < summary["run_seconds"]
    share = summary["probe_seconds"] / summary["run_seconds"]
    said = console.export_text()
    assert f"probe: {summary['probe_seconds']:.1f}s of the run's {summary['run_seconds']:.1f}s ({share:.0%}" in said
    # without eval data the probe's numbers still get their line at the end (they ride on no eval line)
    last = metrics(out)[-1]
    assert f"step 2: probe_nll {last['probe_nll']:.3f}, probe_kl {last['probe_kl']:.3f}" in said


def test_watch_flags_drift_only_once_the_eval_loss_stops_improving() -> None:
    watch = Watch(0.2)
    assert watch.observe(1, 2.0, 0.1) is None
    assert watch.observe(2, 1.5, 0.3) is None  # still improving on the task
    assert "forgetting" in watch.observe(3, 1.6, 0.4)
    assert watch.recommended() == 1
    unjudged = Watch(0.2).observe(5, None, 0.3)  # no eval data: the threshold alone, no claim about the task
    assert "forgetting" in unjudged and "no task gain" not in unjudged and "data.eval" in unjudged
    first = Watch(0.2)
    assert first.observe(5, 0.9, 0.7) is None  # a first eval point: nothing says the eval loss stopped improving
    assert "best 0.9000" in first.observe(10, 0.95, 0.8)


def test_the_end_of_a_run_says_what_the_watch_could_not_judge() -> None:
    from rich.console import Console

    from sftlab.train.forgetting import RunProbe

    probe = RunProbe.__new__(RunProbe)
    probe.console = Console(record=True, width=400)
    probe.watch = Watch(0.25)
    assert probe.watch.observe(45, 0.05, 1.45) is None  # the demo's shape: one eval point, at the end
    probe._say_unjudged()
    said = probe.console.export_text()
    assert "probe_kl 1.450 at step 45 is above eval.probe_kl_threshold 0.25" in said
    assert "train.eval_every_steps" in said
    probe.watch = Watch(0.25)
    probe.watch.observe(45, 0.05, 0.1)
    probe._say_unjudged()
    assert probe.console.export_text() == ""


def test_top_k_kl_is_zero_for_the_same_distribution_and_a_lower_bound_otherwise() -> None:
    torch.manual_seed(0)
    base = torch.log_softmax(torch.randn(5, 50), -1)
    other = torch.log_softmax(torch.randn(5, 50), -1)
    values, ids = base.topk(8, dim=-1)
    assert torch.equal(top_k_kl(ids, values, base), torch.zeros(5))
    full = (base.exp() * (base - other)).sum(-1)
    bounded = top_k_kl(ids, values, other)
    assert (bounded > 0).all() and (bounded <= full + 1e-6).all()


def test_tax_numbers_count_distinct_bigrams_and_repeated_4grams() -> None:
    found = tax_numbers([[1, 2, 3, 4, 1, 2, 3, 4], [5, 6]])
    assert found["probe_distinct2"] == pytest.approx(5 / 8)  # bigrams 12 23 34 41 12 23 34 | 56
    assert found["probe_repetition"] == pytest.approx(1 / 5)  # 1234 234 341 412 1234: one repeat of five
    assert found["probe_length"] == 5


@pytest.mark.parametrize("row, message", [
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}', "last message"),
    ('{"messages": [{"role": "user", "content": "hi"}], "open": "yes"}', '"open" must be'),
    ('{"messages": [{"role": "usr", "content": "hi"}]}', "last message"),
    ('{"messages": [{"role": "system", "content": "a"}, {"role": "system", "content": "b"}, '
     '{"role": "user", "content": "c"}]}', "system"),
    ("{not json", "")])
def test_a_bad_probe_row_names_its_file_and_line(tmp_path, row, message) -> None:
    path = tmp_path / "probe.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "fine"}]}\n' + row + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=message or None) as caught:
        read_prompts(str(path))
    assert f"{path}:2" in str(caught.value)


def test_probe_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="eval.probe_top_k must be at least 1"):
        load_config(overrides=["eval.probe_top_k=0"])
    with pytest.raises(ConfigError, match="eval.probe_kl_threshold must be positive"):
        load_config(overrides=["eval.probe_kl_threshold=-1"])
    with pytest.raises(ConfigError, match="eval.probe: missing.jsonl is not builtin"):
        read_prompts("missing.jsonl")


def test_under_torchrun_only_rank_0_probes(model_dir, files, tmp_path) -> None:
    """2 processes (gloo, CPU): the reference is made once, by rank 0; rank 1 decodes and scores nothing; each
    probe point is one metrics line."""
    out = tmp_path / "run"
    overrides = [f"model={model_dir}", f"data.train={files[0]}", f"output_dir={out}", "data.cache=false",
                 f"eval.probe={files[1]}", "eval.probe_max_new_tokens=6", "method=lora", "train.max_steps=2",
                 "train.micro_batch_size=2", "train.distributed=ddp"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(Path(__file__).with_name("probe_driver.py")), str(tmp_path / "calls"), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    calls = [json.loads((tmp_path / "calls" / f"probe-calls-{rank}.json").read_text()) for rank in (0, 1)]
    assert calls[0]["world"] == calls[1]["world"] == 2
    # rank 0: one decoding pass before step 1 (the base's greedy answers, scored as they are picked, and its sampled
    # answers beside them) and one at the end (the base's answers forced, the sampled ones beside); LoRA's forward
    # is plain: no separate scoring pass
    assert calls[0]["decode"] == 2 and calls[0].get("score", 0) == 0
    assert "decode" not in calls[1] and "score" not in calls[1]
    assert done.stdout.count("base answers saved in") == 1
    probed = [m for m in metrics(out) if "probe_kl" in m]
    assert [m["step"] for m in probed] == [2] and probed[0]["probe_kl"] > 0
    assert json.loads((out / "probe.json").read_text())["history"][-1][0] == 2


def test_top_p_candidates_keep_what_a_full_sort_keeps() -> None:
    """The sampled answers' partial sort: the tokens top-p keeps, and their probabilities, are a full sort's; a
    flat row (top-p needs more than the candidates) falls back to the full sort."""
    torch.manual_seed(0)
    logits = torch.randn(6, 5000) * 3
    logits[:, :4] += 10  # peaked, as a chat model's next-token distributions are
    probs = torch.softmax(logits / TEMPERATURE, dim=-1)
    values, order = candidates(probs, top_p=TOP_P)
    full, full_order = probs.sort(dim=-1, descending=True)

    def kept(p):
        return p.masked_fill(p.cumsum(-1) - p >= TOP_P, 0.0)

    k = values.shape[1]
    assert k < probs.shape[1] and not kept(full)[:, k:].any()
    assert torch.allclose(kept(values), kept(full)[:, :k])
    assert torch.equal(order[kept(values) > 0], full_order[:, :k][kept(values) > 0])
    assert candidates(torch.full((2, 5000), 1 / 5000), top_p=TOP_P)[0].shape == (2, 5000)


def smol_template() -> str:
    """SmolLM2-Instruct's own chat template (the demo's model), read from the GGUF fixture: it puts a default
    system prompt in front of every conversation that has none, so probe rows share a long prefix."""
    from gguf import GGUFReader

    from conftest import fixture_path

    field = GGUFReader(str(fixture_path("gguf", "SmolLM2-135M-Instruct.Q4_1.gguf"))).fields["tokenizer.chat_template"]
    return bytes(field.parts[field.data[0]]).decode()


@pytest.mark.parametrize("method", ["lora", "full"])
def test_the_shared_prefix_gives_the_numbers_of_whole_rows(model_dir, files, tmp_path, method) -> None:
    from transformers import AutoTokenizer

    from sftlab.train.forgetting import plain_attention

    smol = tmp_path / "smol"
    shutil.copytree(model_dir, smol)
    tokenizer = AutoTokenizer.from_pretrained(str(smol))
    tokenizer.chat_template = smol_template()
    tokenizer.save_pretrained(str(smol))
    cfg = config(smol, files, tmp_path / "run", f"method={method}", "train.max_steps=1", "eval.probe_batch_size=4")
    setup = prepare(cfg, console=QUIET)
    probe = RunProbe.start(setup, tmp_path / "run", QUIET, TrainState(), pad_id=pad_id(setup.tokenizer))
    shared, reference = probe.prober, probe.reference
    prefix = shared.prefix(reference.prompt_ids, plain=True)
    assert "SmolLM" in setup.tokenizer.decode(reference.prompt_ids[0][:prefix.length]) and prefix.length > 15
    whole = copy.copy(shared)
    whole.share_prefix = False
    assert whole.prefix(reference.prompt_ids, plain=True).length == 0
    with plain_attention(setup.model):
        found = shared.measure(reference, generate=True)
        assert found["probe_kl"] == 0.0 and found["probe_nll"] == reference.base["probe_nll"]
        again = whole.reference(reference.prompts)
        measured = whole.measure(reference, generate=True)
    assert again.answer_ids == reference.answer_ids and again.base["samples"] == reference.base["samples"]
    greedy = [token for answer in reference.answer_ids for token in answer]
    assert reference.top_ids[:, 0].tolist() == greedy  # scored out of order, put back in answer order
    torch.testing.assert_close(again.top_logps, reference.top_logps, rtol=1e-5, atol=1e-6)
    assert again.base["probe_nll"] == pytest.approx(reference.base["probe_nll"], rel=1e-5)
    assert measured["samples"] == found["samples"] and measured["probe_kl"] == pytest.approx(0.0, abs=1e-6)
    assert measured["probe_nll"] == pytest.approx(found["probe_nll"], rel=1e-5)


def test_the_builtin_prompts_share_the_templates_default_system_prompt(model_dir) -> None:
    """No builtin prompt brings a system message of its own: one that did would cut the prefix every row shares
    (and that the probe computes once) down to the template's first few tokens."""
    from transformers import AutoTokenizer


    prompts = read_prompts("builtin")
    assert all(m["role"] != "system" for p in prompts for m in p.messages)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tokenizer.chat_template = smol_template()
    rows = [tokenizer.apply_chat_template(p.messages, add_generation_prompt=True, tokenize=True) for p in prompts]
    rows = [list(r["input_ids"]) if isinstance(r, dict) or hasattr(r, "keys") else list(r) for r in rows]
    shared = common_prefix(rows)
    assert shared >= 15 and "SmolLM" in tokenizer.decode(rows[0][:shared])
