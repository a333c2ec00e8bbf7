"""The typed config tree: YAML file + dotted `key=value` overrides, validated once, defaults in one place.

>>> cfg = load_config(overrides=["data.max_seq_len=512", "data.template=chatml"])
>>> cfg.data.max_seq_len, cfg.data.template
(512, 'chatml')
>>> load_config(overrides=["data.max_seq_lne=1"])
Traceback (most recent call last):
...
sftlab.errors.ConfigError: unknown key 'data.max_seq_lne': did you mean 'data.max_seq_len'?
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args, get_origin

import yaml

from sftlab.errors import ConfigError, shown

FORMATS = ("auto", "messages", "prompt_completion", "alpaca", "sharegpt")
ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class SourceConfig:
    """One data source of data.train / data.eval (data/sources.py reads it); a plain string is its `path`."""
    SHORTHAND: ClassVar[str] = "path"

    path: str = ""
    """A file (.jsonl, .json, .parquet, .arrow, .csv), a glob, a directory (a `datasets.save_to_disk` dir or a
    dir of data files), or a Hugging Face Hub dataset id (`org/name` or `hf://datasets/org/name`)."""
    name: str | None = None
    """The dataset's config (subset) name, for directories and hub datasets that have several."""
    split: str | None = None
    """The split to read from a directory or hub dataset; None: `train` (or the only split)."""
    revision: str | None = None
    """Hub datasets only: a branch, tag or commit sha to pin."""
    format: Literal["auto", "messages", "prompt_completion", "alpaca", "sharegpt"] | None = None
    """This source's row format; None: data.format."""
    columns: dict[str, str] = field(default_factory=dict)
    """sftlab field -> the dataset's column, e.g. {messages: conversation} or {prompt: question}."""
    role_map: dict[str, str] = field(default_factory=dict)
    """Extra role names for this source, on top of data.role_map."""
    system_prompt: str | None = None
    """A system message put first in each of this source's conversations that has none."""
    weight: float | None = None
    """This source's share of each epoch's examples (relative to the other sources' weights)."""
    max_samples: int | None = None
    """Use at most this many of this source's examples (a seeded choice)."""
    train_on: Literal["assistant", "last_assistant", "all"] | None = None
    """Which tokens of this source's examples train; None: data.train_on."""

    def __post_init__(self) -> None:
        if not self.path:
            raise ConfigError("a data source (of data.train or data.eval) has no path; set `path:` (a file, glob, "
                              "directory or hub dataset id).")
        if self.weight is not None and not (math.isfinite(self.weight) and self.weight > 0):
            raise ConfigError(f"the weight of data source {self.path} must be a positive number, got {self.weight}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ConfigError(f"max_samples of data source {self.path} must be at least 1 or null, got "
                              f"{self.max_samples}")
        for source, target in self.role_map.items():
            if target not in ROLES:
                raise ConfigError(f"role_map of data source {self.path} maps {source!r} to {target!r}; expected "
                                  f"one of {', '.join(ROLES)}")
        for ours in self.columns:
            if ours not in SOURCE_FIELDS:
                raise ConfigError(f"columns of data source {self.path} maps {ours!r}, not a field sftlab reads; "
                                  f"expected one of {', '.join(SOURCE_FIELDS)} (written as sftlab_field: column).")


SOURCE_FIELDS = ("messages", "conversations", "prompt", "completion", "instruction", "input", "output", "system",
                 "chosen", "rejected")
"""The row fields a source's `columns` may map a dataset's columns onto."""

Sources = str | SourceConfig | tuple[SourceConfig, ...]


def check_num_workers(value: Any) -> None:
    """data.num_workers: `auto` or a number of processes, 1 or more (a bool is not a number here)."""
    if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"data.num_workers must be auto or a number of processes (1 or more), got {shown(value)}")


def sources_of(value: Sources | None) -> tuple[SourceConfig, ...]:
    """data.train / data.eval as a tuple of sources (a string is one source's path)."""
    if value is None or value == "" or value == ():
        return ()
    if isinstance(value, str):
        return (SourceConfig(path=value),)
    if isinstance(value, SourceConfig):
        return (value,)
    return tuple(value)


@dataclass(frozen=True)
class DataConfig:
    train: str | SourceConfig | tuple[SourceConfig, ...] | None = None
    """Training data: one source or a list of them. A source is a path (a .jsonl (streamed), .json, .parquet,
    .arrow or .csv file, a glob, a dataset directory, a hub dataset id) or a mapping {path, name, split,
    revision, format, columns, role_map, system_prompt, weight, max_samples, train_on}."""
    eval: str | SourceConfig | tuple[SourceConfig, ...] | None = None
    """Optional evaluation data, the same kinds of sources as `train`."""
    eval_fraction: float = 0.0
    """Without data.eval: the share of training examples held out for evaluation (chosen by train.seed)."""
    format: Literal["auto", "messages", "prompt_completion", "alpaca", "sharegpt"] = "auto"
    """Row format; `auto` detects it from the first row's keys."""
    role_map: dict[str, str] = field(default_factory=dict)
    """Extra role names mapped to system/user/assistant (e.g. {bot: assistant}); sharegpt's
    human/gpt/system are always mapped."""
    on_bad_row: Literal["error", "skip"] = "error"
    """`error` stops at the first bad row; `skip` writes each rejected row and its reason to rejects.jsonl."""
    template: str = "auto"
    """`chatml`, `llama3`, `auto` (the tokenizer's own chat template) or a path to a .jinja file."""
    train_on: Literal["assistant", "last_assistant", "all"] = "assistant"
    """Which tokens are trained; a message's own `"train": true|false` overrides this."""
    reasoning: Literal["keep", "drop"] = "keep"
    """Assistant reasoning (`reasoning_content`, inline `<think>` blocks): trained where the template renders
    it (`keep`), or removed from every message before rendering (`drop`)."""
    reasoning_turns: Literal["rendered", "split"] = "rendered"
    """`rendered` trains a conversation as its template renders it (templates such as Qwen3's drop the
    reasoning of earlier turns; `check` counts them); `split` makes one example per assistant turn with
    reasoning, each with the history as the template shows it at that turn, so no reasoning is lost."""
    max_seq_len: int | None = None
    """Longest example in tokens; None (the default) means the model's limit: its config.json's
    max_position_embeddings (or n_positions, ...), and 2048 for a model that declares none. A value beyond
    the model's limit is refused."""
    max_row_bytes: int | None = None
    """Longest input row in bytes, checked before the row is parsed (a longer one is a bad row, see
    on_bad_row); None derives it from max_seq_len: 32 bytes per token + 64 KiB (128 KiB at 2048)."""
    truncation: Literal["drop", "truncate"] = "drop"
    """What to do with a longer example: drop it (counted and reported) or cut it to max_seq_len."""
    packing: bool = False
    """Pack examples into rows of max_seq_len tokens, run without padding; each example keeps its own
    positions and attention (exact: the loss equals unpacked). With false, batches group examples of
    similar length so they pad little. Not available for the soft-prompt methods."""
    share_prefixes: bool = True
    """With packing (stage sft): a conversation that begins with the same untrained tokens as another in its
    packed row (the same system prompt, the template's header) reads that one's copy instead of running its
    own: the same loss and gradients, fewer tokens through the model. Not with flash-attention kernels, with
    half precision on a GPU (there the one-call varlen kernel is faster than what sharing saves), or with
    train.compile (each row's prefixes would recompile the layers)."""
    add_special_tokens: bool = False
    """Add a template's special tokens that the tokenizer lacks (e.g. ChatML on a base model)."""
    special_tokens_in_content: Literal["text", "error", "allow"] = "text"
    """A special-token string inside a message's content (`<|im_end|>` typed in a reply): `text` encodes it
    as ordinary text, never the control token; `error` refuses the row (file:line, the token); `allow`
    keeps the control token (forged turns get trained; counted and warned about)."""
    cache_dir: str | None = None
    """Where encoded datasets are cached; None means $SFTLAB_CACHE or ~/.cache/sftlab."""
    cache: bool = True
    """Reuse an encoded dataset when data, tokenizer, template and settings are unchanged."""
    num_workers: int | Literal["auto"] = "auto"
    """Processes that encode conversations (render, tokenise, mask); the result is the same for any number.
    `auto`: the CPU cores this process may use (at most 8; shared among local ranks that each encode), or 1
    (in-process, tokenising on a second thread) for an input under 16 MiB or on fewer than 3 cores.
    Preference and feedback rows are encoded in one process."""

    def __post_init__(self) -> None:
        check_num_workers(self.num_workers)
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"data.eval_fraction must be in [0, 1), got {shown(self.eval_fraction)}")
        if self.max_seq_len is not None and self.max_seq_len < 2:
            raise ConfigError(f"data.max_seq_len must be at least 2 or null (no limit), got {shown(self.max_seq_len)}")
        if self.max_row_bytes is not None and self.max_row_bytes < 1:
            raise ConfigError(f"data.max_row_bytes must be a positive number of bytes or null (derived from "
                              f"data.max_seq_len), got {shown(self.max_row_bytes)}")
        for source, target in self.role_map.items():
            if target not in ROLES:
                raise ConfigError(f"data.role_map maps {shown(source)} to {shown(target)}; expected one of "
                                  f"{', '.join(ROLES)}")
        train = sources_of(self.train)
        weighted = [s.weight is not None for s in train]
        if any(weighted) and not all(weighted):
            missing = train[weighted.index(False)].path
            raise ConfigError(f"some data.train sources have a weight and {missing} has none; give every source "
                              "a weight (each one's share of an epoch), or none (each source's examples once).")
        if any(s.weight is not None for s in sources_of(self.eval)):
            raise ConfigError("a data.eval source has a weight; evaluation uses every eval example once. Remove it.")


@dataclass(frozen=True)
class ModelConfig:
    SHORTHAND: ClassVar[str] = "path"  # `model: some/dir` means `model.path: some/dir`

    path: str | None = None
    """A local Hugging Face model dir, a hub id, or a .gguf file."""
    gguf_dir: str | None = None
    """Written by a run whose model is a .gguf file (not set by hand): the cached Hugging Face dir the file
    was converted to (its name holds the cache key). The run loads from it when the .gguf file has moved."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """`auto`: bfloat16 on a CUDA GPU that supports it, float32 otherwise (always float32 on CPU)."""
    trust_remote_code: bool = False
    """Run model code shipped with the checkpoint; off unless you trust its source."""
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2"] = "auto"
    """Attention kernel; `auto` lets transformers choose (sdpa where available). flash_attention_2 needs a
    GPU and the flash-attn package; packed rows then use its varlen kernel."""


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 16
    """Rank R of the update B @ A."""
    alpha: float = 32.0
    """The update is scaled by alpha / rank (alpha / sqrt(rank) with rslora)."""
    dropout: float = 0.0
    """Dropout on the adapter's input during training."""
    targets: str | tuple[str, ...] = "all-linear"
    """`all-linear` (every linear layer of the decoder but the output head), a list of module-name
    suffixes (e.g. [q_proj, v_proj]), or any other string: a regex that must match full module names
    (e.g. `.*layers[.][0-3][.].*(q_proj|v_proj)`)."""
    rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(rank)."""
    dora: bool = False
    """DoRA: a trained magnitude per output row times the normalised direction (W0 + s·B·A)."""

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise ConfigError(f"lora.rank must be a positive integer, got {shown(self.rank)}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):  # `alpha <= 0` is False for NaN
            raise ConfigError(f"lora.alpha must be positive and finite, got {shown(self.alpha)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {shown(self.dropout)}")
        if not self.targets:
            raise ConfigError("lora.targets is empty; set all-linear, a list of module-name suffixes (e.g. "
                              "[q_proj, v_proj]) or a regular expression over full module names.")


@dataclass(frozen=True)
class FullConfig:
    freeze_embeddings: bool = False
    """Keep the input embeddings (and a tied output head) frozen during full fine-tuning."""


SEED_LIMIT = 2**32
"""Seeds are in [0, 2**32): what numpy's and every framework's generators take."""
TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")
"""The experiment trackers train.report_to may name (train/trackers.py)."""


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int | None = None
    """Optimizer steps to run; None means `epochs` full passes over the data."""
    epochs: float = 1.0
    """Passes over the training data when max_steps is None."""
    micro_batch_size: int = 4
    """Examples per forward/backward pass; with data.packing, packed rows of data.max_seq_len tokens."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step; the step's loss is the mean over all their supervised tokens."""
    lr: float = 2e-4
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay; never applied to norms and biases."""
    betas: tuple[float, ...] = (0.9, 0.999)
    """AdamW betas."""
    warmup_steps: int = 0
    """Linear warmup from 0 to lr."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup (cosine and linear go to 0 at the last step)."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm; None disables clipping."""
    seed: int = 42
    """Seeds data order, adapter init and dropout."""
    save_every_steps: int | None = None
    """Checkpoint period; None saves only at the end."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep."""
    resume: Literal["auto", "never"] = "auto"
    """`auto` continues from the newest checkpoint in output_dir, if any."""
    resume_on_new_data: bool = False
    """Let a resumed run continue on data files whose content changed since its checkpoints were written
    (refused by default: the run would go on in the old data order over other rows)."""
    eval_every_steps: int | None = None
    """Evaluate on data.eval / the held-out fraction every N steps (and at the end)."""
    early_stopping_patience: int | None = None
    """Stop after this many evaluations without a better eval loss."""
    gradient_checkpointing: bool | Literal["auto"] = False
    """Recompute activations in backward: less memory, about a third slower. `auto`: on only when the
    memory plan (train/memory.py) does not fit without it (off when no plan is made)."""
    memory_check: Literal["refuse", "warn", "off"] = "refuse"
    """Before the weights are read, estimate the run's peak memory (train/memory.py; one `memory plan:` line)
    and `refuse` to start when it exceeds the free memory, naming the change that makes it fit; `warn`: say
    so and start anyway; `off`: no plan."""
    compile: bool = False
    """torch.compile the model (the first steps are slow while it compiles)."""
    distributed: Literal["auto", "ddp", "fsdp"] = "auto"
    """Under torchrun: DDP (a full replica per process) or FSDP2 (parameters sharded per decoder layer);
    auto picks DDP when the model and its training state fit one device. Ignored in a single process."""
    fused_ops: bool = True
    """Run the model's RMSNorm and SiLU-gated MLP through fused versions (models/fused.py), each checked
    against the original on a random input first: same values, less activation memory, a little faster."""
    log_every_steps: int = 1
    """Period of metrics.jsonl lines and progress-bar updates."""
    tensorboard: bool = False
    """Kept as an alias: true is report_to including tensorboard."""
    report_to: str | tuple[str, ...] = ()
    """Experiment trackers that log the same scalars as metrics.jsonl, plus the resolved config, from rank 0:
    tensorboard (event files in OUTPUT/tensorboard), wandb (WANDB_MODE=offline for a local run in
    OUTPUT/wandb), mlflow (MLFLOW_TRACKING_URI, default a file store in OUTPUT/mlruns), trackio (its local
    database). Each needs its package; a missing one is an error before the run starts."""
    profile: bool = False
    """Record each step's seconds in data / forward / backward / optimizer in metrics.jsonl (on a GPU this
    synchronises at each phase, which costs a little speed)."""
    neftune_alpha: float | None = None
    """NEFTune: uniform noise of scale alpha / sqrt(row length × hidden size) added to the input embeddings at
    each training forward (train/neftune.py; the paper's alpha is 5 to 15); null: none. SFT only."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """A step whose loss or gradient norm is NaN/inf: `stop` the run (nothing of that step is applied; the last
    checkpoint stays), or `skip` the step (no update; the run stops anyway after 10 such steps in a row).
    Either way the step and its batch's source rows are named."""

    def __post_init__(self) -> None:
        if isinstance(self.report_to, str):  # `report_to: wandb` means [wandb]
            object.__setattr__(self, "report_to", (self.report_to,))
        unknown = [name for name in self.report_to if name not in TRACKERS]
        if unknown:
            raise ConfigError(f"train.report_to: {', '.join(map(repr, unknown))} is not a tracker sftlab logs to; use "
                              f"any of {', '.join(TRACKERS)} (metrics.jsonl and the report are always written).")
        for key in ("micro_batch_size", "grad_accum_steps", "keep_checkpoints", "log_every_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key} must be at least 1, got {shown(getattr(self, key))}")
        if self.warmup_steps < 0:
            raise ConfigError(f"train.warmup_steps must be 0 or more, got {shown(self.warmup_steps)}")
        if self.neftune_alpha is not None and not (math.isfinite(self.neftune_alpha) and self.neftune_alpha > 0):
            raise ConfigError(f"train.neftune_alpha must be a positive number (the paper uses 5 to 15), got "
                              f"{shown(self.neftune_alpha)}; set null for no embedding noise.")
        # Floats are checked with isfinite first: every comparison with NaN is False, so `lr <= 0` lets it by.
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"train.weight_decay must be 0 or more and finite, got {shown(self.weight_decay)}")
        if self.max_grad_norm is not None and not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ConfigError("train.max_grad_norm must be positive and finite, or null (no clipping), got "
                              f"{shown(self.max_grad_norm)}")
        for key in ("max_steps", "save_every_steps", "eval_every_steps", "early_stopping_patience"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"train.{key} must be at least 1 or null, got {shown(value)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"train.lr must be positive and finite, got {shown(self.lr)}")
        if not math.isfinite(self.epochs) or (self.max_steps is None and self.epochs <= 0):
            raise ConfigError(f"train.epochs must be positive and finite, got {shown(self.epochs)}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"train.betas must be two numbers in [0, 1), got {shown(list(self.betas))}")
        if not 0 <= self.seed < SEED_LIMIT:
            raise ConfigError(f"train.seed must be an integer in [0, 2**32), got {shown(self.seed)}")


PROBE_SETS = ("builtin", "none")
"""eval.probe's named values; anything else is a JSONL file of conversations (train/probe.py)."""
PROBE_DEFAULT_ENV = "SFTLAB_PROBE"
"""An environment variable that sets eval.probe's default (`none` in a CI job or a test suite that trains hundreds
of tiny runs); a config's own eval.probe always wins."""


def _probe_default() -> str:
    return os.environ.get(PROBE_DEFAULT_ENV, "").strip() or "builtin"


@dataclass(frozen=True)
class EvalConfig:
    probe: str = field(default_factory=_probe_default)
    """The forgetting probe (train/probe.py): `builtin` (~100 general prompts shipped with sftlab), `none` (off), or
    a JSONL file of conversations without the final answer ({"messages": [...], "open": true|false}). Before
    training the base answers each prompt greedily; probe_nll / probe_kl measure how far the model drifts from
    those answers at every eval point and at the end."""
    probe_generate: bool = False
    """Also sample answers to the open-ended probe prompts at every eval point (probe_distinct2,
    probe_repetition, probe_length); they are always sampled at the start and at the end."""
    probe_max_new_tokens: int = 24
    """The longest probe answer, in tokens (the base's reference answers and the sampled ones): the probe's cost
    is mostly decoding steps, so this sets it (24: most general answers are longer, so the probe compares the
    first 24 tokens of each; 32 cost a fifth more on the demo)."""
    probe_top_k: int = 16
    """The base's most likely next tokens kept per answer token for probe_kl (KL over them plus one bucket for
    the rest of the vocabulary: exactly 0 for the same model, a lower bound of the full KL otherwise)."""
    probe_batch_size: int = 128
    """Probe prompts decoded together (bounds the probe's memory: a KV cache of this many rows of prompt +
    probe_max_new_tokens tokens). A decoding step has a cost of its own whatever its rows (it reads every
    weight): SmolLM2-135M on 2 CPU cores, a step of 1 row 97 ms, 38 rows 255 ms, 64 rows 308 ms, 102 rows
    449 ms; so the built-in ~100 prompts decode as one batch (at 64, in two: the probe's greedy pass took 22 s
    instead of 19 s on the demo, before the in-place cache). The instruction tax's sampled answers join their
    prompts' batch."""
    probe_kl_threshold: float = 0.25
    """Forgetting is flagged when probe_kl (nats per answer token) passes this while the eval loss has stopped
    improving; the recommended checkpoint is the best eval loss whose probe_kl stays under it."""
    probe_stop: bool = False
    """Stop training (as early stopping does) when forgetting is flagged."""

    def __post_init__(self) -> None:
        if not isinstance(self.probe, str) or not self.probe.strip():
            raise ConfigError(f"eval.probe must be builtin, none or a JSONL file path, got {shown(self.probe)}")
        for key in ("probe_max_new_tokens", "probe_top_k", "probe_batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"eval.{key} must be at least 1, got {shown(getattr(self, key))}")
        if self.probe_max_new_tokens > 4096:
            raise ConfigError(f"eval.probe_max_new_tokens must be at most 4096, got {shown(self.probe_max_new_tokens)}")
        if not (math.isfinite(self.probe_kl_threshold) and self.probe_kl_threshold > 0):
            raise ConfigError("eval.probe_kl_threshold must be positive and finite (nats per token, e.g. 0.25), got "
                              f"{shown(self.probe_kl_threshold)}")
        if self.probe_stop and self.probe == "none":
            raise ConfigError("eval.probe_stop=true watches the probe, but eval.probe=none turns it off; set "
                              "eval.probe=builtin (or a file), or remove eval.probe_stop.")


@dataclass(frozen=True)
class QLoRAConfig:
    block_size: int = 64
    """NF4 quantisation block: one scale per `block_size` weights."""
    double_quant: bool = True
    """Quantise the per-block scales too (saves about 0.4 bits per weight)."""

    def __post_init__(self) -> None:
        if self.block_size < 2 or self.block_size % 2:
            raise ConfigError("qlora.block_size must be a positive even integer (e.g. 64), got "
                              f"{shown(self.block_size)}")


@dataclass(frozen=True)
class AdapterConfig:
    placement: Literal["houlsby", "pfeiffer"] = "houlsby"
    """houlsby: after the attention block and after the MLP block; pfeiffer: after the MLP only."""
    bottleneck_dim: int = 64
    """Width of the bottleneck (down-projection output)."""
    activation: Literal["relu", "gelu", "silu"] = "relu"
    """Non-linearity between the down and up projections (the reason adapters cannot merge)."""
    dropout: float = 0.0
    """Dropout inside the adapter during training."""

    def __post_init__(self) -> None:
        if self.bottleneck_dim <= 0:
            raise ConfigError(f"adapter.bottleneck_dim must be a positive integer, got {shown(self.bottleneck_dim)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"adapter.dropout must be in [0, 1), got {shown(self.dropout)}")


@dataclass(frozen=True)
class PromptConfig:
    num_virtual_tokens: int = 20
    """Trained embeddings prepended to every input."""
    init_text: str | None = None
    """Initialise them from the embeddings of this text's tokens (repeated to length); None: random
    rows of the vocabulary."""

    def __post_init__(self) -> None:
        if self.num_virtual_tokens <= 0:
            raise ConfigError(f"prompt.num_virtual_tokens must be positive, got {shown(self.num_virtual_tokens)}")


@dataclass(frozen=True)
class PTuningConfig:
    num_virtual_tokens: int = 20
    """Virtual tokens produced by the prompt encoder."""
    encoder: Literal["mlp", "lstm"] = "mlp"
    """The trainable prompt encoder; folded into plain virtual-token embeddings at export."""
    encoder_hidden: int = 128
    """Hidden size of the prompt encoder."""

    def __post_init__(self) -> None:
        if self.num_virtual_tokens <= 0 or self.encoder_hidden <= 0:
            raise ConfigError("ptuning.num_virtual_tokens and ptuning.encoder_hidden must be positive")


@dataclass(frozen=True)
class PrefixConfig:
    num_virtual_tokens: int = 20
    """Trained key/value prefix length, per layer."""
    reparameterize: bool = True
    """Train the prefixes through an MLP (more stable); it is folded away at export."""
    encoder_hidden: int = 128
    """Hidden size of that MLP."""

    def __post_init__(self) -> None:
        if self.num_virtual_tokens <= 0 or self.encoder_hidden <= 0:
            raise ConfigError("prefix.num_virtual_tokens and prefix.encoder_hidden must be positive")


@dataclass(frozen=True)
class DPOConfig:
    beta: float = 0.1
    """β: how far the policy may move from the reference (larger keeps it closer); IPO's τ for loss=ipo."""
    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    """`sigmoid`: DPO, −log σ(β·(Δ_chosen − Δ_rejected)); `ipo`: IPO's squared loss on the log-ratios averaged
    per answer token (train/preference.py)."""
    label_smoothing: float = 0.0
    """loss=sigmoid only: the share of preference labels taken as flipped (conservative DPO), in [0, 0.5)."""
    precompute_reference: bool = False
    """Compute the reference's log-probs of every pair once, before training, instead of at every step: full
    fine-tuning then keeps no frozen copy of the model, adapter methods skip the reference forward per step."""
    init_from: str | None = None
    """Start from an SFT run dir (or its adapter/ or model/ dir) instead of the bare base model `model`."""
    init: Literal["continue", "merge"] = "continue"
    """With init_from and an adapter method: `continue` trains the SFT adapter further (the reference, the SFT
    model, is precomputed); `merge` folds it into the base first (written to OUTPUT/base) and trains a fresh
    adapter over it (the reference: that merged model, the adapter disabled)."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ConfigError(f"dpo.beta must be positive and finite, got {shown(self.beta)}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"dpo.label_smoothing must be in [0, 0.5), got {shown(self.label_smoothing)}")
        if self.label_smoothing and self.loss != "sigmoid":
            raise ConfigError(f"dpo.label_smoothing applies to dpo.loss=sigmoid only (found {self.loss}); remove it.")


@dataclass(frozen=True)
class ORPOConfig:
    ALIASES: ClassVar[dict[str, str]] = {"lambda": "lambda_"}  # `lambda` is a Python keyword

    lambda_: float = 0.1
    """λ (written `orpo.lambda`; TRL's beta): the weight of the odds-ratio term added to the NLL term."""
    nll: Literal["answer", "sequence"] = "answer"
    """The NLL term: `answer`, the cross-entropy of the chosen answers' scored tokens (the prompt is never
    trained); `sequence`, over the chosen prompt and answer, every token after the first (TRL's ORPOTrainer)."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lambda_) and self.lambda_ > 0):  # `<= 0` is False for NaN
            raise ConfigError(f"orpo.lambda must be positive and finite, got {shown(self.lambda_)}")


@dataclass(frozen=True)
class SimPOConfig:
    beta: float = 2.0
    """β: the scale of the length-averaged log-probability margin."""
    gamma: float = 1.0
    """γ: the target reward margin itself (TRL's CPOTrainer takes it as simpo_gamma)."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ConfigError(f"simpo.beta must be positive and finite, got {shown(self.beta)}")
        if not (math.isfinite(self.gamma) and self.gamma >= 0):
            raise ConfigError(f"simpo.gamma must be 0 or more and finite, got {shown(self.gamma)}")


@dataclass(frozen=True)
class KTOConfig:
    beta: float = 0.1
    """β: how far the policy may move from the reference (larger keeps it closer)."""
    desirable_weight: float = 1.0
    """The weight of each desirable (label true) example's loss."""
    undesirable_weight: float = 1.0
    """The weight of each undesirable (label false) example's loss; with unbalanced data `sftlab check` proposes
    the weights (desirable_weight·desirable count / (undesirable_weight·undesirable count) in [1, 4/3])."""

    def __post_init__(self) -> None:
        for key in ("beta", "desirable_weight", "undesirable_weight"):
            if not (math.isfinite(getattr(self, key)) and getattr(self, key) > 0):
                raise ConfigError(f"kto.{key} must be positive and finite, got {shown(getattr(self, key))}")


PAIR_STAGES = ("dpo", "orpo", "simpo")
"""Stages that train on preference pairs {prompt, chosen, rejected}."""
STAGE_SECTIONS = {"dpo": "dpo", "orpo": "orpo", "simpo": "simpo", "kto": "kto"}
"""The config section each preference stage reads; another stage's section must keep its defaults."""

METHODS = ("full", "lora", "qlora", "adapter", "prompt", "ptuning", "prefix")
SOFT_PROMPT_METHODS = ("prompt", "ptuning", "prefix")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The base model (`model: PATH` is short for `model.path: PATH`)."""
    method: Literal["full", "lora", "qlora", "adapter", "prompt", "ptuning", "prefix"] = "lora"
    """What trains: `full` (every weight), `lora` (low-rank adapters, base frozen), `qlora` (LoRA over an
    NF4 base), `adapter` (bottleneck adapters), `prompt` / `ptuning` / `prefix` (soft prompts)."""
    output_dir: str = "runs/run"
    """Where the run writes its files (config.yaml, metrics.jsonl, checkpoints/, adapter/ or model/)."""
    stage: Literal["sft", "dpo", "orpo", "simpo", "kto"] = "sft"
    """`sft`: supervised fine-tuning on conversations; `dpo`: preference training on pairs
    {prompt, chosen, rejected} (the `dpo` section); `orpo` and `simpo`: reference-free preference training on
    the same pairs (the `orpo` / `simpo` sections); `kto`: unpaired feedback {prompt, completion, label}
    (the `kto` section)."""
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    full: FullConfig = field(default_factory=FullConfig)
    qlora: QLoRAConfig = field(default_factory=QLoRAConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    ptuning: PTuningConfig = field(default_factory=PTuningConfig)
    prefix: PrefixConfig = field(default_factory=PrefixConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    """The forgetting probe (train/probe.py) and `sftlab eval`."""
    dpo: DPOConfig = field(default_factory=DPOConfig)
    orpo: ORPOConfig = field(default_factory=ORPOConfig)
    simpo: SimPOConfig = field(default_factory=SimPOConfig)
    kto: KTOConfig = field(default_factory=KTOConfig)

    def __post_init__(self) -> None:
        if self.data.packing and self.method in SOFT_PROMPT_METHODS:
            raise ConfigError(f"data.packing=true cannot be used with method {self.method}: its virtual tokens "
                              "belong at the start of each example, and a packed row holds several. Set "
                              "data.packing=false.")
        has_eval = bool(self.data.eval) or self.data.eval_fraction > 0
        for key in ("eval_every_steps", "early_stopping_patience"):
            if getattr(self.train, key) is not None and not has_eval:
                raise ConfigError(f"train.{key} is set but there is no evaluation data; set data.eval (a file) or "
                                  "data.eval_fraction (e.g. 0.05), or remove it.")
        if self.train.early_stopping_patience is not None and self.train.eval_every_steps is None:
            raise ConfigError("train.early_stopping_patience counts evaluations, but train.eval_every_steps is "
                              "null (one evaluation, at the end); set train.eval_every_steps too.")
        if self.data.eval and self.data.eval_fraction > 0:
            raise ConfigError("data.eval and data.eval_fraction are both set; use one: an eval file, or a share "
                              "of the training data held out.")
        _check_method_sections(self)
        _check_stage(self)


METHOD_SECTIONS = {"full": ("full",), "lora": ("lora",), "qlora": ("qlora", "lora"), "adapter": ("adapter",),
                   "prompt": ("prompt",), "ptuning": ("ptuning",), "prefix": ("prefix",)}
"""The config sections each method reads; a section another method reads must keep its defaults."""


def _check_stage(cfg: Config) -> None:
    """Each preference stage's settings belong to it; preference rows have their own form and score only the
    answer."""
    for stage, section in STAGE_SECTIONS.items():
        value, default = getattr(cfg, section), type(getattr(cfg, section))()
        changed = [f.name for f in dataclasses.fields(value) if getattr(value, f.name) != getattr(default, f.name)]
        if changed and cfg.stage != stage:
            key = {v: k for k, v in getattr(type(value), "ALIASES", {}).items()}.get(changed[0], changed[0])
            raise ConfigError(f"{section}.{key} is set, but stage is {cfg.stage}; set stage={stage} to use it, or "
                              "remove it.")
    if cfg.stage == "sft":
        return
    if cfg.train.neftune_alpha is not None:
        raise ConfigError(f"train.neftune_alpha is set, but stage is {cfg.stage}: embedding noise is for SFT (the "
                          "preference losses compare the policy with a reference on the same clean inputs); "
                          "remove it.")
    rows = ("preference pairs ({prompt, chosen, rejected} or {chosen, rejected} rows)" if cfg.stage in PAIR_STAGES
            else "feedback rows ({prompt, completion, label})")
    if cfg.data.format != "auto":
        raise ConfigError(f"data.format={cfg.data.format} is for conversations; stage {cfg.stage} reads {rows}. "
                          "Remove data.format.")
    if cfg.data.train_on != "assistant":
        raise ConfigError(f"data.train_on={cfg.data.train_on} does not apply to stage {cfg.stage}, which scores only "
                          "the answers; remove it.")
    for source in (*sources_of(cfg.data.train), *sources_of(cfg.data.eval)):
        for key in ("format", "train_on", "system_prompt"):
            if getattr(source, key) is not None:
                raise ConfigError(f"data source {source.path} sets {key}, which applies to conversations; stage "
                                  f"{cfg.stage} reads {rows} and scores only their answers. Remove it.")
    if cfg.stage == "kto" and cfg.data.packing:
        raise ConfigError("data.packing is not available for stage kto (each batch pairs its prompts with other "
                          "examples' completions for the KL term); set data.packing=false.")
    if cfg.stage == "kto" and cfg.train.micro_batch_size < 2:
        raise ConfigError("stage kto estimates its KL term from each example's prompt with another example's "
                          "completion in the same micro-batch; train.micro_batch_size=1 has no other. Set "
                          "train.micro_batch_size to 2 or more.")


def _check_method_sections(cfg: Config) -> None:
    """An option set for a method the run does not use is a mistake (a wrong `method`, or a stale key)."""
    used = METHOD_SECTIONS[cfg.method]
    for section in sorted({s for sections in METHOD_SECTIONS.values() for s in sections} - set(used)):
        value, default = getattr(cfg, section), type(getattr(cfg, section))()
        changed = [f.name for f in dataclasses.fields(value) if getattr(value, f.name) != getattr(default, f.name)]
        if changed:
            readers = ", ".join(m for m, sections in METHOD_SECTIONS.items() if section in sections)
            raise ConfigError(f"{section}.{changed[0]} is set, but method is {cfg.method}, which does not read the "
                              f"{section} section (method {readers} does); remove it, or set "
                              f"method={readers.split(',')[0]}.")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (optional), apply `a.b=value` overrides (values parsed as YAML), validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        loaded = parse_yaml(_read_config_text(path), where=str(path))
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of keys at the top level, found {type(loaded).__name__}")
        raw = loaded or {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {shown(item)} must look like key=value, e.g. data.max_seq_len=1024")
        key = key.strip()
        _set_dotted(raw, key, parse_yaml(value, where=f"override {shown(key)}") if value.strip() else None)
    return build(Config, raw, prefix="")


MAX_CONFIG_BYTES = 1 << 20
"""A config file is a few kilobytes; anything past a mebibyte is not one (and is not read into memory)."""
MAX_YAML_VALUES = 10_000
"""A config holds about a hundred values. YAML aliases can make a few hundred bytes expand to billions of
values (an "alias bomb"), so a document is refused when its aliases expand past this many."""


def _read_config_text(path: Path) -> str:
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file {path} is {size:,} bytes; a config is at most {MAX_CONFIG_BYTES:,} "
                              "bytes. Is this the right file?")
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8.") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror or exc}") from None


def parse_yaml(text: str, *, where: str) -> Any:
    """YAML text as plain data (safe types only), with alias expansion bounded by MAX_YAML_VALUES; any
    problem is a ConfigError naming `where` (the file, or the override's key), quoting a bounded excerpt."""
    try:
        return _load_bounded(text)
    except _Refused as exc:
        raise ConfigError(f"{where}: refused: {exc}") from None
    except yaml.YAMLError as exc:
        message = str(exc)
        if len(message) > 1000:
            message = f"{message[:1000]}… (shortened: {len(message):,} characters in all)"
        raise ConfigError(f"{where}: not valid YAML: {message}") from None
    except ValueError as exc:  # an integer of more digits than Python converts
        raise ConfigError(f"{where}: a value cannot be read: {str(exc)[:200]}") from None
    except RecursionError:
        raise ConfigError(f"{where}: the YAML is nested too deeply to be a config.") from None


class _Refused(yaml.YAMLError):
    """Valid YAML that is not a config: its aliases expand too far, or into themselves."""


def _load_bounded(text: str) -> Any:
    """yaml.safe_load, measuring the document's node graph as its aliases expand before any value is built."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, limit=MAX_YAML_VALUES)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _expanded_size(node: yaml.Node, *, limit: int) -> int:
    """The number of values `node` stands for once every alias is expanded; raises past `limit` or on an
    alias inside the value it names (a cycle). Shared nodes are counted once per use, computed once."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(current: yaml.Node) -> int:
        key = id(current)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise _Refused(f"line {current.start_mark.line + 1}: an alias refers to a value that contains it.")
        open_nodes.add(key)
        if isinstance(current, yaml.MappingNode):
            children = [part for pair in current.value for part in pair]
        elif isinstance(current, yaml.SequenceNode):
            children = current.value
        else:
            children = []
        total = 1 + sum(size(child) for child in children)
        open_nodes.discard(key)
        if total > limit:
            raise _Refused(f"line {current.start_mark.line + 1}: this value holds more than {limit:,} values once its "
                           "aliases are expanded (a whole config holds about a hundred).")
        sizes[key] = total
        return total

    return size(node)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The resolved config as plain data (what a run saves as config.yaml)."""
    return dataclasses.asdict(cfg)


SHORTHANDS = {"model": ModelConfig.SHORTHAND}
"""Sections that may be given as one string, and the field that string sets."""


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    *parents, leaf = key.split(".")
    for depth, part in enumerate(parents):
        if node.get(part) is None:  # an absent section, or one left empty in YAML (`data:`)
            node[part] = {}
        if depth == 0 and part in SHORTHANDS and isinstance(node[part], str):
            node[part] = {SHORTHANDS[part]: node[part]}
        child = node[part]
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part} is a value, not a section")
        node = child
    if node is raw and leaf in SHORTHANDS and isinstance(raw.get(leaf), dict) and not isinstance(value, dict):
        raw[leaf] = {**raw[leaf], SHORTHANDS[leaf]: value}
        return
    node[leaf] = value


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML (saved as OUTPUT/config.yaml; loads back with load_config)."""
    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return yaml.safe_dump(plain(_written_keys(cfg, to_dict(cfg))), sort_keys=False, allow_unicode=True)


def _written_keys(cfg: Any, values: dict[str, Any]) -> dict[str, Any]:
    """`values` (to_dict of `cfg`) with each field under the key a config file uses (`lambda`, not `lambda_`)."""
    shown = {field: key for key, field in getattr(type(cfg), "ALIASES", {}).items()}
    return {shown.get(name, name): _written_keys(getattr(cfg, name), value)
            if dataclasses.is_dataclass(getattr(cfg, name)) and isinstance(value, dict) else value
            for name, value in values.items()}


def build(cls: type, raw: Mapping[str, Any], *, prefix: str) -> Any:
    """Build dataclass `cls` from a mapping; unknown keys fail with a suggestion, types are checked."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, found {shown(raw)}")
    aliases = getattr(cls, "ALIASES", {})  # a key written differently from its field's name (the name works too)
    written = {field: key for key, field in aliases.items()}
    raw = {aliases.get(key, key): value for key, value in raw.items()}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in fields:
            known = [prefix + written.get(name, name) for name in fields]
            name = prefix + _key_part(key)
            guess = difflib.get_close_matches(name, known, n=1) if len(name) < 200 else []
            hint = f": did you mean {guess[0]!r}?" if guess else f"; known keys: {', '.join(known)}"
            raise ConfigError(f"unknown key {name!r}{hint}")
    values = {name: _coerce(hints[name], raw[name], prefix + written.get(name, name)) for name in raw}
    return cls(**values)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = get_origin(hint)
    if dataclasses.is_dataclass(hint):
        shorthand = getattr(hint, "SHORTHAND", None)
        if shorthand and isinstance(value, str):
            value = {shorthand: value}
        return build(hint, value if value is not None else {}, prefix=key + ".")
    if origin in (types.UnionType, typing.Union):
        options = get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(option, value, key)
            except ConfigError as exc:
                if _same_shape(option, value):  # the option the value was meant as: its error says what is wrong
                    raise
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {shown(value)} fits none of {hint}")
    if origin is Literal:
        if value not in get_args(hint):
            choices = ", ".join(map(str, get_args(hint)))
            raise ConfigError(f"{key} must be one of {choices}; found {shown(value)}")
        return value
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a mapping, found {shown(value)}")
        return {str(k): _coerce(get_args(hint)[1], v, f"{key}.{_key_part(k)}") for k, v in value.items()}
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, found {shown(value)}")
        return tuple(_coerce(get_args(hint)[0], v, key) for v in value)
    return _scalar(hint, value, key)


def _same_shape(option: Any, value: Any) -> bool:
    """A mapping given for a section (or dict), a list for a list: a union's error then comes from that option."""
    if isinstance(value, Mapping):
        return dataclasses.is_dataclass(option) or get_origin(option) is dict
    if isinstance(value, (list, tuple)):
        return get_origin(option) in (list, tuple)
    return False


def _key_part(key: Any) -> str:
    """A user's key as a message names it: itself, or a bounded repr when it is long or not a string."""
    return key if isinstance(key, str) and len(key) <= 100 else shown(key)


INT_LIMIT = 2**63
"""Integers in the config fit a signed 64-bit integer (what torch and numpy take)."""


def _scalar(hint: Any, value: Any, key: str) -> Any:
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, found {shown(value)}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if -INT_LIMIT < value < INT_LIMIT:
                return value
            raise ConfigError(f"{key} must be an integer below 2**63 in size, found {shown(value)}")
        raise ConfigError(f"{key} must be an integer, found {shown(value)}")
    if hint is float:
        number = _float(value)
        if number is None:
            raise ConfigError(f"{key} must be a number, found {shown(value)}")
        if not math.isfinite(number):  # NaN passes every `<`/`<=` range check, so it is refused here, for every key
            raise ConfigError(f"{key} must be a finite number, found {shown(value)}")
        return number
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} must be a string, found {shown(value)}")
    raise ConfigError(f"{key}: unsupported config type {hint}")  # pragma: no cover - a bug in sftlab


def _float(value: Any) -> float | None:
    """`value` as a float (infinite when it overflows), or None when it is not a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        return float(value)  # a str: YAML 1.1 reads `1e-4` (no dot) as a string
    except OverflowError:  # an int past the float range
        return math.inf if value > 0 else -math.inf
    except ValueError:
        return None
