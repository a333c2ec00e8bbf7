"""Build a run's Setup: tokenizer, template, encoded datasets, model, method — everything the loop consumes.
runs.prepare checks the config and claims the output dir, then calls `build`."""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.text import Text

from sftlab import export, files
from sftlab.config import PAIR_STAGES, Config
from sftlab.data.dataset import DatasetStats, EncodedDataset, build_dataset
from sftlab.data.encode import Encoder
from sftlab.data.feedback import FeedbackDataset, build_feedback_dataset
from sftlab.data.mixture import MixedDataset, Mixture, hold_out, make_mixture, mixture_text, part_of
from sftlab.data.preference import PairBatch, PairDataset, build_pair_dataset
from sftlab.data.sources import Source, describe, resolve_all
from sftlab.data.templates import load_template
from sftlab.errors import ConfigError, DataError
from sftlab.files import atomic_dir
from sftlab.methods import method_class
from sftlab.methods.base import Method
from sftlab.models.fused import fuse
from sftlab.models.gguf import is_gguf
from sftlab.models.load import check_model, default_device, load_model, load_tokenizer, skeleton
from sftlab.models.quant import base_memory_line
from sftlab.train import rundir
from sftlab.train.distributed import SINGLE, Dist, choose_mode
from sftlab.train.memory import plan_run
from sftlab.train.neftune import add_embedding_noise
from sftlab.train.preference import precompute_reference, reference_logps, sequence_logps


@dataclass
class Setup:
    """Everything the loop needs: built by `build` (runs.prepare calls it once the output dir is claimed), or
    by a test."""
    config: Config
    model: torch.nn.Module
    tokenizer: object
    method: Method
    train_data: EncodedDataset | PairDataset
    """Examples (stage sft) or preference pairs (stage dpo)."""
    train_indices: np.ndarray
    eval_data: EncodedDataset | PairDataset | None
    eval_indices: np.ndarray | None
    device: torch.device
    dist: Dist = SINGLE
    """This process's place in a torchrun launch (train/distributed.py); a single process by default."""
    reference_model: torch.nn.Module | None = None
    """Stage dpo with full fine-tuning: the frozen reference copy (None: precomputed, or adapters disabled)."""
    mixture: Mixture | None = None
    """Several sources, weights or max_samples: which items each epoch trains (data/mixture.py)."""
    eval_groups: dict[str, np.ndarray] | None = None
    """Several eval sources: each one's eval indices, logged as eval_loss/<source>."""


@dataclass
class Data:
    """The encoded data of a run: what trains, what is held out for eval, and how an epoch picks its items."""
    train: EncodedDataset | PairDataset
    indices: np.ndarray
    eval: EncodedDataset | PairDataset | None = None
    eval_indices: np.ndarray | None = None
    eval_groups: dict[str, np.ndarray] | None = None
    mixture: Mixture | None = None


def pad_id(tokenizer: object) -> int:
    """The id padding uses: the tokenizer's pad token, else its eos, else 0 (padding is never trained)."""
    for attribute in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attribute, None)
        if isinstance(value, int):
            return value
    return 0


def build(cfg: Config, *, ctx: Dist, console: Console, device: torch.device | None, out: Path,
          sources: tuple[list[Source], list[Source]]) -> Setup:
    """What runs.prepare does once this process holds the output dir (`sources`: data.train's and
    data.eval's): read and validate all the data, then load the model and apply the method."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = _full_init(cfg)
    tokenizer = load_tokenizer(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    if not is_gguf(cfg.model.path):  # its files, not its weights: a broken model dir fails before the data work
        check_model(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    _check_layers(cfg)
    encoder = Encoder(tokenizer, load_template(cfg.data.template, tokenizer), train_on=cfg.data.train_on,
                      max_seq_len=cfg.data.max_seq_len, truncation=cfg.data.truncation,
                      add_special_tokens=cfg.data.add_special_tokens, max_row_bytes=cfg.data.max_row_bytes,
                      special_tokens_in_content=cfg.data.special_tokens_in_content)
    data = build_data(cfg, ctx=ctx, console=console, out=out, sources=sources, encoder=encoder)
    device = device or (ctx.device() if ctx.enabled else default_device())
    # Exit 2 before any weight is read when it cannot fit (each process plans for itself under torchrun);
    # resolves train.gradient_checkpointing=auto.
    cfg = plan_run(cfg, data.train, device, console)
    model, method, cfg, continued = build_model(cfg, ctx=ctx, console=console, device=device, tokenizer=tokenizer,
                                                encoder=encoder, data=data)
    if ctx.enabled:
        ctx = replace(ctx, mode=choose_mode(cfg.train.distributed, cfg.method, model, device, ctx.world))
        console.print(f"{ctx.mode.upper()} over {ctx.world} processes (this is rank {ctx.rank})")
    reference = _stage_reference(cfg, model, method, data, tokenizer, device, continued, console)
    return Setup(cfg, model, tokenizer, method, data.train, data.indices, data.eval, data.eval_indices, device, ctx,
                 reference_model=reference, mixture=data.mixture, eval_groups=data.eval_groups)


def build_data(cfg: Config, *, ctx: Dist, console: Console, out: Path, sources: tuple[list[Source], list[Source]],
               encoder: Encoder) -> Data:
    """The training data encoded (and cached), its rejects logged; the eval data from data.eval or held out."""
    train_sources, eval_sources = sources
    pairs = cfg.stage in PAIR_STAGES
    train_data = _build_all(ctx, train_sources, cfg, encoder, _run_file(ctx, out, "rejects.jsonl"))
    _report_data(console, "train", train_data.stats, out / "rejects.jsonl", pairs=pairs,
                 special_tokens_in_content=cfg.data.special_tokens_in_content)
    data = Data(train_data, np.arange(len(train_data)))
    if eval_sources:
        data.eval = _build_all(ctx, eval_sources, cfg, encoder, _run_file(ctx, out, "eval_rejects.jsonl"))
        _report_data(console, "eval", data.eval.stats, out / "eval_rejects.jsonl", pairs=pairs,
                     special_tokens_in_content=cfg.data.special_tokens_in_content)
        data.eval_indices = np.arange(len(data.eval))
        data.eval_groups = _groups(data.eval, eval_sources, data.eval_indices)
    elif cfg.data.eval_fraction > 0 and len(train_sources) > 1:  # every source held out from, so each is evaluated
        data.indices, data.eval_indices = hold_out(_item_starts(train_data), cfg.data.eval_fraction, cfg.train.seed)
        data.eval, data.eval_groups = train_data, _groups(train_data, train_sources, data.eval_indices)
    elif cfg.data.eval_fraction > 0:
        shuffled = np.random.default_rng([cfg.train.seed, 1 << 20]).permutation(len(train_data))
        held = max(1, round(cfg.data.eval_fraction * len(train_data)))
        data.eval, data.eval_indices, data.indices = train_data, np.sort(shuffled[:held]), np.sort(shuffled[held:])
    if len(data.indices) == 0:
        raise ConfigError(f"no training examples left from {describe(cfg.data.train)} (see {out / 'rejects.jsonl'}).")
    data.mixture = _mixture(train_sources, train_data, data.indices, cfg, console)
    return data


def build_model(cfg: Config, *, ctx: Dist, console: Console, device: torch.device, tokenizer: object,
                encoder: Encoder, data: Data) -> tuple[torch.nn.Module, Method, Config, bool]:
    """The model loaded (NF4 as read for a quantised base), the data's added token rows made, the method applied
    (onto an SFT adapter merged or continued, for dpo.init_from): (model, method, config, continued)."""
    entry = method_class(cfg.method)
    notes: list[str] = []
    model = load_model(cfg.model, device=device, nf4=entry.nf4(cfg), notes=notes)
    for note in notes:
        console.print(note)
    torch.manual_seed(cfg.train.seed)  # the new embedding rows and the adapter's initialisation
    new_token_ids = _add_token_rows(cfg, model, tokenizer, encoder.added_tokens, console)
    _check_vocab(model, data.train, cfg.model.path)
    if cfg.stage == "dpo" and cfg.dpo.init_from and cfg.dpo.init == "merge":
        model, cfg = _merge_init(cfg, model, tokenizer, new_token_ids, ctx, console)
    continued = _init_adapter(cfg)  # dpo.init_from, init=continue: the SFT adapter trains on
    if continued is not None:
        new_token_ids = sorted({*new_token_ids, *export.adapter_token_ids(continued)})
    method = entry(cfg, trainable_token_ids=new_token_ids)
    if cfg.train.fused_ops:  # on the plain model, before the method wraps its modules
        fused = fuse(model)
        if fused:
            console.print(f"fused ops: {', '.join(fused)}")
    method.apply(model)
    if continued is not None:
        export.load_trained(model, method, continued)
        console.print(f"dpo: training on the SFT adapter {continued}", markup=False)
    if cfg.train.neftune_alpha is not None:
        add_embedding_noise(model, cfg.train.neftune_alpha)
        console.print(f"neftune: input embeddings noised while training, alpha {cfg.train.neftune_alpha:g}")
    if entry.quantized_base:
        console.print(base_memory_line(model))
    trainable = sum(p.numel() for p in method.trainable_parameters(model).values())
    total = sum(p.numel() for p in model.parameters())
    console.print(f"method {cfg.method}: trainable {100 * trainable / total:.2f}% — "
                  f"{_millions(trainable)} of {_millions(total)}")
    return model, method, cfg, continued is not None


def _stage_reference(cfg: Config, model: torch.nn.Module, method: Method, data: Data, tokenizer: object,
                     device: torch.device, continued: bool, console: Console) -> torch.nn.Module | None:
    """The preference stage's reference (dpo, kto), or None; orpo and simpo need none."""
    if cfg.stage == "dpo":
        return _reference(cfg, model, method, [data.train, data.eval], pad_id=pad_id(tokenizer), device=device,
                          continued=continued, console=console)
    if cfg.stage == "kto":
        return _reference(cfg, model, method, [], pad_id=pad_id(tokenizer), device=device, continued=False,
                          console=console)
    if cfg.stage in ("orpo", "simpo"):
        console.print(f"{cfg.stage}: no reference model (reference-free: no second copy of the weights, no "
                      "reference forward)")
    return None


def _check_layers(cfg: Config) -> None:
    """The method's settings against the model's layer shapes (lora.targets, lora.rank), on a skeleton
    built from config.json: a mistake is named before the data work and the weight load."""
    method = method_class(cfg.method)
    if method.check_layers is Method.check_layers:  # nothing to check: build no skeleton
        return
    model = skeleton(cfg.model)
    if model is not None:
        method(cfg).check_layers(model)


def _full_init(cfg: Config) -> Config:
    """Full fine-tuning from an SFT run: its model/ is the model this run starts from (as its config says)."""
    return rundir.as_saved(cfg) if method_class(cfg.method).whole_model else cfg


def _init_adapter(cfg: Config) -> Path | None:
    if cfg.stage != "dpo" or not cfg.dpo.init_from or cfg.dpo.init != "continue" or \
            method_class(cfg.method).whole_model:
        return None
    return rundir.init_dir(cfg, "adapter")


def _merge_init(cfg: Config, model: torch.nn.Module, tokenizer: object, token_ids: list[int], ctx: Dist,
                console: Console) -> tuple[torch.nn.Module, Config]:
    """dpo.init=merge: fold the SFT adapter into the base, write the result to OUTPUT/base (the base of this
    run's adapter, and the model its config.yaml names from now on: resuming from it does not merge again)."""
    if not method_class(cfg.method).mergeable:
        raise ConfigError(f"dpo.init=merge: method {cfg.method} cannot merge into the base weights; set "
                          "dpo.init=continue to train its SFT adapter on.")
    adapter = rundir.init_dir(cfg, "adapter")
    sft = method_class(cfg.method)(cfg, trainable_token_ids=sorted({*token_ids, *export.adapter_token_ids(adapter)}))
    sft.apply(model)
    export.load_trained(model, sft, adapter)
    model = sft.merge(model)
    saved = rundir.as_saved(cfg)  # names OUTPUT/base as the model from now on
    base = Path(saved.model.path)
    if ctx.main:
        with atomic_dir(files.owned(base.parent, base.name), what="the merged SFT model") as scratch:
            export.save_model(model, tokenizer, scratch, chat_template=export.chat_template_for(cfg, tokenizer))
    ctx.barrier()
    console.print(f"dpo: the SFT adapter {adapter} merged into the base, saved as {base}", markup=False)
    return model, saved


def _reference(cfg: Config, model: torch.nn.Module, method: Method, datasets: list[PairDataset | None], *,
               pad_id: int, device: torch.device, continued: bool, console: Console) -> torch.nn.Module | None:
    """Stage dpo's reference: log-probs precomputed into the datasets (dpo.precompute_reference, or a continued
    SFT adapter: the SFT model is the policy before training), a frozen copy (full fine-tuning), or None: the
    trained model with its adapters disabled, computed at each step."""
    if not (cfg.dpo.precompute_reference or continued):
        if method.whole_model:
            kept = " (dpo.precompute_reference=true keeps none)" if cfg.stage == "dpo" else ""
            console.print(f"{cfg.stage} reference: a frozen copy of the model{kept}")
            return copy.deepcopy(model).requires_grad_(False).eval()
        console.print(f"{cfg.stage} reference: the base model, its adapter disabled (no second copy of the weights)")
        return None
    # The model as it starts (full fine-tuning, a continued adapter), or the base under a fresh adapter.
    as_policy = continued or method.whole_model
    logps: Callable[[PairBatch], torch.Tensor] = (lambda b: sequence_logps(model, b, method)) if as_policy \
        else (lambda b: reference_logps(model, b, method))
    model.eval()
    done: set[int] = set()
    for data in datasets:
        if data is not None and id(data) not in done:
            data.reference_logps = precompute_reference(data, logps, pad_id=pad_id, device=device,
                                                        batch_pairs=2 * cfg.train.micro_batch_size)
            done.add(id(data))
    model.train()
    what = "the starting model" if as_policy else "the base model, its adapter disabled"
    console.print(f"dpo reference: log-probs of {sum(len(d) for d in datasets if d is not None)} pairs precomputed "
                  f"from {what}")
    return None


def resolve_sources(key: str, value: object) -> list[Source]:
    """data.train / data.eval resolved (files found, hub ids looked up): a missing path fails before any work."""
    try:
        return resolve_all(value)
    except DataError as exc:
        raise ConfigError(f"data.{key}: {exc}") from None


def _run_file(ctx: Dist, out: Path, name: str) -> Path:
    """OUTPUT/NAME, recorded in the run's manifest (by rank 0, which writes it) before anything is written."""
    return files.owned(out, name) if ctx.main else out / name


def _build(ctx: Dist, data_path: Source, cfg: Config, encoder: Encoder,
           rejects: Path | None) -> EncodedDataset | PairDataset | FeedbackDataset:
    """Rank 0 encodes (and caches) the data first; the other ranks then read the same cache (or, with
    data.cache=false, encode their own copy), their rejects going to a scratch file, not the run's. Stage dpo
    reads preference pairs."""
    build = build_pair_dataset if cfg.stage in PAIR_STAGES else build_feedback_dataset if cfg.stage == "kto" \
        else build_dataset
    if ctx.main:
        data = build(data_path, cfg.data, encoder, rejects_path=rejects)
    ctx.barrier()
    if not ctx.main:
        data = build(data_path, cfg.data, encoder, rejects_path=None)
    return data


def _build_all(ctx: Dist, sources: list[Source], cfg: Config, encoder: Encoder,
               rejects: Path) -> EncodedDataset | PairDataset | FeedbackDataset | MixedDataset:
    """One source as itself; several encoded one by one and laid end to end, their rejects in one file (pairs
    and feedback wrapped again around the joined examples, the feedback labels joined alike)."""
    if len(sources) == 1:
        return _build(ctx, sources[0], cfg, encoder, rejects)
    parts = [_build(ctx, source, cfg, encoder, None) for source in sources]
    examples = [p.examples if isinstance(p, (PairDataset, FeedbackDataset)) else p for p in parts]
    if ctx.main:
        _join_rejects([e.rejects_path for e in examples], rejects)
    mixed = MixedDataset(examples, [s.label for s in sources])
    if cfg.stage == "kto":
        joined = FeedbackDataset(mixed, desirable=np.concatenate([p.desirable for p in parts]))  # type: ignore[arg-type]
        joined.max_seq_len = cfg.data.max_seq_len
        return joined
    return PairDataset(mixed) if cfg.stage in PAIR_STAGES else mixed  # type: ignore[arg-type]


def _join_rejects(paths: list[Path], target: Path) -> None:
    found = [p for p in paths if p.is_file()]
    if not found:
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("wb") as out:
        for path in found:
            with path.open("rb") as part:
                shutil.copyfileobj(part, out)


def _item_starts(data: object) -> np.ndarray:
    """Where each source's items begin (pairs count once), and the end."""
    mixed = data.examples if isinstance(data, (PairDataset, FeedbackDataset)) else data
    if isinstance(mixed, MixedDataset):
        return mixed.starts // (2 if isinstance(data, PairDataset) else 1)
    return np.array([0, len(data)])  # type: ignore[arg-type]


def _groups(data: object, sources: list[Source], indices: np.ndarray) -> dict[str, np.ndarray] | None:
    """Eval indices per source (eval_loss/<source>), when there are several."""
    if len(sources) < 2:
        return None
    parts = part_of(_item_starts(data), indices)
    return {source.label: indices[parts == k] for k, source in enumerate(sources)}


def _mixture(sources: list[Source], data: object, indices: np.ndarray, cfg: Config,
             console: Console) -> Mixture | None:
    """The per-epoch choice of items when there are several sources, weights or max_samples; its table printed."""
    if len(sources) == 1 and sources[0].spec.weight is None and sources[0].spec.max_samples is None:
        return None
    mixture = make_mixture(_item_starts(data), [s.label for s in sources], indices,
                           weights=[s.spec.weight for s in sources], max_samples=[s.spec.max_samples for s in sources],
                           seed=cfg.train.seed)
    mixed = data.examples if isinstance(data, (PairDataset, FeedbackDataset)) else data
    stats = [p.stats for p in mixed.parts] if isinstance(mixed, MixedDataset) else [mixed.stats]
    console.print(mixture_text(mixture.table(stats, pairs=cfg.stage in PAIR_STAGES)))
    return mixture


def _add_token_rows(cfg: Config, model: torch.nn.Module, tokenizer: object, added: list[str],
                    console: Console) -> list[int]:
    """Ids of the special tokens the data step added, after making room for them in the embeddings
    (a model whose vocabulary is padded beyond the tokenizer may already have the rows)."""
    if not added:
        return []
    if method_class(cfg.method).whole_model and cfg.full.freeze_embeddings:
        raise ConfigError(f"the data step added special tokens {', '.join(added)}, whose embedding rows start "
                          "random and must train, but full.freeze_embeddings=true freezes them. Set "
                          "full.freeze_embeddings=false, or use a template the tokenizer already has tokens for.")
    rows = model.get_input_embeddings().weight.shape[0]
    if rows < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
        rows = len(tokenizer)
    console.print(f"added special tokens {', '.join(added)}: their embedding rows train "
                  f"(embeddings have {rows} rows)", markup=False)  # tokens like [INST] are text
    return tokenizer.convert_tokens_to_ids(added)


def _millions(count: int) -> str:
    return f"{count / 1e6:.2f}M" if count < 1e9 else f"{count / 1e9:.2f}B"


def _report_data(console: Console, split: str, stats: DatasetStats, rejects: Path, *, pairs: bool = False,
                 special_tokens_in_content: str = "text") -> None:
    made = f"{stats.examples // 2} pairs" if pairs else f"{stats.examples} examples"
    line = f"{split} data: {stats.rows} rows -> {made}, {stats.tokens:,} tokens " \
           f"({stats.trained_tokens:,} {'scored' if pairs else 'trained'})"
    if stats.truncated:
        line += f", {stats.truncated} truncated"
    console.print(line)
    if stats.rejected:
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(stats.rejected.items()))
        console.print(Text(f"{split} rows not used: {reasons} — listed in {rejects}", style="yellow"))
    if stats.ignored_fields:
        fields = ", ".join(f"{name} ({n} rows)" for name, n in sorted(stats.ignored_fields.items()))
        console.print(Text(f"{split} fields ignored (not read by sftlab): {fields}", style="yellow"))
    if stats.special_token_rows:
        console.print(_special_token_rows(split, stats.special_token_rows, special_tokens_in_content))


def _special_token_rows(split: str, rows: int, mode: str) -> Text:
    """The line about rows whose contents hold special-token strings (`<|im_end|>` typed in a message)."""
    if mode == "allow":
        return Text(f"warning: {rows} {split} rows hold special-token strings in message contents, trained as "
                    "the control tokens (data.special_tokens_in_content=allow): forged turn markup is learned. "
                    "Set data.special_tokens_in_content=text to train them as plain text.", style="yellow")
    return Text(f"{split} data: {rows} rows hold special-token strings in message contents, encoded as plain text")


def _check_vocab(model: torch.nn.Module, data: EncodedDataset, model_path: str) -> None:
    size = model.get_input_embeddings().weight.shape[0]
    biggest = data.max_token_id
    if biggest >= size:
        raise ConfigError(f"the data holds token id {biggest}, but the vocabulary of model {model_path} has {size} "
                          "rows: its tokenizer does not belong to these weights. Use the tokenizer files saved with "
                          "the weights (the same release).")
