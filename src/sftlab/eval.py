"""`sftlab eval MODEL`: the forgetting probe and the user's own generation tasks, on any model sftlab reads.

MODEL is a base model dir (or hub id), a run dir (its adapter/ or model/; `--checkpoint step-N` for a kept
checkpoint), an adapter dir or a merged dir. The numbers:

- the probe (train/probe.py): probe_nll / probe_kl of the reference answers, and the instruction tax of sampled
  answers to the open-ended prompts. The reference is the run's own (OUTPUT/probe_reference.safetensors, found in
  a run dir or beside an adapter dir inside one), `--reference RUN_OR_FILE`, or else the model's own greedy
  answers (probe_kl is then 0 by definition: compare probe_nll and the tax numbers across models instead);
- tasks (`--tasks FILE`): JSONL rows {"messages": [... ending with the user's turn], "check": CHECK}, each
  answered greedily and checked: {"contains": TEXT or [TEXT, ...]} (every text, case-insensitive),
  {"regex": PATTERN} (found anywhere), {"exact": TEXT} (the whole answer, trimmed), or {"facts": [FACT, ...]}
  (each fact as whole words, case and punctuation ignored; a fact given as a list passes on any of them).

eval.json goes into a run dir's own files (eval.json, or eval-step-N.json), otherwise only where --output says;
an existing file is never replaced unless --overwrite.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from sftlab import files
from sftlab.config import Config, load_config
from sftlab.errors import ConfigError, DataError, SftlabError
from sftlab.files import write_text_atomic
from sftlab.methods import METHODS
from sftlab.runs import load_for_inference
from sftlab.train.forgetting import plain_attention
from sftlab.train.probe import REFERENCE_FILE, ProbePrompt, Prober, Reference, load_reference, read_prompts

CHECKS = ("contains", "regex", "exact", "facts")


def evaluate(source: str, *, checkpoint: str | None = None, probe: str | None = None, tasks: str | None = None,
             reference: str | None = None, base: str | None = None) -> dict[str, Any]:
    """The probe's numbers (and the tasks' accuracy) of the model at `source`, as eval.json holds them."""
    task_prompts = read_tasks(tasks) if tasks else []  # a bad task row fails before the model loads
    run = _run_dir(source)
    cfg = _config(run, probe)
    weights = _checkpoint_file(run, source, checkpoint) if checkpoint else None  # before the model loads
    model, tokenizer, template, method = load_for_inference(source, base=base)
    if weights is not None:
        method = load_checkpoint(run, weights, model, method)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if isinstance(tokenizer.pad_token_id, int) else (tokenizer.eos_token_id or 0)
    prober = Prober(model, tokenizer, method, cfg, device=device, pad_id=pad, template=template)
    found: dict[str, Any] = {"model": source, "checkpoint": checkpoint}
    with plain_attention(model):
        if cfg.eval.probe != "none":
            ref, origin = _reference(prober, cfg, run, source, reference, explicit_probe=probe is not None)
            found.update({"reference": origin, **prober.measure(ref, generate=True),
                          "base": {k: v for k, v in ref.base.items() if k != "samples"}})
        if task_prompts:
            found["tasks"] = run_tasks(prober, task_prompts)
    return found


def _run_dir(source: str) -> Path | None:
    """The run dir MODEL is, or (an adapter/ or model/ dir) lies in."""
    root = Path(source).expanduser()
    for candidate in (root, root.parent):
        if (candidate / "config.yaml").is_file() and files.manifest(candidate) is not None:
            return candidate
    return None


def _config(run: Path | None, probe: str | None) -> Config:
    """The run's settings (so its probe numbers compare), else the defaults; --probe replaces eval.probe, and
    without it a model, or a run trained with eval.probe=none, gets the builtin probe (whatever SFTLAB_PROBE says:
    that variable sets training's default, and `sftlab eval` is asked for a probe)."""
    cfg = load_config(run / "config.yaml" if run is not None else None, [f"eval.probe={probe}"] if probe else [])
    if cfg.eval.probe == "none" and not probe:
        cfg = replace(cfg, eval=replace(cfg.eval, probe="builtin"))
    return cfg


def _reference(prober: Prober, cfg: Config, run: Path | None, source: str, given: str | None, *,
               explicit_probe: bool) -> tuple[Reference, str]:
    """(the reference, where it came from): --reference, the run's, or the model's own answers."""
    if given:
        path = Path(given)
        path = path / REFERENCE_FILE if path.is_dir() else path
        if not path.is_file():
            raise ConfigError(f"--reference {given}: no {REFERENCE_FILE} there; give a run dir trained with the probe "
                              "on, or the file itself.")
        return load_reference(path), str(path)
    if run is not None and not explicit_probe and (run / REFERENCE_FILE).is_file():
        return load_reference(run / REFERENCE_FILE), str(run / REFERENCE_FILE)
    return prober.reference(read_prompts(cfg.eval.probe)), f"{source} (its own greedy answers)"


def _checkpoint_file(run: Path | None, source: str, name: str) -> Path:
    """RUN/checkpoints/NAME/trainable.safetensors, or an error naming the checkpoints the run keeps."""
    if run is None:
        raise ConfigError(f"--checkpoint {name}: {source} is not a run dir; give the run dir, or leave it out.")
    weights = run / "checkpoints" / name / "trainable.safetensors"
    if not weights.is_file():
        kept = sorted(p.name for p in (run / "checkpoints").glob("step-*")) if (run / "checkpoints").is_dir() else []
        raise ConfigError(f"--checkpoint {name}: {weights} does not exist; the run keeps {', '.join(kept) or 'none'}.")
    return weights


def load_checkpoint(run: Path, weights: Path, model: torch.nn.Module, method: Any) -> Any:
    """A checkpoint's trainable weights loaded over the model (a full run's method, from the run's config, is
    applied first, so its trainable weights are the ones the checkpoint holds); returns the method."""
    from safetensors.torch import load_file

    if method is None:  # full fine-tuning: every trained weight is in the checkpoint
        cfg = load_config(run / "config.yaml")
        method = METHODS[cfg.method](cfg)
        method.apply(model)
    method.load_state_dict(model, load_file(str(weights)))
    model.eval()
    return method


def read_tasks(path: str) -> list[ProbePrompt]:
    """--tasks rows, each with a valid check (file:line errors)."""
    if not Path(path).is_file():
        raise ConfigError(f"--tasks {path} does not exist; give a JSONL file of {{\"messages\": [...], \"check\": "
                          "{...}} rows.")
    prompts = read_prompts(path)
    for prompt in prompts:
        _check_spec(prompt.extra.get("check"), prompt.id)
    return prompts


def _check_spec(check: Any, where: str) -> None:
    if not isinstance(check, dict) or len(check) != 1 or next(iter(check)) not in CHECKS:
        raise DataError(f"\"check\" must be one of {{\"contains\": ...}}, {{\"regex\": ...}}, {{\"exact\": ...}}, "
                        f"{{\"facts\": [...]}}; found {json.dumps(check)[:80]}.", where=where)
    kind, value = next(iter(check.items()))
    texts = value if isinstance(value, list) else [value]
    if kind == "facts":
        texts = [t for fact in texts for t in (fact if isinstance(fact, list) else [fact])]
    if not texts or not all(isinstance(t, str) and t for t in texts):
        raise DataError(f"\"check\": {kind} needs non-empty text (or a list of texts); found {json.dumps(value)[:80]}.",
                        where=where)
    if kind == "regex":
        try:
            re.compile(value)
        except re.error as exc:
            raise DataError(f"\"check\": regex {value!r} does not compile ({exc}); fix the pattern.",
                            where=where) from None


def passes(answer: str, check: dict[str, Any]) -> bool:
    """Whether `answer` passes the task's check."""
    kind, value = next(iter(check.items()))
    if kind == "regex":
        return re.search(value, answer) is not None
    if kind == "exact":
        return answer.strip() == value.strip()
    if kind == "contains":
        return all(text.lower() in answer.lower() for text in (value if isinstance(value, list) else [value]))
    words = f" {_words(answer)} "
    return all(any(f" {_words(option)} " in words for option in (fact if isinstance(fact, list) else [fact]))
               for fact in value)


def _words(text: str) -> str:
    return " ".join(re.sub(r"[^\w$%]+", " ", text.lower()).split())


def run_tasks(prober: Prober, prompts: list[ProbePrompt]) -> dict[str, Any]:
    """Greedy answers to the tasks, each checked; the accuracy and every row's result."""
    answers = prober.decode([prober.encode(p) for p in prompts], sampled=False, plain=False)
    rows = [{"id": p.id, "answer": prober.text(a), "passed": passes(prober.text(a), p.extra["check"])}
            for p, a in zip(prompts, answers)]
    return {"accuracy": sum(r["passed"] for r in rows) / len(rows), "passed": sum(r["passed"] for r in rows),
            "total": len(rows), "rows": rows}


def save(found: dict[str, Any], source: str, *, output: str | None, overwrite: bool) -> Path | None:
    """eval.json where it may go: --output (never replacing a file unless `overwrite`), else a run dir's own
    eval.json / eval-step-N.json; None for a model dir without --output (nothing of the user's is written)."""
    if output:
        path = Path(output)
        if path.is_symlink() or path.is_dir():
            raise ConfigError(f"--output {output} is a directory or a symlink; give a new file path.")
        if path.exists() and not overwrite:
            raise ConfigError(f"--output {output} exists; choose another path, or pass --overwrite to replace it.")
    else:
        run = _run_dir(source)
        if run is None or Path(source).expanduser().resolve() != run.resolve():
            return None
        name = f"eval-{found['checkpoint']}.json" if found.get("checkpoint") else "eval.json"
        path = files.owned(run, name)  # the manifest names it first: a user's file of that name is refused
    write_text_atomic(path, json.dumps(found, indent=1, ensure_ascii=False) + "\n")
    return path


def table(found: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(metric, this model, the reference's base) rows for the terminal."""
    rows = []
    base = found.get("base", {})
    for key in ("probe_nll", "probe_kl", "probe_distinct2", "probe_repetition", "probe_length"):
        if key in found:
            of_base = f"{base[key]:.4f}" if key in base else "0" if key == "probe_kl" else ""
            rows.append((key, f"{found[key]:.4f}", of_base))
    if "tasks" in found:
        tasks = found["tasks"]
        rows.append(("tasks passed", f"{tasks['passed']}/{tasks['total']} ({tasks['accuracy']:.1%})", ""))
    if not rows:
        raise SftlabError("nothing to evaluate: eval.probe is none and no --tasks given.")
    return rows
