"""Merge without the full model twice: a LoRA/QLoRA adapter folded into its base one checkpoint tensor at a time.

`sftlab merge` used to load the adapter model, load it again to merge it, then load the written dir to
compare them: three full models in memory. Here the base is never held whole. Its safetensors shards are
read tensor by tensor (models/stream.py); a weight that a LoRA layer wraps gets that layer's delta with the
arithmetic of LoRALinear.merge (the weight cast to the compute dtype first; under QLoRA merged onto its
dequantised weights, the same NF4 round trip the adapter model's base made), every other tensor is only cast
to the output dtype; each is written as soon as it is ready into the output shard of the same name (the
safetensors header is written first, from the shapes, so no shard is ever held whole). Peak: the adapter
plus a few copies of the largest tensor.

The fidelity check never holds two full models either:
- `prompts` (a model whose dense weights are at most PROMPT_CHECK_BYTES): the adapter model's logits on
  the prompts are computed and the model freed before the merged dir is loaded and compared with them;
- `layers` (larger models): a sample of SAMPLE_LAYERS merged layers, each adapter layer (LoRA over its base,
  NF4 under QLoRA) against the weight read back from the written file, on random inputs.

What the stream cannot map merges in memory as before, and says why: a base whose checkpoint does not map
one to one onto the model (or is not safetensors), trained rows of added tokens (the vocabulary grows), a
method whose merge is not LoRA's (which then refuses with its reason).
"""

from __future__ import annotations

import gc
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sftlab.errors import ConfigError, SftlabError
from sftlab.methods.base import Method
from sftlab.methods.lora import LoRA, LoRALinear, lora_modules
from sftlab.models import stream

PROMPT_CHECK_BYTES = 2**30
"""Largest model (dense, in the compute dtype) whose fidelity is checked on whole-model logits: loading it
once costs no more than the streaming merge's own budget (one shard plus 1 GiB). Larger: sampled layers."""
SAMPLE_LAYERS = 8
"""Merged layers compared with their adapter layers in the `layers` check (spread evenly over the model)."""
SAMPLE_ROWS = 16
"""Random inputs per sampled layer."""
SAFETENSORS_NAMES = {dtype: name for name, dtype in stream.DTYPES.items()}


@dataclass
class MergeJob:
    """What a merge needs, read without any weight: the run's config, its method (built with the adapter's
    trained token ids), the adapter dir, the tokenizer saved with it and its chat template."""
    config: Any
    method: Method
    adapter: Path
    tokenizer: Any
    template: Any
    source: str
    base: str | None
    load: Any = None
    """() -> (model, tokenizer, template, method): the adapter model, loaded whole (runs.load_for_inference,
    given by the caller: export sits below runs); used by the in-memory fallback and the prompt check."""


@dataclass
class LayerSample:
    """One sampled LoRA layer: its random inputs and the adapter layer's outputs on them (and, under QLoRA,
    the outputs of the merge not written, to say which merge is closer)."""
    name: str
    x: torch.Tensor
    adapter_out: torch.Tensor
    other_out: torch.Tensor | None = None


@dataclass
class Written:
    """What write_merged wrote: the shard files (in `out`), the sampled layers, why it was not streamed."""
    files: list[str] = field(default_factory=list)
    samples: list[LayerSample] = field(default_factory=list)
    layers: dict[str, LoRALinear] = field(default_factory=dict)
    """The LoRA layers (adapter loaded, base weights on meta), to run the sampled layers again."""
    in_memory: str | None = None


def merge_job(path: str, *, base: str | None) -> MergeJob | None:
    """The merge job of a run dir with adapter/ or a PEFT-format adapter dir (on its base, or `base`);
    None when `path` holds no adapter (a plain model dir, a full fine-tuning run: nothing to merge)."""
    from sftlab import export
    from sftlab.config import load_config
    from sftlab.data.templates import load_template
    from sftlab.methods import METHODS
    from sftlab.models.load import load_tokenizer
    from sftlab.models.portable import locate

    root = Path(path).expanduser()
    if (root / "config.yaml").is_file() and (root / "adapter").is_dir() and not (root / "model").is_dir():
        cfg = locate(load_config(root / "config.yaml", [f"model={base}"] if base else []), root)
        adapter = root / "adapter"
    elif (root / export.ADAPTER_CONFIG).is_file():
        base_path, overrides = export.adapter_settings(root)
        if not (base or base_path):
            raise ConfigError(f"{root} names no base model; pass --base PATH.")
        cfg = load_config(overrides=[*overrides, f"model={base or base_path}", "model.trust_remote_code=false"])
        adapter = root
    else:
        return None
    export.check_adapter_weights(adapter)
    tokenizer = load_tokenizer(str(adapter), trust_remote_code=cfg.model.trust_remote_code)
    method = METHODS[cfg.method](cfg, trainable_token_ids=export.adapter_token_ids(adapter))
    return MergeJob(cfg, method, adapter, tokenizer, load_template("auto", tokenizer), path, base)


def compute_dtype(job: MergeJob) -> torch.dtype:
    """The dtype the merge computes in: the run's model.dtype on the CPU (fp32 for `auto`)."""
    from sftlab.models.load import resolve_dtype

    return resolve_dtype(job.config.model.dtype, torch.device("cpu"))


def stream_refusal(job: MergeJob) -> tuple[Path | None, str | None]:
    """(the base's checked local dir, None) when the merge can stream, else (None, why it merges in memory)."""
    from sftlab.models.load import model_source

    if not isinstance(job.method, LoRA):
        return None, f"{job.method.name} is not a LoRA-type adapter"
    if job.method.trainable_token_ids:
        return None, "the adapter trained rows of added tokens (the merged vocabulary grows)"
    source, why = model_source(job.config.model)
    if source is None:
        return None, why
    missing = [f.name for f in stream.weight_files(source) if not f.is_file()]
    if missing:
        return None, f"{', '.join(missing)} not found in {source} (the stream reads safetensors)"
    skeleton = _skeleton(job, source)
    why = stream.stream_plan(skeleton, stream.checkpoint_tensors(stream.weight_files(source)))
    return (source, None) if why is None else (None, why)


def model_bytes(job: MergeJob, source: Path | None) -> int | None:
    """Bytes of the base in the compute dtype, from its checkpoint headers (None when there are none)."""
    if source is None:
        return None
    element = torch.finfo(compute_dtype(job)).bits // 8
    tensors = stream.checkpoint_tensors(stream.weight_files(source)).values()
    return sum(math.prod(info.shape) * element for info in tensors)


def write_merged(job: MergeJob, out: Path, *, dtype: torch.dtype, onto: str, source: Path | None,
                 why: str | None) -> Written:
    """Write the merged model dir into `out` (weights in `dtype`, config, tokenizer): streamed from
    `source` when it is given, else in memory (`why` says why)."""
    from sftlab import export

    if source is None:
        model, _, _, method = job.load()
        merged = method.merge(model, onto=onto) if method.quantized_base else method.merge(model)
        export.save_model(merged.to(dtype), job.tokenizer, out)
        return Written(in_memory=why)
    written = _stream(job, source, out, dtype=dtype, onto=onto)
    export.save_tokenizer(job.tokenizer, out, None)
    return written


def _stream(job: MergeJob, source: Path, out: Path, *, dtype: torch.dtype, onto: str) -> Written:
    """Read every base tensor, fold the adapter's delta into the weights it wraps, write it in `dtype`."""
    from sftlab.models.quant import TORCHAO_LOGGERS, quiet_loggers

    model = _skeleton(job, source)
    nf4 = _nf4_layers(job, model) if job.method.quantized_base else set()
    LoRA.apply(job.method, model)  # LoRA's wrapping only: the NF4 base is rebuilt layer by layer below
    layers = _with_adapter(job, model)
    sampled = set(_spread(sorted(layers), SAMPLE_LAYERS))
    tensors = stream.checkpoint_tensors(stream.weight_files(source))
    written = Written(layers=layers)
    compute = compute_dtype(job)
    with quiet_loggers(*TORCHAO_LOGGERS), torch.no_grad():
        for file in stream.weight_files(source):
            names = sorted((n for n, info in tensors.items() if info.file == file), key=lambda n: tensors[n].start)
            entries = {n: (tensors[n].shape, _out_dtype(tensors[n], dtype)) for n in names}
            with open(file, "rb", buffering=0) as handle, ShardWriter(out / file.name, entries) as shard:
                for name in names:
                    value = stream.read_tensor(handle, tensors[name])
                    layer_name = name.removesuffix(".weight") if name.endswith(".weight") else None
                    if layer_name in layers:
                        value = _merged_weight(layers[layer_name], value, compute=compute, onto=onto,
                                               nf4=job.config.qlora if layer_name in nf4 else None,
                                               sample=written.samples if layer_name in sampled else None,
                                               name=layer_name)
                    shard.write(name, _cast(value, compute, entries[name][1]))
                    del value
                    stream._release_freed_heap()  # freed tensors of many sizes would stay in glibc's heap
            written.files.append(file.name)
    _write_index(source, out, written.files)
    _write_config(model, out, dtype)
    return written


def _skeleton(job: MergeJob, source: Path) -> nn.Module:
    from sftlab.models.quant import TORCHAO_LOGGERS, quiet_loggers

    model = job.config.model
    with quiet_loggers(*TORCHAO_LOGGERS):
        return stream.skeleton(source, dtype=compute_dtype(job), trust_remote_code=model.trust_remote_code,
                               attn_implementation=model.attn_implementation)


def _nf4_layers(job: MergeJob, model: nn.Module) -> set[str]:
    """The layers QLoRA.apply holds in NF4 (its decoder linear layers that split into whole blocks)."""
    from sftlab.models.quant import fits_nf4
    from sftlab.models.targets import find_targets

    block = job.config.qlora.block_size
    return {name for name in find_targets(model, "all-linear", key="qlora")
            if fits_nf4(model.get_submodule(name), block)}


def _with_adapter(job: MergeJob, model: nn.Module) -> dict[str, LoRALinear]:
    """The skeleton's LoRA layers with the adapter's trained values in real (host) tensors; the base
    weights they wrap stay on the meta device until their tensor is read."""
    from sftlab import export

    layers = lora_modules(model)
    for layer in layers.values():
        for name, param in list(layer.named_parameters(recurse=False)):
            setattr(layer, name, nn.Parameter(torch.zeros(param.shape, dtype=param.dtype), requires_grad=False))
    export.load_trained(model, job.method, job.adapter)
    return layers


def _merged_weight(layer: LoRALinear, stored: torch.Tensor, *, compute: torch.dtype, onto: str, nf4: Any,
                   sample: list[LayerSample] | None, name: str) -> torch.Tensor:
    """The base weight `stored` of `layer` with the adapter folded in, in the compute dtype: onto the NF4
    round trip of the weight when `nf4` (QLoRA's settings) is given and onto="dequantized", onto the weight
    itself otherwise. `sample`: record the adapter layer's outputs on random inputs first."""
    weight = stored.to(compute)
    adapter_base = _nf4_round_trip(weight, nf4, transposed=layer.transposed) if nf4 is not None else weight
    base = adapter_base if onto == "dequantized" else weight
    if sample is not None:
        x = torch.randn(SAMPLE_ROWS, layer.A.shape[1], generator=torch.Generator().manual_seed(len(sample)))
        x = x.to(compute)
        other = (weight if onto == "dequantized" else adapter_base) if nf4 is not None else None
        other_out = None if other is None else _layer_out(layer, _fold(layer, other.clone()), x, merged=True)
        sample.append(LayerSample(name, x, _layer_out(layer, adapter_base, x, merged=False), other_out))
    return _fold(layer, base)  # in place: `base` is this call's own tensor


def _nf4_round_trip(weight: torch.Tensor, qlora: Any, *, transposed: bool) -> torch.Tensor:
    """dequant(NF4(weight)), as the QLoRA adapter model's base held it (NF4Linear stores (out, in))."""
    from sftlab.models.quant import to_nf4

    out_in = (weight.t() if transposed else weight).contiguous()
    dense = to_nf4(out_in, block_size=qlora.block_size, double_quant=qlora.double_quant).get_original_weight()
    stream._release_freed_heap()
    return (dense.t() if transposed else dense).contiguous()


def _fold(layer: LoRALinear, weight: torch.Tensor) -> torch.Tensor:
    """LoRALinear.merge on `weight` (in place) standing in for the layer's base weight: W + s·B·A (DoRA:
    its rescaled form), in the weight's dtype. The layer is left unmerged, its base weight as it was."""
    held = layer.base.weight
    layer.base.weight = nn.Parameter(weight, requires_grad=False)
    try:
        layer.merge()
        return layer.base.weight.detach()
    finally:
        layer.base.weight = held
        layer.merged = False
        if hasattr(layer, "merge_factor"):
            layer.merge_factor = None


def _layer_out(layer: LoRALinear, weight: torch.Tensor, x: torch.Tensor, *, merged: bool) -> torch.Tensor:
    """The layer's output on `x` over base weight `weight`, without its bias (read separately; it is the
    same on both sides): the adapter layer (merged=False) or the merged one (merged=True)."""
    base = layer.base
    held, bias = base.weight, base.bias
    base.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        base.bias = nn.Parameter(torch.zeros(bias.shape, dtype=weight.dtype), requires_grad=False)
    layer.merged = merged
    try:
        return layer.eval()(x).detach()
    finally:
        base.weight, base.bias, layer.merged = held, bias, False


def _cast(value: torch.Tensor, compute: torch.dtype, out: torch.dtype) -> torch.Tensor:
    """`value` in the output dtype, through the compute dtype as the in-memory merge did (loaded in the
    compute dtype, saved in `out`); a round trip that cannot change a value (bf16 -> fp32 -> bf16) is skipped."""
    if not value.is_floating_point() or value.dtype == out:
        return value
    if value.dtype != compute and torch.finfo(compute).bits < torch.finfo(value.dtype).bits:
        value = value.to(compute)
    return value.to(out)


def _out_dtype(info: stream.TensorInfo, dtype: torch.dtype) -> torch.dtype:
    stored = stream.DTYPES[info.dtype]
    return dtype if stored.is_floating_point else stored


def _spread(names: list[str], count: int) -> list[str]:
    """`count` names spread evenly over `names` (all of them when there are fewer)."""
    if len(names) <= count:
        return names
    return [names[round(i * (len(names) - 1) / (count - 1))] for i in range(count)]


class ShardWriter:
    """A safetensors file written tensor by tensor: the header (every tensor's name, dtype, shape and byte
    range, in the order they will be written) first, then each tensor's bytes as it comes. The format: 8
    bytes little-endian header length N, N bytes of JSON (padded with spaces to a multiple of 8), the data."""

    def __init__(self, path: Path, entries: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, (shape, dtype) in entries.items():
            size = math.prod(shape) * torch.finfo(dtype).bits // 8 if dtype.is_floating_point else \
                math.prod(shape) * torch.iinfo(dtype).bits // 8
            header[name] = {"dtype": SAFETENSORS_NAMES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + size]}
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self.entries = dict(entries)
        self.order = iter(entries)
        self.handle = open(path, "wb")  # noqa: SIM115 — closed by __exit__
        self.handle.write(len(text).to_bytes(8, "little") + text)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = next(self.order)
        shape, dtype = self.entries[name]
        if name != expected or tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise RuntimeError(f"shard writer: got {name} {tuple(tensor.shape)} {tensor.dtype}, expected {expected} "
                               f"{tuple(shape)} {dtype}")
        self.handle.write(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.close()
        left = next(self.order, None)
        if left is not None and exc[0] is None:
            raise RuntimeError(f"shard writer: {self.handle.name} closed before {left} was written")


def _write_index(source: Path, out: Path, files: list[str]) -> None:
    """model.safetensors.index.json when the base has one: the same tensors, in the same shard names."""
    if not (source / "model.safetensors.index.json").is_file():
        return
    tensors = stream.checkpoint_tensors([out / name for name in files])
    index = {"metadata": {"total_size": sum(info.end - info.start for info in tensors.values())},
             "weight_map": {name: info.file.name for name, info in sorted(tensors.items())}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def _write_config(model: nn.Module, out: Path, dtype: torch.dtype) -> None:
    """config.json (the base's, with the merged weights' dtype) and generation_config.json, as
    save_pretrained writes them."""
    import copy

    config = copy.deepcopy(model.config)
    config.dtype = dtype
    config.architectures = [type(model).__name__]
    config.save_pretrained(out)
    generation = getattr(model, "generation_config", None)
    if generation is not None and model.can_generate():
        generation.save_pretrained(out)


# --- fidelity ------------------------------------------------------------------------------------------


def reference(job: MergeJob, inputs: list[Any], *, onto: str, other: str | None) -> dict[str, Any]:
    """The adapter model's logits on `inputs` and, under QLoRA (`other` given), the fidelity of the merge
    onto `other` (the one not written) — then the adapter model is freed: only one full model at a time."""
    from sftlab.export.model_dir import fidelity_to, reference_logits

    model, _, _, method = job.load()
    logits = reference_logits(model, inputs)
    result: dict[str, Any] = {"logits": logits}
    if other is not None:
        result["other"] = fidelity_to(logits, method.merge(model, onto=other), inputs)
    del model
    gc.collect()
    return result


def check_prompts(job: MergeJob, out: Path, inputs: list[Any], ref: dict[str, Any]) -> dict[str, float]:
    """The written dir, loaded by itself, against the adapter model's logits `ref`."""
    from sftlab.config import ModelConfig
    from sftlab.export.model_dir import fidelity_to
    from sftlab.models.load import load_model

    dtype = str(compute_dtype(job)).removeprefix("torch.")
    merged = load_model(ModelConfig(path=str(out), dtype=dtype), device=torch.device("cpu"))
    return fidelity_to(ref["logits"], merged, inputs)


def check_layers(job: MergeJob, out: Path, written: Written) -> dict[str, float]:
    """The sampled layers: adapter layer vs the merged weight read back from `out`, on their random inputs.
    max_rel_diff: the largest |Δ| over the largest |adapter output|; other_rel_diff: the same for the
    QLoRA merge not written."""
    from sftlab.models.load import resolve_dtype

    compute = resolve_dtype(job.config.model.dtype, torch.device("cpu"))
    stored = stream.checkpoint_tensors([out / name for name in written.files])
    layers = written.layers
    worst, other = 0.0, 0.0
    for sample in written.samples:
        info = stored[f"{sample.name}.weight"]
        with open(info.file, "rb", buffering=0) as handle, torch.no_grad():
            weight = stream.read_tensor(handle, info).to(compute)
        layer = layers[sample.name]
        scale = sample.adapter_out.abs().max().item() or 1.0
        merged_out = _layer_out(layer, weight, sample.x, merged=True)
        worst = _worse(worst, (merged_out - sample.adapter_out).abs().max().item() / scale)
        if sample.other_out is not None:
            other = _worse(other, (sample.other_out - sample.adapter_out).abs().max().item() / scale)
    result = {"max_rel_diff": worst, "layers": len(written.samples)}
    if any(sample.other_out is not None for sample in written.samples):
        result["other_rel_diff"] = other
    return result


def _worse(current: float, value: float) -> float:
    return value if math.isnan(value) or math.isnan(current) else max(current, value)


def rel_precision(dtype: torch.dtype) -> float:
    """One unit of rounding of `dtype` relative to the value (2^-8 for bf16, 2^-11 fp16, 2^-24 fp32)."""
    return torch.finfo(dtype).eps / 2



# --- the whole merge -------------------------------------------------------------------------------------


def merge_and_check(job: MergeJob, out: Path, *, dtype: torch.dtype, onto: str | None,
                    inputs: list[Any]) -> list[str]:
    """Merge `job` into the new dir `out` (replaced whole once complete; a failed write leaves no half dir),
    check it against the adapter model (on `inputs` when the model is small, on sampled layers when not) and
    return the lines to print. A non-finite difference removes `out` and raises."""
    from sftlab.files import atomic_dir

    onto = onto or "dequantized"
    other = ("original" if onto == "dequantized" else "dequantized") if job.method.quantized_base \
        else None
    source, why = stream_refusal(job)
    size = model_bytes(job, source)
    by_prompts = size is None or size <= PROMPT_CHECK_BYTES
    ref = reference(job, inputs, onto=onto, other=other) if by_prompts else None  # before anything is written
    with atomic_dir(out, what="the merged model") as scratch:
        written = write_merged(job, scratch, dtype=dtype, onto=onto, source=source, why=why)
    how = "streamed tensor by tensor" if written.in_memory is None else f"in memory: {written.in_memory}"
    lines = [f"merged into {out} ({how}; weights in {str(dtype).removeprefix('torch.')})"]
    if by_prompts:
        check = check_prompts(job, out, inputs, ref)
        _refuse_nonfinite(check, out)
        lines.append(f"fidelity (adapter model vs merged dir, {len(inputs)} prompts): "
                     f"max |Δlogit| {check['max_abs_logit_diff']:.2e}, mean KL {check['mean_kl']:.2e}")
        if "other" in ref:
            lines += _closer(onto, other, ref["other"], check, "mean_kl",
                             f"max |Δlogit| {ref['other']['max_abs_logit_diff']:.2e}, mean KL "
                             f"{ref['other']['mean_kl']:.2e}")
        return lines
    check = check_layers(job, out, written)
    _refuse_nonfinite(check, out)
    lines.append(f"fidelity (adapter layers vs merged dir, {check['layers']} sampled layers × {SAMPLE_ROWS} random "
                 f"inputs; the model is {size / 2**30:.1f} GiB dense, whole-model logits are compared up to "
                 f"{PROMPT_CHECK_BYTES / 2**30:.0f} GiB): max relative |Δ| {check['max_rel_diff']:.2e} "
                 f"({str(dtype).removeprefix('torch.')} rounding {rel_precision(dtype):.1e})")
    if "other_rel_diff" in check:
        lines += _closer(onto, other, {"max_rel_diff": check["other_rel_diff"]}, check, "max_rel_diff",
                         f"max relative |Δ| {check['other_rel_diff']:.2e}")
    return lines


def _closer(onto: str, other: str, other_check: dict[str, float], check: dict[str, float], key: str,
            summary: str) -> list[str]:
    """QLoRA: the merge not written, measured too, and which one is closer to the trained adapter model."""
    closer = onto if check[key] <= other_check[key] else other
    return [f"onto {other} (not written): {summary}", f"closer to the trained adapter model: onto {closer}"]


def _refuse_nonfinite(check: dict[str, float], out: Path) -> None:
    import shutil

    if all(math.isfinite(value) for value in check.values()):
        return
    shutil.rmtree(out)
    raise SftlabError(f"the merged model differs from the adapter model by a non-finite amount ({check}): the "
                      f"merge is broken, and {out} was removed. Check the adapter's and the base's weights, or "
                      "merge in float32 (model.dtype=float32, --dtype fp32).")
