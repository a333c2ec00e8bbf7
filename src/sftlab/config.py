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
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args, get_origin

import yaml

from sftlab.errors import ConfigError

FORMATS = ("auto", "messages", "prompt_completion", "alpaca", "sharegpt")
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class DataConfig:
    train: str | None = None
    """Training data: a .jsonl (streamed), .json array or .parquet file."""
    eval: str | None = None
    """Optional evaluation data, same formats as `train`."""
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
    add_special_tokens: bool = False
    """Add a template's special tokens that the tokenizer lacks (e.g. ChatML on a base model)."""
    cache_dir: str | None = None
    """Where encoded datasets are cached; None means $SFTLAB_CACHE or ~/.cache/sftlab."""
    cache: bool = True
    """Reuse an encoded dataset when data, tokenizer, template and settings are unchanged."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"data.eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.max_seq_len is not None and self.max_seq_len < 2:
            raise ConfigError(f"data.max_seq_len must be at least 2 or null (no limit), got {self.max_seq_len}")
        if self.max_row_bytes is not None and self.max_row_bytes < 1:
            raise ConfigError(f"data.max_row_bytes must be a positive number of bytes or null (derived from "
                              f"data.max_seq_len), got {self.max_row_bytes}")
        for source, target in self.role_map.items():
            if target not in ROLES:
                raise ConfigError(f"data.role_map maps {source!r} to {target!r}; expected one of "
                                  f"{', '.join(ROLES)}")


@dataclass(frozen=True)
class ModelConfig:
    SHORTHAND: ClassVar[str] = "path"  # `model: some/dir` means `model.path: some/dir`

    path: str | None = None
    """A local Hugging Face model dir, a hub id, or a .gguf file."""
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
            raise ConfigError(f"lora.rank must be a positive integer, got {self.rank}")
        if self.alpha <= 0:
            raise ConfigError(f"lora.alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class FullConfig:
    freeze_embeddings: bool = False
    """Keep the input embeddings (and a tied output head) frozen during full fine-tuning."""


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
    eval_every_steps: int | None = None
    """Evaluate on data.eval / the held-out fraction every N steps (and at the end)."""
    early_stopping_patience: int | None = None
    """Stop after this many evaluations without a better eval loss."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward: less memory, about a third slower."""
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
    """Also write TensorBoard event files (needs the tensorboard package)."""
    profile: bool = False
    """Record each step's seconds in data / forward / backward / optimizer in metrics.jsonl (on a GPU this
    synchronises at each phase, which costs a little speed)."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """A step whose loss or gradient norm is NaN/inf: `stop` the run (nothing of that step is applied; the last
    checkpoint stays), or `skip` the step (no update; the run stops anyway after 10 such steps in a row).
    Either way the step and its batch's source rows are named."""

    def __post_init__(self) -> None:
        for key in ("micro_batch_size", "grad_accum_steps", "keep_checkpoints", "log_every_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key} must be at least 1, got {getattr(self, key)}")
        if self.warmup_steps < 0:
            raise ConfigError(f"train.warmup_steps must be 0 or more, got {self.warmup_steps}")
        if self.weight_decay < 0:
            raise ConfigError(f"train.weight_decay must be 0 or more, got {self.weight_decay}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ConfigError(f"train.max_grad_norm must be positive or null (no clipping), got {self.max_grad_norm}")
        for key in ("max_steps", "save_every_steps", "eval_every_steps", "early_stopping_patience"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"train.{key} must be at least 1 or null, got {value}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be positive, got {self.lr}")
        if self.max_steps is None and self.epochs <= 0:
            raise ConfigError(f"train.epochs must be positive, got {self.epochs}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"train.betas must be two numbers in [0, 1), got {list(self.betas)}")


@dataclass(frozen=True)
class QLoRAConfig:
    block_size: int = 64
    """NF4 quantisation block: one scale per `block_size` weights."""
    double_quant: bool = True
    """Quantise the per-block scales too (saves about 0.4 bits per weight)."""


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
            raise ConfigError(f"adapter.bottleneck_dim must be a positive integer, got {self.bottleneck_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"adapter.dropout must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class PromptConfig:
    num_virtual_tokens: int = 20
    """Trained embeddings prepended to every input."""
    init_text: str | None = None
    """Initialise them from the embeddings of this text's tokens (repeated to length); None: random
    rows of the vocabulary."""

    def __post_init__(self) -> None:
        if self.num_virtual_tokens <= 0:
            raise ConfigError(f"prompt.num_virtual_tokens must be positive, got {self.num_virtual_tokens}")


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
        if self.beta <= 0:
            raise ConfigError(f"dpo.beta must be positive, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"dpo.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
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
        if self.lambda_ <= 0:
            raise ConfigError(f"orpo.lambda must be positive, got {self.lambda_}")


@dataclass(frozen=True)
class SimPOConfig:
    beta: float = 2.0
    """β: the scale of the length-averaged log-probability margin."""
    gamma: float = 1.0
    """γ: the target reward margin itself (TRL's CPOTrainer takes it as simpo_gamma)."""

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ConfigError(f"simpo.beta must be positive, got {self.beta}")
        if self.gamma < 0:
            raise ConfigError(f"simpo.gamma must be 0 or more, got {self.gamma}")


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
            if getattr(self, key) <= 0:
                raise ConfigError(f"kto.{key} must be positive, got {getattr(self, key)}")


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
    rows = ("preference pairs ({prompt, chosen, rejected} or {chosen, rejected} rows)" if cfg.stage in PAIR_STAGES
            else "feedback rows ({prompt, completion, label})")
    if cfg.data.format != "auto":
        raise ConfigError(f"data.format={cfg.data.format} is for conversations; stage {cfg.stage} reads {rows}. "
                          "Remove data.format.")
    if cfg.data.train_on != "assistant":
        raise ConfigError(f"data.train_on={cfg.data.train_on} does not apply to stage {cfg.stage}, which scores only "
                          "the answers; remove it.")
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
                              f"{section} section (method {readers} does); remove it, or set method={readers.split(',')[0]}.")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (optional), apply `a.b=value` overrides (values parsed as YAML), validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of keys at the top level, found {type(loaded).__name__}")
        raw = loaded or {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key=value, e.g. data.max_seq_len=1024")
        _set_dotted(raw, key.strip(), yaml.safe_load(value) if value.strip() else None)
    return build(Config, raw, prefix="")


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
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, found {raw!r}")
    aliases = getattr(cls, "ALIASES", {})  # a key written differently from its field's name
    shown = {field: key for key, field in aliases.items()}
    raw = {aliases.get(key, key): value for key, value in raw.items()}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in fields:
            known = [prefix + shown.get(name, name) for name in fields]
            guess = difflib.get_close_matches(prefix + str(key), known, n=1)
            hint = f": did you mean {guess[0]!r}?" if guess else f"; known keys: {', '.join(known)}"
            raise ConfigError(f"unknown key {prefix + str(key)!r}{hint}")
    values = {name: _coerce(hints[name], raw[name], prefix + shown.get(name, name)) for name in raw}
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
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} fits none of {hint}")
    if origin is Literal:
        if value not in get_args(hint):
            choices = ", ".join(map(str, get_args(hint)))
            raise ConfigError(f"{key} must be one of {choices}; found {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a mapping, found {value!r}")
        return {str(k): _coerce(get_args(hint)[1], v, f"{key}.{k}") for k, v in value.items()}
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, found {value!r}")
        return tuple(_coerce(get_args(hint)[0], v, key) for v in value)
    return _scalar(hint, value, key)


def _scalar(hint: Any, value: Any, key: str) -> Any:
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, found {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be an integer, found {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number, found {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} must be a string, found {value!r}")
    raise ConfigError(f"{key}: unsupported config type {hint}")  # pragma: no cover - a bug in sftlab
