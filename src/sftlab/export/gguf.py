"""A merged model as one GGUF file for llama.cpp, Ollama and LM Studio: weights, tokenizer, chat template,
and stop tokens that end the answer.

Written with the `gguf` package (the writer llama.cpp's own converter uses); the tensor names and metadata
keys are llama.cpp's, mapped here from the Hugging Face config by architecture (ARCHITECTURES). Choices
that decide whether the file works in a client:
- Llama-family attention: llama.cpp rotates adjacent pairs of each head's query/key dims where HF rotates
  the two halves, so q_proj/k_proj rows are reordered per head (`_interleave_heads`). Qwen2/3 use llama.cpp's
  NEOX rotation, which is HF's: no reordering.
- Stop tokens: the chat template's end-of-turn marker (`<|im_end|>`, `<|eot_id|>`) is written as both the
  EOS and the EOT token, so llama.cpp and Ollama end generation after the answer (a template whose turns end
  in a token the file does not mark as end-of-generation is the "model never stops" bug).
- Quantisation: 1-D tensors (norms, biases) stay F32; 2-D weights take the requested type where their rows
  split into its blocks (F16 otherwise). The 4/5-bit types keep the token embeddings and output head at
  Q8_0, as llama.cpp's own quantiser keeps them at a higher precision.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sftlab.errors import SftlabError

QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
"""--quant choices: the types the gguf package can write itself (K-quants need llama.cpp's llama-quantize)."""
LOW_BIT = ("q4_0", "q4_1", "q5_0", "q5_1")


@dataclass(frozen=True)
class Architecture:
    gguf_name: str
    """general.architecture, the prefix of the model's metadata keys."""
    interleave_qk: bool
    """Reorder q/k rows per head for llama.cpp's adjacent-pair rotation (Llama family)."""
    extra: tuple[tuple[str, str], ...] = ()
    """(HF suffix, GGUF suffix) per layer, beyond the Llama set (Qwen3's q/k norms)."""


LAYER = (("input_layernorm.weight", "attn_norm.weight"), ("post_attention_layernorm.weight", "ffn_norm.weight"),
         ("self_attn.q_proj.weight", "attn_q.weight"), ("self_attn.k_proj.weight", "attn_k.weight"),
         ("self_attn.v_proj.weight", "attn_v.weight"), ("self_attn.o_proj.weight", "attn_output.weight"),
         ("self_attn.q_proj.bias", "attn_q.bias"), ("self_attn.k_proj.bias", "attn_k.bias"),
         ("self_attn.v_proj.bias", "attn_v.bias"), ("mlp.gate_proj.weight", "ffn_gate.weight"),
         ("mlp.up_proj.weight", "ffn_up.weight"), ("mlp.down_proj.weight", "ffn_down.weight"))
"""HF decoder layer tensor -> llama.cpp's name under blk.N."""
ARCHITECTURES = {
    "llama": Architecture("llama", interleave_qk=True),
    "mistral": Architecture("llama", interleave_qk=True),  # llama.cpp runs Mistral as llama
    "qwen2": Architecture("qwen2", interleave_qk=False),
    "qwen3": Architecture("qwen3", interleave_qk=False, extra=(("self_attn.q_norm.weight", "attn_q_norm.weight"),
                                                               ("self_attn.k_norm.weight", "attn_k_norm.weight"))),
}
"""HF model_type -> how it is written; anything else is refused by name."""


class GGUFExportError(SftlabError):
    """The model cannot be written as GGUF (architecture, tokenizer or setting not mapped)."""


def write_gguf(model: nn.Module, tokenizer: Any, template: Any, out: Path, *, quant: str = "f16",
               name: str = "sftlab-model", pre: str | None = None) -> dict[str, Any]:
    """Write `model` (a plain HF causal LM, merged) with its tokenizer and `template` (a ChatTemplate) to the
    file `out`; `pre` names the pre-tokenizer for llama.cpp (default: read from the tokenizer). Returns what
    was written that a user needs: the stop token and the tensor count."""
    import gguf

    if quant not in QUANTS:
        raise GGUFExportError(f"--quant {quant!r} is not one sftlab writes; use one of {', '.join(QUANTS)} "
                              "(for K-quants, run llama.cpp's llama-quantize on an f16 export).")
    config = model.config
    arch = architecture_of(config)
    stop = end_of_turn_id(tokenizer, template)
    writer = gguf.GGUFWriter(str(out), arch.gguf_name)
    writer.add_name(name)
    _add_hyperparameters(writer, config, arch.gguf_name)
    writer.add_file_type(_file_type(quant))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, tokenizer, config, stop, template, pre)
    count = 0
    for gguf_name, tensor in _tensors(model, arch):
        data, qtype = _encode(gguf_name, tensor, quant)
        writer.add_tensor(gguf_name, data, raw_dtype=qtype)
        count += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"eos_token": tokenizer.convert_ids_to_tokens(stop), "eos_token_id": stop, "tensors": count,
            "architecture": arch.gguf_name}


def architecture_of(config: Any) -> Architecture:
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise GGUFExportError(f"GGUF export maps the architectures {', '.join(ARCHITECTURES)}; this model is "
                              f"{model_type!r}. Export it as a merged HF dir (sftlab merge) and convert that with "
                              "llama.cpp's convert_hf_to_gguf.py, which knows more architectures.")
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = scaling.get("rope_type", scaling.get("type", "default")) if isinstance(scaling, dict) else "default"
    if kind not in ("default", None):
        raise GGUFExportError(f"this {model_type} model uses rope_scaling {kind!r}, which sftlab's GGUF export "
                              "does not write yet; convert the merged HF dir (sftlab merge) with llama.cpp's "
                              "convert_hf_to_gguf.py.")
    return ARCHITECTURES[model_type]


ANSWER = "SftlabAnswerText"
"""Stands for an assistant message's content when the template is rendered to find what follows it."""


def end_of_turn_id(tokenizer: Any, template: Any) -> int:
    """The token at which a client must stop generating: the end-of-turn marker the template writes right
    after an assistant message (a single token of the tokenizer), else the tokenizer's eos. A template's
    candidates may include others (`<|endoftext|>` beside `<|im_end|>`); the one that ends the answer wins."""
    from sftlab.data.stop_tokens import stop_token_ids

    ids = stop_token_ids(tokenizer, template)
    text = template.render_text([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ANSWER}])
    after = text.split(ANSWER, 1)[1] if ANSWER in text else ""
    for marker in template.end_of_turn:
        marker_ids = tokenizer.encode(marker, add_special_tokens=False)
        if after.startswith(marker) and len(marker_ids) == 1 and marker_ids[0] in ids:
            return int(marker_ids[0])
    if not ids:
        raise GGUFExportError("the chat template's end-of-turn marker is not a single token of the tokenizer and "
                              "the tokenizer has no eos token: a GGUF client would never stop generating. Use a "
                              "template whose turns end in a special token (e.g. chatml with <|im_end|>).")
    return ids[0]


def _add_hyperparameters(writer: Any, config: Any, prefix: str) -> None:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_rope_freq_base(float(_rope_theta(config)))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:  # Qwen3: head_dim set apart from hidden_size / heads
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def _rope_theta(config: Any) -> float:
    theta = getattr(config, "rope_theta", None)
    if theta is None:  # transformers 5 keeps it in rope_parameters
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return theta


def _add_tokenizer(writer: Any, tokenizer: Any, config: Any, stop: int, template: Any, pre: str | None) -> None:
    """Vocabulary, types, BPE merges, special ids and the chat template, as llama.cpp reads them."""
    import json

    import gguf

    backend = json.loads(tokenizer.backend_tokenizer.to_str()) if hasattr(tokenizer, "backend_tokenizer") else {}
    model = backend.get("model", {})
    if model.get("type") != "BPE" or not _byte_level(backend):
        raise GGUFExportError(f"GGUF export writes byte-level BPE tokenizers (GPT-2 style: Llama 3, Qwen, SmolLM); "
                              f"this one is {model.get('type', type(tokenizer).__name__)!r}. Convert the merged HF "
                              "dir with llama.cpp's convert_hf_to_gguf.py.")
    size = max(config.vocab_size, len(tokenizer))
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    added = {int(index): token for index, token in tokenizer.added_tokens_decoder.items()}
    tokens, types = [], []
    for index in range(size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[index])
            special = index in added and added[index].special
            types.append(gguf.TokenType.CONTROL if special else
                         gguf.TokenType.USER_DEFINED if index in added else gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(backend, pre))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    bos = tokenizer.bos_token_id
    if bos is not None:
        writer.add_bos_token_id(bos)
    writer.add_add_bos_token(bos is not None and tokenizer("a")["input_ids"][:1] == [bos])
    writer.add_add_eos_token(False)
    writer.add_eos_token_id(stop)
    writer.add_eot_token_id(stop)
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    if tokenizer.unk_token_id is not None:
        writer.add_unk_token_id(tokenizer.unk_token_id)
    writer.add_chat_template(template.source)


def _byte_level(backend: dict[str, Any]) -> bool:
    """Whether the tokenizer's pre-tokenizer (alone or in a sequence) is ByteLevel, as llama.cpp's gpt2 model."""
    pre = backend.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if isinstance(pre, dict) else []
    return any(isinstance(part, dict) and part.get("type") == "ByteLevel" for part in parts)


PRE_TOKENIZERS = {"\\p{N}{1,3}": "llama-bpe", "\\p{N}|": "qwen2"}
"""A distinctive part of a Split pre-tokenizer's regex -> llama.cpp's name for it (tokenizer.ggml.pre):
Llama 3 groups up to three digits, Qwen2 splits every digit."""


def _pre_tokenizer(backend: dict[str, Any], given: str | None) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenisation (tokenizer.ggml.pre): `given` (a GGUF base's own),
    else read from the tokenizer's pre-tokenizer: a known Split regex, or plain ByteLevel (GPT-2's regex)."""
    if given:
        return given
    pre = backend.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if isinstance(pre, dict) else []
    for part in parts:
        regex = (part.get("pattern") or {}).get("Regex", "") if isinstance(part, dict) else ""
        for mark, name in PRE_TOKENIZERS.items():
            if part.get("type") == "Split" and mark in regex:
                return name
    if len(parts) == 1 and parts[0].get("type") == "ByteLevel" and parts[0].get("use_regex", True):
        return "gpt2"
    return "default"


def _tensors(model: nn.Module, arch: Architecture) -> Iterator[tuple[str, torch.Tensor]]:
    """(llama.cpp name, tensor) for each weight; an unmapped weight is an error, never left out silently."""
    state = model.state_dict()
    config = model.config
    tied = bool(getattr(config, "tie_word_embeddings", False))
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if not tied:
        names["lm_head.weight"] = "output.weight"
    for layer in range(config.num_hidden_layers):
        for hf, ours in (*LAYER, *arch.extra):
            names[f"model.layers.{layer}.{hf}"] = f"blk.{layer}.{ours}"
    unmapped = sorted(set(state) - set(names) - ({"lm_head.weight"} if tied else set()))
    unmapped = [key for key in unmapped if not key.endswith("rotary_emb.inv_freq")]
    if unmapped:
        raise GGUFExportError(f"GGUF export does not map these weights of the {config.model_type} model: "
                              f"{', '.join(unmapped[:5])}; nothing was written.")
    reorder: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    if arch.interleave_qk:
        heads = config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        reorder = {"attn_q.weight": lambda w: _interleave_heads(w, heads),
                   "attn_k.weight": lambda w: _interleave_heads(w, kv)}
    for hf, ours in names.items():
        if hf not in state:
            continue  # optional tensors (biases, q/k norms) the model has not
        tensor = state[hf].detach().float().cpu()
        suffix = ours.split(".", 2)[-1] if ours.startswith("blk.") else ours
        yield ours, reorder[suffix](tensor) if suffix in reorder else tensor


def _interleave_heads(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head reordered from HF's halves [x0..x(d/2-1), y0..] to llama.cpp's pairs [x0, y0, x1, ...]:
    (heads * d, in) -> (heads, 2, d/2, in) -> swap the middle axes -> (heads * d, in)."""
    rows, cols = weight.shape
    return weight.reshape(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def _encode(name: str, tensor: torch.Tensor, quant: str) -> tuple[np.ndarray, Any]:
    """The tensor's bytes in the type it is written in (see the module doc), and that type."""
    from gguf import GGMLQuantizationType as Q
    from gguf.constants import GGML_QUANT_SIZES
    from gguf.quants import quantize

    data = tensor.numpy().astype(np.float32)
    if data.ndim < 2 or quant == "f32":
        return data, Q.F32
    wanted = "q8_0" if quant in LOW_BIT and name in ("token_embd.weight", "output.weight") else quant
    qtype = {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1, "q5_0": Q.Q5_0,
             "q5_1": Q.Q5_1}[wanted]
    if data.shape[-1] % GGML_QUANT_SIZES[qtype][0] != 0:
        qtype = Q.F16  # rows that do not split into the type's blocks
    return quantize(data, qtype), qtype


def _file_type(quant: str) -> int:
    from gguf import LlamaFileType as F

    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0,
            "q4_0": F.MOSTLY_Q4_0, "q4_1": F.MOSTLY_Q4_1, "q5_0": F.MOSTLY_Q5_0, "q5_1": F.MOSTLY_Q5_1}[quant]


def check_targets(output: str | Path, *, quant: str = "f16", overwrite: bool = False,
                  with_modelfile: bool = True) -> list[Path]:
    """The files `sftlab export --format gguf` will write (the .gguf file, then its Modelfile), checked before
    any model is loaded: an existing file is replaced only with `overwrite`, and in a run dir only a file the
    run wrote (its manifest) is ever replaced."""
    if quant not in QUANTS:
        raise GGUFExportError(f"--quant {quant!r} is not one sftlab writes; use one of {', '.join(QUANTS)}.")
    out = Path(output).expanduser()
    if out.suffix.lower() != ".gguf":
        raise GGUFExportError(f"--output {output} must name a .gguf file (e.g. {out.with_suffix('.gguf')}).")
    targets = [out, out.with_suffix(".Modelfile")] if with_modelfile else [out]
    for target in targets:
        _check_target(target, overwrite=overwrite)
    return targets


def write_model(model: Any, tokenizer: Any, template: Any, method: Any, targets: list[Path], *, quant: str,
                name: str) -> dict[str, Any]:
    """The loaded model (merged first when `method` holds an adapter) written to targets[0], a GGUF file, and an
    Ollama Modelfile to targets[1] when given (check_targets made the list)."""
    from sftlab import files
    from sftlab.export.ollama import modelfile

    out = targets[0]
    if method is not None:
        if method.config.model.path and out.resolve() == Path(method.config.model.path).expanduser().resolve():
            raise GGUFExportError(f"--output {out} is the run's base model file; give --output a new path.")
        model = method.merge(model)  # a method that cannot merge says why (MergeError); a GGUF holds one model
    architecture_of(model.config)  # refused by name before anything is written
    pre = _source_pre(method.config.model.path if method is not None else None)
    with files.atomic_file(_writable(out), what="the GGUF file") as scratch:
        info = write_gguf(model, tokenizer, template, scratch, quant=quant, name=name, pre=pre)
    info["output"] = str(out)
    if len(targets) > 1:
        files.write_text_atomic(_writable(targets[1]), modelfile(out.name, template, info["eos_token"]))
        info["modelfile"] = str(targets[1])
    return info


def _source_pre(base: str | None) -> str | None:
    """A .gguf base's own tokenizer.ggml.pre: llama.cpp's name for the tokenizer the model was made with
    (transformers' GGUF reader rebuilds a simpler pre-tokenizer, which the HF dir then carries)."""
    from sftlab.models.gguf import is_gguf, parsed_once

    if not base or not is_gguf(base) or not Path(base).is_file():
        return None
    import gguf

    with parsed_once():  # its reader parses the metadata ~3x faster (SmolLM2-135M: 0.7 s instead of 2.4 s)
        field = gguf.GGUFReader(base).fields.get("tokenizer.ggml.pre")
    return str(field.contents()) if field is not None else None


def _check_target(path: Path, *, overwrite: bool) -> None:
    if path.is_symlink():
        raise GGUFExportError(f"{path} is a symlink (to {path.readlink()}); it is never written through. Give "
                              "--output the real path.")
    if path.is_dir():
        raise GGUFExportError(f"{path} is a directory; --output names the .gguf file to write.")
    if path.exists() and not overwrite:
        raise GGUFExportError(f"{path} already exists; choose another --output, or pass --overwrite to replace it "
                              "(it is replaced once the new file is complete).")
    names = _manifest(path.parent)
    if names is not None:
        from sftlab.files import refuse_foreign

        refuse_foreign(path, names)  # in a run dir: a file the run did not write is the user's, never replaced


def _manifest(directory: Path) -> list[str] | None:
    from sftlab import files

    return files.manifest(directory) if directory.is_dir() else None


def _writable(path: Path) -> Path:
    """`path`, recorded in its dir's manifest first when that dir is a run dir (files.owned)."""
    from sftlab import files

    return files.owned(path.parent, path.name) if _manifest(path.parent) is not None else path
