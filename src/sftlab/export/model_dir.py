"""Plain Hugging Face model dirs (full fine-tuning, merged adapters), the chat template a run trained
with, and the fidelity check between an adapter model and its merged form."""


from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from sftlab.config import Config
from sftlab.errors import SftlabError
from sftlab.methods.base import MergeError, Method

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
"""The two files of every adapter dir sftlab writes (the names HF PEFT uses)."""


class NonFiniteWeightsError(SftlabError):
    """Weights to be exported hold NaN or infinite values: the export is refused (nothing is written)."""


def refuse_nonfinite(state: Mapping[str, torch.Tensor], what: str) -> None:
    """Refuse to write weights with a NaN or an infinity: such a model or adapter only produces NaN."""
    bad = [name for name, tensor in state.items()
           if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise NonFiniteWeightsError(f"{what} holds non-finite (NaN or infinite) weights in {shown}; it is not "
                                    "written (nothing of a partial write is left). The adapter or the base is "
                                    "corrupt, or training diverged: retrain, or export an earlier checkpoint.")


def refuse_merge_output(out: Path, inputs: Iterable[tuple[str, str | None]], *,
                        run_entry_of: Path | None = None) -> None:
    """A merge writes (and with --overwrite replaces) `out` whole: refuse an `out` that is, holds or lies
    inside an input (the run or adapter dir, the base model), or is the working dir or one of its parents.
    `run_entry_of`: the run dir `out` is a new entry of (RUN/merged, recorded in the run's manifest), the
    one place inside an input a merge may write."""
    target = Path(out).expanduser().resolve()
    cwd = Path.cwd().resolve()
    fix = f"Give --output a new dir outside them, e.g. {target.parent / (target.name + '-merged')}"
    if target == cwd or target in cwd.parents:
        raise SftlabError(f"--output {out} is the working directory or one of its parents; a merge replaces "
                          f"--output whole. {fix}.")
    for what, given in inputs:
        if not given or not Path(given).expanduser().exists():
            continue  # a hub id, or nothing given
        path = Path(given).expanduser().resolve()
        if target == path or target in path.parents:
            raise SftlabError(f"--output {out} is or holds {what} {given}, which the merge reads; a merge replaces "
                              f"--output whole. {fix}.")
        if path in target.parents and not (run_entry_of is not None and target.parent == path
                                           and path == Path(run_entry_of).expanduser().resolve()):
            raise SftlabError(f"--output {out} lies inside {what} {given}; a merge never writes into its inputs. "
                              f"{fix}.")


def write_adapter_files(out: Path, state: dict[str, torch.Tensor], document: dict[str, Any], tokenizer: Any,
                        chat_template: str | None, *, metadata: dict[str, str] | None = None,
                        readme: str | None = None) -> Path:
    """An adapter dir's files: the weights, adapter_config.json, the tokenizer with the chat template the
    run trained with, and (where PEFT users need instructions) a README.md. Returns `out`."""
    refuse_nonfinite(state, "the adapter")
    save_file(state, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt", **(metadata or {})})
    (out / ADAPTER_CONFIG).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    save_tokenizer(tokenizer, out, chat_template)
    if readme is not None:
        (out / "README.md").write_text(readme, encoding="utf-8")
    return out


def read_adapter_config(adapter_dir: str | Path, kind: str) -> Any:
    """The parsed adapter_config.json of an adapter dir holding both adapter files; `kind` names the
    expected adapter in the error (e.g. "PEFT-format LoRA")."""
    adapter = Path(adapter_dir)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (adapter / name).is_file():
            raise SftlabError(f"{adapter} has no {name}; expected a {kind} adapter dir ({ADAPTER_CONFIG} + "
                              f"{ADAPTER_WEIGHTS}), e.g. a run's adapter/ dir.")
    try:
        return json.loads((adapter / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SftlabError(f"{adapter / ADAPTER_CONFIG} is not valid JSON: {exc}") from None


def resize_note(title: str, where_rows: str, base_model: Any) -> str:
    """README.md for an adapter dir whose tokenizer has tokens the base lacks: how to load it with PEFT."""
    return (f"# {title} with trained rows for added tokens\n\n"
            f"The tokenizer in this dir has tokens the base model lacks; {where_rows}. With HF PEFT, resize the "
            "base model's embeddings to this tokenizer before loading the adapter:\n\n"
            "```python\n"
            "from peft import PeftModel\n"
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            "tokenizer = AutoTokenizer.from_pretrained(ADAPTER_DIR)\n"
            f"base = AutoModelForCausalLM.from_pretrained({base_model!r})\n"
            "base.resize_token_embeddings(len(tokenizer))\n"
            "model = PeftModel.from_pretrained(base, ADAPTER_DIR)\n"
            "```\n")


def save_model(model: nn.Module, tokenizer: Any, out_dir: str | Path, *, chat_template: str | None = None) -> Path:
    """A plain HF model dir (config.json, safetensors weights, tokenizer files, chat template) that
    `AutoModelForCausalLM.from_pretrained` loads without sftlab. `chat_template` (Jinja source)
    replaces the tokenizer's own in the written files; None keeps the tokenizer's. Returns out_dir."""
    leftovers = [name for name, module in model.named_modules() if type(module).__module__.startswith("sftlab.")]
    if leftovers:
        raise MergeError(f"the model still holds sftlab modules ({', '.join(leftovers[:3])}); merge it first "
                         "(merge_to_dir) or save it as an adapter (save_adapter).")
    refuse_nonfinite(model.state_dict(), "the model")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    save_tokenizer(tokenizer, out, chat_template)
    return out


def merge_to_dir(model: nn.Module, method: Method, tokenizer: Any, out_dir: str | Path, *,
                 chat_template: str | None = None) -> Path:
    """Fold the method's trained parts into the base weights (in place: `model` becomes the plain merged
    model) and write a plain HF model dir, as save_model. Returns out_dir."""
    merged = method.merge(model)
    return save_model(merged, tokenizer, out_dir, chat_template=chat_template)


def chat_template_for(config: Config, tokenizer: Any) -> str | None:
    """Jinja source of the chat template a run trained with (data.template's built-in or .jinja file);
    None for `auto`, where the tokenizer already carries its own."""
    if config.data.template == "auto":
        return None
    from sftlab.data.templates import load_template

    return load_template(config.data.template, tokenizer).source


@torch.no_grad()
def fidelity(adapter_model: nn.Module, merged_model: nn.Module,
             inputs: torch.Tensor | Iterable[Any]) -> dict[str, float]:
    """How closely a merged model reproduces its adapter model: the largest |logit difference| and the mean
    KL(adapter || merged) per token, in fp32, over `inputs` — a (B, T) or (T,) tensor of input_ids, or an
    iterable of such tensors, token-id lists, {"input_ids", "attention_mask"} mappings or Batches. A NaN in
    either model's logits gives NaN (a failure the caller reports), never a difference of 0."""
    inputs = [{"input_ids": ids, "attention_mask": mask} for ids, mask in _input_batches(inputs)]  # read once
    return fidelity_to(reference_logits(adapter_model, inputs), merged_model, inputs)


@torch.no_grad()
def reference_logits(model: nn.Module, inputs: torch.Tensor | Iterable[Any]) -> list[torch.Tensor]:
    """The logits (N, V) fp32 of the real tokens of each of `inputs` (the forms fidelity() takes): what a
    merged model is compared with after `model` is freed (fidelity_to), so the two never share memory."""
    with _eval_mode(model):
        return [_logits(model, input_ids, attention_mask)[attention_mask.bool()]
                for input_ids, attention_mask in _input_batches(inputs)]


@torch.no_grad()
def fidelity_to(reference: list[torch.Tensor], merged_model: nn.Module,
                inputs: torch.Tensor | Iterable[Any]) -> dict[str, float]:
    """fidelity() against the adapter model's `reference` logits (reference_logits on the same inputs)."""
    max_diff, kl_sum, tokens = 0.0, 0.0, 0
    with _eval_mode(merged_model):
        for expected, (input_ids, attention_mask) in zip(reference, _input_batches(inputs), strict=True):
            merged = _logits(merged_model, input_ids, attention_mask)[attention_mask.bool()]
            diff = (expected - merged).abs().max().item()
            max_diff = diff if math.isnan(diff) or math.isnan(max_diff) else max(max_diff, diff)  # NaN is kept
            # KL in float64: in fp32 its own rounding (~1e-8) would hide the difference being measured.
            kl_sum += F.kl_div(merged.double().log_softmax(-1), expected.double().log_softmax(-1),
                               log_target=True, reduction="sum").item()
            tokens += expected.shape[0]
    if tokens == 0:
        raise SftlabError("fidelity check got no tokens to compare; give it at least one non-empty input.")
    return {"max_abs_logit_diff": max_diff, "mean_kl": kl_sum / tokens}


# --- adapter config and keys -------------------------------------------------------------------------


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()  # no dropout: both models must be deterministic functions of the input
    try:
        yield
    finally:
        model.train(was_training)


def _input_batches(inputs: torch.Tensor | Iterable[Any]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, attention_mask), each (B, T), from the forms fidelity() accepts."""
    items = [inputs] if isinstance(inputs, torch.Tensor) else inputs
    for item in items:
        if isinstance(item, Mapping):
            input_ids, attention_mask = item["input_ids"], item.get("attention_mask")
        elif hasattr(item, "input_ids"):
            input_ids, attention_mask = item.input_ids, getattr(item, "attention_mask", None)
        else:
            input_ids, attention_mask = item, None
        input_ids = torch.as_tensor(input_ids, dtype=torch.long)
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        yield input_ids, torch.as_tensor(attention_mask).reshape(input_ids.shape)


def _logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    out = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
    return out.logits.float().cpu()  # (B, T, V)


def save_tokenizer(tokenizer: Any, out: Path, chat_template: str | None) -> None:
    if tokenizer is None:
        return
    if chat_template is not None and chat_template != getattr(tokenizer, "chat_template", None):
        tokenizer = copy.deepcopy(tokenizer)  # the caller's tokenizer keeps its own template
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(out)
