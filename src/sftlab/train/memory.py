"""The memory plan: a run's peak memory estimated from config.json, the method and the data, before any
weights are read — printed as one line, and a refusal (with the change that makes it fit) when it cannot fit.

    memory plan: base 3.61 GiB (nf4) + trainable 0.08 GiB + gradients 0.08 GiB + optimizer 0.16 GiB +
    activations ~1.10 GiB (gradient checkpointing on) + runtime 0.62 GiB ≈ 5.65 GiB of 23.1 GiB free (host)

- base: every parameter of the model in the form it stays resident — QLoRA's decoder linear layers in NF4
  (half a byte per weight plus the block scales), everything else in the compute dtype. The parameters are
  counted on a skeleton built from config.json on the meta device (no memory, no weights read).
- trainable / gradients / optimizer: the method's trainable parameters (applied to that skeleton), one
  gradient each, and AdamW's two states each, all in the parameter's dtype.
- activations: what backward keeps per token of the largest micro-batch (train.micro_batch_size × the
  longest row): per decoder layer about ACT_HIDDEN values per hidden unit and ACT_INTERMEDIATE per MLP unit
  without gradient checkpointing; with it, one hidden state per layer plus one layer recomputed. Plus the
  loss's head chunk (fp32 logits, train/loss.py) and one dequantised NF4 weight in flight (with its
  decoding chunk: models/quant.py's dequant).
- runtime: what the process holds already (Python, torch, the tokenizer, the data index) on the host, plus
  SETTLING; the load adds its staging buffer (16 MiB at most) and, under QLoRA, the
  quantiser's working set for the largest layer (QUANTIZE_COPIES) before the training state exists.

The constants are fitted on benchmarks/bench_memory.py's CPU rows (Llama shapes, 135M and 1B): the plan is
meant to be within 25% of the measured peak RSS there; it is an estimate, not a bound.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sftlab.config import PAIR_STAGES
from sftlab.errors import ConfigError
from sftlab.methods.registry import METHODS
from sftlab.models.quant import DEQUANT_CHUNK
from sftlab.models.stream import STAGING_BYTES

GIB = 2**30
ACT_HIDDEN = 18
"""Values kept per hidden unit per token per decoder layer without checkpointing (norm inputs, q/k/v,
attention output, residuals, LoRA inputs)."""
ACT_INTERMEDIATE = 6
"""Values kept per MLP unit per token per decoder layer (gate, up, activation, product, their grads)."""
HEAD_COPIES = 3
"""fp32 copies of one head chunk alive at once (logits, softmax, gradient)."""
QUANTIZE_COPIES = 2.6
"""The streaming load's working set for one NF4 layer, in copies of that layer in the compute dtype: the cast
of the read weight (1) plus torchao's quantiser on it (measured: 1.6, e.g. +272 MiB for a 172 MiB
11008x4096 fp32 weight; models/quant.py: to_nf4)."""
SETTLING = 48 * 2**20
"""What the process adds to its planning-time size whatever the model (the modules imported by the load
and the training loop, autograd's and the optimizer's first allocations): measured at the tiny shape."""


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of the model, from its skeleton: parameter bytes in both stored forms."""
    dense_bytes: int
    """Every parameter in the compute dtype."""
    nf4_bytes: int
    """QLoRA's form: the decoder linear layers that fit NF4 blocks in NF4, the rest dense."""
    lora_trainable: int
    """Bytes of LoRA's/QLoRA's trainable parameters (fp32 A and B) for this config's lora settings."""
    method_trainable: int
    """Bytes of this config's method's trainable parameters."""
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    largest_linear: int
    """Weights of the largest decoder linear layer (one is dequantised at a time under QLoRA)."""
    element: int
    """Bytes per value in the compute dtype."""
    largest_tensor: int
    """Bytes of the largest checkpoint tensor as stored (the load's staging buffer is the smaller of this and
    models/stream.py's STAGING_BYTES)."""


@dataclass(frozen=True)
class MemoryPlan:
    method: str
    base: int
    base_form: str
    trainable: int
    gradients: int
    optimizer: int
    activations: int
    runtime: int
    load_extra: int
    checkpointing: bool
    available: int | None
    where: str

    @property
    def total(self) -> int:
        """Peak: the runtime and the base, plus the larger of the load's staging buffer and the training state."""
        training = self.trainable + self.gradients + self.optimizer + self.activations
        return self.runtime + self.base + max(self.load_extra, training)

    @property
    def fits(self) -> bool:
        return self.available is None or self.total <= self.available

    def line(self) -> str:
        free = f" of {_gib(self.available)} free ({self.where})" if self.available is not None else ""
        return (f"memory plan: base {_gib(self.base)} ({self.base_form}) + trainable {_gib(self.trainable)} + "
                f"gradients {_gib(self.gradients)} + optimizer {_gib(self.optimizer)} + activations "
                f"~{_gib(self.activations)} (gradient checkpointing {'on' if self.checkpointing else 'off'}) + "
                f"runtime {_gib(self.runtime)} ≈ {_gib(self.total)}{free}")


def model_shape(cfg: Any, source: Path, device: torch.device) -> ModelShape:
    """Count the model of `source` (config.json only: a meta skeleton) as `cfg`'s run will hold it."""
    from sftlab.methods.lora import LoRA
    from sftlab.models import stream
    from sftlab.models.load import resolve_dtype
    from sftlab.models.quant import TORCHAO_LOGGERS, fits_nf4, quiet_loggers
    from sftlab.models.targets import find_targets

    dtype = resolve_dtype(cfg.model.dtype, device)
    with quiet_loggers(*TORCHAO_LOGGERS):
        model = stream.skeleton(source, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code,
                                attn_implementation=cfg.model.attn_implementation)
    linear = {name: model.get_submodule(name) for name in find_targets(model, "all-linear", key="qlora")}
    nf4_names = {name for name, module in linear.items() if fits_nf4(module, cfg.qlora.block_size)}
    per_block = 1 if cfg.qlora.double_quant else 4  # int8 scales, or fp32 ones
    dense = nf4 = 0
    for name, param in model.named_parameters():
        size = param.numel() * param.element_size()
        dense += size
        owner = name.rpartition(".")[0]
        if owner in nf4_names and name.endswith(".weight"):
            nf4 += param.numel() // 2 + param.numel() // cfg.qlora.block_size * per_block
        else:
            nf4 += size
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hidden = int(getattr(text, "hidden_size", 0) or getattr(text, "n_embd", 0))
    intermediate = int(getattr(text, "intermediate_size", 0) or getattr(text, "n_inner", 0) or 4 * hidden)
    layers = int(getattr(text, "num_hidden_layers", 0) or getattr(text, "n_layer", 0))
    lora_trainable = _trainable_bytes(LoRA(cfg), model)
    method = METHODS[cfg.method](cfg)
    method_trainable = lora_trainable if isinstance(method, LoRA) else _trainable_bytes(method, model)
    stored = stream.checkpoint_tensors(stream.weight_files(source))  # headers only
    return ModelShape(dense, nf4, lora_trainable, method_trainable, layers, hidden, intermediate,
                      int(model.get_input_embeddings().weight.shape[0]),
                      max((m.weight.numel() for m in linear.values()), default=0), torch.finfo(dtype).bits // 8,
                      max((info.end - info.start for info in stored.values()), default=0))


def _trainable_bytes(method: Any, skeleton: nn.Module) -> int:
    """Bytes of what `method` trains, applied to a fresh copy of the meta skeleton (nothing allocated)."""
    import copy

    model = copy.deepcopy(skeleton)
    method.apply(model)
    return sum(p.numel() * p.element_size() for p in method.trainable_parameters(model).values())


def plan(cfg: Any, shape: ModelShape, *, row_tokens: int, runtime: int, available: int | None,
         where: str) -> MemoryPlan:
    """The plan for `cfg` on a model of `shape`, micro-batches of train.micro_batch_size rows of
    `row_tokens` tokens."""
    qlora = METHODS[cfg.method].quantized_base
    trainable = shape.method_trainable
    checkpointing = bool(cfg.train.gradient_checkpointing)
    tokens = cfg.train.micro_batch_size * row_tokens * (2 if cfg.stage in PAIR_STAGES else 1)  # a pair: two rows
    per_layer = tokens * shape.element * (ACT_HIDDEN * shape.hidden + ACT_INTERMEDIATE * shape.intermediate)
    if checkpointing:
        layers = tokens * shape.element * shape.hidden * shape.layers + per_layer
    else:
        layers = per_layer * shape.layers
    head = min(tokens, 2048) * shape.vocab * 4 * HEAD_COPIES
    # One NF4 weight dequantised at a time (models/quant.py: dequant), plus its decoding chunk's temporaries.
    chunk = min(DEQUANT_CHUNK, shape.largest_linear)
    dequantized = shape.largest_linear * shape.element + chunk * (4 + shape.element) if qlora else 0
    load_extra = min(STAGING_BYTES, shape.largest_tensor) + \
        (int(QUANTIZE_COPIES * shape.largest_linear * shape.element) if qlora else 0)
    return MemoryPlan(cfg.method, shape.nf4_bytes if qlora else shape.dense_bytes,
                      "nf4" if qlora else str(_dtype_name(shape.element)), trainable, trainable, 2 * trainable,
                      layers + head + dequantized, runtime + SETTLING, load_extra, checkpointing, available, where)


def fixes(cfg: Any, shape: ModelShape, current: MemoryPlan, row_tokens: int) -> list[str]:
    """Single changes to `cfg` whose plan fits, each with its estimate, cheapest change first."""
    options: list[tuple[str, Any, int]] = []
    smaller = METHODS[cfg.method].smaller_sibling  # LoRA -> QLoRA
    if smaller is not None:
        options.append((f"method={smaller}", replace(cfg, method=smaller), row_tokens))
    if not cfg.train.gradient_checkpointing:
        options.append(("train.gradient_checkpointing=true",
                        replace(cfg, train=replace(cfg.train, gradient_checkpointing=True)), row_tokens))
    if cfg.train.micro_batch_size > 1:
        options.append(("train.micro_batch_size=1 (raise train.grad_accum_steps to keep the batch)",
                        replace(cfg, train=replace(cfg.train, micro_batch_size=1)), row_tokens))
    for shorter in (row_tokens // 2, row_tokens // 4):
        if shorter >= 64:
            options.append((f"data.max_seq_len={shorter}", cfg, shorter))
    found = []
    for text, variant, rows in options:
        estimate = plan(variant, shape, row_tokens=rows, runtime=current.runtime, available=current.available,
                        where=current.where)
        if estimate.fits:
            found.append(f"{text} (≈ {_gib(estimate.total)})")
    return found


def check(cfg: Any, shape: ModelShape, memory_plan: MemoryPlan, row_tokens: int) -> str | None:
    """Why the plan does not fit and what would make it fit; None when it fits (or memory_check=off)."""
    if memory_plan.fits or cfg.train.memory_check == "off":
        return None
    ways = fixes(cfg, shape, memory_plan, row_tokens)
    fix = ("; it would fit with " + ", or ".join(ways)) if ways else \
        "; no single change of method, gradient checkpointing, micro-batch or row length makes it fit: use a " \
        "machine with more memory (or a smaller model)"
    return (f"the run needs about {_gib(memory_plan.total)} but {_gib(memory_plan.available)} is free{fix}. "
            "To try anyway, set train.memory_check=warn.")


def available_memory(device: torch.device, *, ranks: int = 1) -> tuple[int | None, int, str]:
    """(bytes this process can still use, bytes it holds now, where): the host's MemAvailable (and the
    cgroup's limit) shared by the `ranks` processes of this host, plus this process's RSS, on a CPU; the
    device's free memory plus what torch holds on it on a GPU. None when it cannot be read."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        held = torch.cuda.memory_allocated(device)
        return free + held, held, str(device)
    rss = current_rss()
    limits = []
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        limits.append(int(meminfo["MemAvailable"].split()[0]) * 1024 + rss)
    except (OSError, KeyError, ValueError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max":
            limits.append(int(limit) - used + rss)
    except (OSError, ValueError):
        pass
    if ranks > 1 and limits:  # each process of this host gets its share of what is free
        return min(limits) // ranks + rss * (ranks - 1) // ranks, rss, f"host, per process of {ranks}"
    return (min(limits) if limits else None), rss, "host"


def current_rss() -> int:
    """This process's resident set size in bytes (0 where /proc is not there)."""
    try:
        for line in Path(f"/proc/{os.getpid()}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def peak_rss() -> int:
    """This process's peak resident set size in bytes (VmHWM; ru_maxrss where /proc is not there)."""
    try:
        for line in Path(f"/proc/{os.getpid()}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def max_row_tokens(cfg: Any, data: Any) -> int:
    """The longest row a micro-batch can hold: data.max_seq_len when packing, else the longest example."""
    if cfg.data.packing and cfg.data.max_seq_len:
        return int(cfg.data.max_seq_len)
    lengths = data.lengths() if callable(getattr(data, "lengths", None)) else getattr(data, "lengths", None)
    return int(max(lengths)) if lengths is not None and len(lengths) else int(cfg.data.max_seq_len or 2048)


def _dtype_name(element: int) -> str:
    return {4: "fp32", 2: "bf16/fp16", 8: "fp64"}.get(element, f"{element} bytes")


def _gib(count: int | None) -> str:
    if count is None:
        return "?"
    return f"{count / GIB:.2f} GiB" if count >= GIB // 10 else f"{count / 2**20:.1f} MiB"


def plan_run(cfg: Any, data: Any, device: torch.device, console: Any) -> Any:
    """Print the run's memory plan; raise ConfigError (exit 2) when it does not fit and train.memory_check
    is refuse (warn: say so and go on; off: no plan). Returns `cfg` with train.gradient_checkpointing=auto
    resolved: on only when the plan without it does not fit (off when no plan is made: a hub id not
    downloaded yet, memory_check=off). Under torchrun each process plans for itself: a whole replica (DDP's
    case; FSDP's shards need less) in its share of the host's memory, or its own GPU's."""
    if cfg.train.memory_check == "off":
        return resolve_checkpointing(cfg, None, console)
    from sftlab.models.load import model_source

    source, why = model_source(cfg.model)
    if source is None:
        console.print(f"memory plan: not made ({why})")
        return resolve_checkpointing(cfg, None, console)
    try:
        shape = model_shape(cfg, source, device)
    except Exception as exc:  # broad on purpose: a method that needs real weights to apply (e.g. a soft prompt
        # initialised from text) cannot be counted on meta; the plan is advice, the load reports real errors
        console.print(f"memory plan: not made ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
        return resolve_checkpointing(cfg, None, console)
    rows = max_row_tokens(cfg, data)
    available, runtime, where = available_memory(device, ranks=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    without = plan(resolve_checkpointing(cfg, False, None), shape, row_tokens=rows, runtime=runtime,
                   available=available, where=where)
    cfg = resolve_checkpointing(cfg, not without.fits, console, without)
    memory_plan = plan(cfg, shape, row_tokens=rows, runtime=runtime, available=available, where=where)
    refusal = check(cfg, shape, memory_plan, rows)
    if refusal is not None and cfg.train.memory_check == "refuse":
        raise ConfigError(f"{memory_plan.line()}: {refusal}")
    console.print(memory_plan.line())
    if refusal is not None:
        console.print(f"[yellow]memory plan does not fit (train.memory_check=warn): {refusal}[/]")
    return cfg


def resolve_checkpointing(cfg: Any, needed: bool | None, console: Any, without: MemoryPlan | None = None) -> Any:
    """`cfg` with train.gradient_checkpointing=auto made `needed` (None: no plan, so off), said on `console`;
    any other setting is returned as it is."""
    if cfg.train.gradient_checkpointing != "auto":
        return cfg
    on = bool(needed)
    if console is not None:
        why = "no memory plan" if without is None else \
            f"without it the plan is {_gib(without.total)} of {_gib(without.available)} free"
        console.print(f"gradient checkpointing: auto -> {'on' if on else 'off'} ({why})")
    return replace(cfg, train=replace(cfg.train, gradient_checkpointing=on))
