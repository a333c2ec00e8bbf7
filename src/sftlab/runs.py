"""The run lifecycle, top to bottom:

    prepare  config -> output dir claimed -> data encoded -> model loaded -> method applied   (train/setup.py)
    fit      the optimizer steps, eval and checkpoints                                          (train/loop.py)
    finish   export (adapter/ or model/), loss plot, report, finished.json
    train    fit then finish, the output dir locked throughout

and back: `load_run` reads what a run dir, adapter dir or model dir holds (no weights), `load_for_inference`
turns it into a ready model; `merge` and `export_gguf` write what deployment needs from it. The CLI calls
these; the loop knows nothing of exports and reports, and the lower floors nothing of runs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sftlab.config import Config, load_config
from sftlab.errors import ConfigError, SftlabError

if TYPE_CHECKING:  # imported where used: `sftlab --help` does not load torch
    import torch
    from rich.console import Console

    from sftlab.train.loop import Progress
    from sftlab.train.setup import Setup


@dataclass
class RunResult:
    output_dir: Path
    steps: int
    final_loss: float | None
    eval_loss: float | None
    export_dir: Path | None
    report: Path | None = None
    """OUTPUT/report.html (rank 0)."""


def prepare(cfg: Config, *, console: Console | None = None, device: torch.device | None = None,
            overwrite: bool = False) -> Setup:
    """Check the config's files and the output dir, read and validate all the data, then load the model:
    a bad row or setting fails in seconds, before any model weights are read. `overwrite` lets the run
    replace a finished run in output_dir (train/rundir.py)."""
    from rich.console import Console

    from sftlab.models.portable import portable
    from sftlab.models.positions import with_max_seq_len
    from sftlab.train import lock, rundir, setup, trackers
    from sftlab.train.distributed import Dist

    ctx = Dist.from_env()  # under torchrun: joins the other processes
    console = console if console is not None and ctx.main else Console(stderr=True, quiet=not ctx.main)
    if not cfg.data.train:
        raise ConfigError("no training data: set data.train (a data file, glob, dataset directory or hub dataset "
                          "id, or a list of them).")
    if not cfg.model.path:
        raise ConfigError("no model: set model (a Hugging Face model dir, hub id or .gguf file).")
    sources = tuple(setup.resolve_sources(key, getattr(cfg.data, key)) for key in ("train", "eval"))
    trackers.check(cfg)  # a tracker's missing package, before any data or weights are read
    cfg = with_max_seq_len(cfg, console)  # before the claim: the run's config.yaml records the number
    cfg = portable(cfg)  # the base recorded so that the run loads from any working directory
    out = Path(cfg.output_dir)
    refused: SftlabError | None = None
    if ctx.main:
        try:
            rundir.claim(cfg, overwrite=overwrite, console=console)  # before anything is written; train releases it
        except SftlabError as exc:
            refused = exc
    if ctx.sum([float(refused is not None)])[0]:  # every rank stops, not only rank 0
        raise refused or SftlabError(f"rank 0 refused output_dir {out}; its message says why.")
    try:
        return setup.build(cfg, ctx=ctx, console=console, device=device, out=out, sources=sources)
    except BaseException:
        if ctx.main:
            lock.release(out)  # a start that fails leaves no lock behind
        raise


def fit(setup: Setup, *, console: Console | None = None, on_step: Callable[[int], None] | None = None) -> Progress:
    """The optimizer steps (train/loop.py), with eval and checkpoints; nothing is exported."""
    from sftlab.train import loop

    return loop.train(setup, console=console, on_step=on_step)


def finish(setup: Setup, progress: Progress) -> RunResult:
    """The run's end: the whole model gathered (FSDP), then on rank 0 the loss plot, the export (adapter/ or
    model/, renamed into place once complete), the report, and finished.json, the last file a run writes."""
    from sftlab import files
    from sftlab.train import distributed, rundir
    from sftlab.train.metrics import plot_loss
    from sftlab.train.report import write_report

    cfg, ctx = setup.config, setup.dist
    out = Path(cfg.output_dir)
    distributed.consolidate(setup.model, ctx)  # FSDP: the whole parameters on rank 0, for the export
    export_dir = report = None
    if ctx.main:
        plot_loss(out / "metrics.jsonl", files.owned(out, "loss.png"))
        export_dir = _export(setup, out)
        report = write_report(out, setup=setup)
        rundir.finish(out, steps=progress.steps, export=export_dir, final_loss=progress.final_loss)
    ctx.barrier()
    return RunResult(out, progress.steps, progress.final_loss, progress.eval_loss,
                     export_dir or out / setup.method.export_dir(), report)


def train(setup: Setup, *, console: Console | None = None, on_step: Callable[[int], None] | None = None) -> RunResult:
    """fit, then finish, holding the output dir's lock throughout (taken already if prepare ran in this
    process) and releasing it however the run ends. A write that fails on a full disk is named with the last
    complete checkpoint."""
    from sftlab.files import DISK_ERRORS, WriteError, describe
    from sftlab.train import checkpoint, lock

    out, main = Path(setup.config.output_dir), setup.dist.main
    if main:
        lock.acquire(out)  # one run per output dir
    try:
        return finish(setup, fit(setup, console=console, on_step=on_step))
    except OSError as exc:
        if exc.errno not in DISK_ERRORS:
            raise
        # A write the loop makes itself (metrics, config, plot) on a full disk; checkpoints and the export
        # say so themselves (WriteError).
        raise WriteError(f"writing into {out} failed: {describe(exc)}. The last complete checkpoint is "
                         f"{checkpoint.latest_checkpoint(out)}.") from None
    finally:
        if main:
            lock.release(out)


def _export(setup: Setup, out: Path) -> Path:
    """adapter/ or model/ (the method's registry entry says which), written beside and renamed into place: a
    failed export leaves no partial dir."""
    from sftlab import export, files
    from sftlab.files import atomic_dir

    final = files.owned(out, setup.method.export_dir())
    with atomic_dir(final, what="the export") as tmp:
        export.save_trained(setup.model, setup.method, setup.config, setup.tokenizer, out, into=tmp)
    return final


@dataclass
class RunSource:
    """What a path holds, read from its files (no weights): a run dir or adapter dir gives the config that
    rebuilds its method and the adapter dir; a plain model dir or hub id gives neither."""
    model_path: str
    config: Config | None = None
    adapter: Path | None = None
    trust_remote_code: bool = False


def load_run(path: str, *, base: str | None = None, trust_remote_code: bool = False) -> RunSource:
    """A run dir (its adapter/ or model/), a PEFT-format adapter dir (on its base model, or `base`), or a plain
    HF model dir / hub id. A run dir's config.yaml decides trust_remote_code for it; everything else gets the
    argument (default False)."""
    from sftlab import export
    from sftlab.models.portable import locate

    root = Path(path).expanduser()
    if (root / "config.yaml").is_file() and ((root / "adapter").is_dir() or (root / "model").is_dir()):
        cfg = locate(load_config(root / "config.yaml", [f"model={base}"] if base else []), root)
        if (root / "model").is_dir():  # a whole-model method: a plain model dir
            return RunSource(str(root / "model"), trust_remote_code=cfg.model.trust_remote_code)
        export.check_adapter_weights(root / "adapter")
        return RunSource(cfg.model.path, cfg, root / "adapter", cfg.model.trust_remote_code)
    if (root / export.ADAPTER_CONFIG).is_file():
        export.check_adapter_weights(root)
        base_path, overrides = export.adapter_settings(root)
        if not (base or base_path):
            raise ConfigError(f"{root} names no base model; pass --base PATH.")
        cfg = load_config(overrides=[*overrides, f"model={base or base_path}",
                                     f"model.trust_remote_code={str(trust_remote_code).lower()}"])
        return RunSource(cfg.model.path, cfg, root, trust_remote_code)
    return RunSource(path, trust_remote_code=trust_remote_code)


def load_for_inference(path: str, *, device: torch.device | None = None, base: str | None = None,
                       trust_remote_code: bool = False) -> tuple[Any, Any, Any, Any]:
    """(model, tokenizer, chat template, method or None) of what `path` holds (load_run), in eval mode: an
    adapter's method applied to its base and its weights loaded."""
    from sftlab import export
    from sftlab.config import ModelConfig
    from sftlab.data.templates import load_template
    from sftlab.methods import method_class
    from sftlab.models.load import load_model, load_tokenizer

    source = load_run(path, base=base, trust_remote_code=trust_remote_code)
    cfg = source.config
    if cfg is None:
        model = load_model(ModelConfig(path=source.model_path, trust_remote_code=source.trust_remote_code),
                           device=device)
        tokenizer = load_tokenizer(source.model_path, trust_remote_code=source.trust_remote_code)
        return model, tokenizer, load_template("auto", tokenizer), None
    # The adapter dir's tokenizer was saved with the run: it holds any added tokens and the template.
    tokenizer = load_tokenizer(str(source.adapter), trust_remote_code=cfg.model.trust_remote_code)
    entry = method_class(cfg.method)
    model = load_model(cfg.model, device=device, nf4=entry.nf4(cfg))
    if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    # Rows of tokens added for training (from the adapter's trainable_token_indices) are loaded too.
    method = entry(cfg, trainable_token_ids=export.adapter_token_ids(source.adapter))
    method.apply(model)
    export.load_trained(model, method, source.adapter)
    model.eval()
    return model, tokenizer, load_template("auto", tokenizer), method


def export_gguf(source: str, output: str | Path, *, quant: str = "f16", base: str | None = None,
                overwrite: bool = False, with_modelfile: bool = True) -> dict[str, Any]:
    """`sftlab export SOURCE --format gguf`: the run's (or adapter dir's, or model dir's) model, merged, written
    to `output` (a .gguf file), and an Ollama Modelfile beside it (NAME.Modelfile). Nothing is written before
    every check has passed (export/gguf.py checks the targets, then writes)."""
    from sftlab.export import gguf

    targets = gguf.check_targets(output, quant=quant, overwrite=overwrite, with_modelfile=with_modelfile)
    model, tokenizer, template, method = load_for_inference(source, base=base)
    return gguf.write_model(model, tokenizer, template, method, targets, quant=quant,
                            name=Path(source).expanduser().resolve().name)


MERGE_PROMPTS = ("Hello! What can you do?", "Explain your last answer in one sentence.", "List three colours.")
"""The prompts on which a merged dir's logits are compared with the adapter model's."""


def merge(source: str, output: str | Path, *, base: str | None = None, onto: str | None = None,
          dtype: str | None = None, overwrite: bool = False, say: Callable[[str], None] | None = None) -> list[str]:
    """`sftlab merge` (and `export --format hf`): the adapter of a run dir or adapter dir folded into its base,
    streamed shard by shard into `output` as a plain HF model dir (in the base's stored dtype unless `dtype`;
    export/merge_stream.py), then checked against the adapter model without two full models in memory. Nothing
    of the user's is written over: the output must be new, empty or `overwrite`n, and never the source, the
    base, or a run's own entry. `say` (default: stderr) hears of scratch an interrupted merge left there,
    removed first. Returns the lines to print (where it went, the fidelity check)."""
    import sys

    from sftlab import export
    from sftlab.export import merge_stream

    out = Path(output)
    run_entry_of = _run_entry_of(out, source)
    emit = say or (lambda text: print(text, file=sys.stderr))
    for name in _check_merge_output(out, source, base, overwrite, run_entry_of):
        emit(f"removed {out.parent / name}, left by an interrupted merge")
    job = merge_stream.merge_job(source, base=base)  # no weights read yet
    _check_merge_method(source, job.method if job is not None else None, onto)
    job.load = lambda: load_for_inference(source, base=base)
    export.refuse_merge_output(out, [("the base model", job.config.model.path)])
    if out.exists() and not out.is_dir():
        out.unlink()  # --overwrite of a file
    if run_entry_of is not None:
        from sftlab.files import owned

        owned(run_entry_of, out.name)  # the run's manifest names it first: a user's file there is refused
    inputs = _merge_prompts(job.tokenizer, job.template)
    return merge_stream.merge_and_check(job, out, dtype=_merge_dtype(dtype, job.config.model), onto=onto,
                                        inputs=inputs)


def _check_merge_output(out: Path, source: str, base: str | None, overwrite: bool,
                        run_entry_of: Path | None) -> list[str]:
    """Refuse an output that would write over the source, the base, a symlink or a non-empty dir (without
    `overwrite`); remove the scratch an interrupted merge left there and return its names."""
    from sftlab import export
    from sftlab.files import remove_stale_scratch

    export.refuse_merge_output(out, [("the source", source), ("--base", base)], run_entry_of=run_entry_of)
    if out.is_symlink():
        raise SftlabError(f"--output {out} is a symlink (to {out.readlink()}); it is never written through. Give "
                          "--output the real path.")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise SftlabError(f"--output {out} already exists and is not empty; choose another dir, or pass --overwrite "
                          "to replace it (the new dir replaces it whole, once complete).")
    return remove_stale_scratch(out)  # a merge killed mid-write left it (about the model's size)


def _check_merge_method(source: str, method: Any, onto: str | None) -> None:
    if method is None:
        raise SftlabError(f"{source} is not a run dir with an adapter/ nor an adapter dir; nothing to merge.")
    if onto and not method.quantized_base:
        raise SftlabError(f"--onto applies to QLoRA runs; {source} holds a {method.name} adapter, which "
                          "merges onto its base weights as they are. Leave --onto out.")


def _merge_prompts(tokenizer: Any, template: Any) -> list[list[int]]:
    from sftlab.generate import prompt_ids

    return [prompt_ids(tokenizer, template, [{"role": "user", "content": text}]) for text in MERGE_PROMPTS]


def _run_entry_of(out: Path, source: str) -> Path | None:
    """The run dir when --output is a new entry of the run being merged (runs/mine/merged): a name that is
    not one of the run's own files (adapter/, checkpoints/, config.yaml, ...); else None."""
    from sftlab import files
    from sftlab.train.rundir import RUN_FILES

    run = Path(source).expanduser()
    if files.manifest(run) is None or out.name in RUN_FILES or out.name in files.CONTROL_NAMES:
        return None
    return run if out.expanduser().resolve().parent == run.resolve() else None


def _merge_dtype(name: str | None, model: Any) -> torch.dtype:
    """`name`, or the dtype the base model's weights are stored in (the most common floating dtype of its
    checkpoint's tensors; fp32 when it cannot be read): a bf16 base gives a bf16 merged dir, not fp32."""
    import torch

    if name is not None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]
    from collections import Counter

    from sftlab.models.load import model_source
    from sftlab.models.stream import DTYPES, checkpoint_tensors, weight_files

    source, _ = model_source(model)
    if source is None:
        return torch.float32
    stored = Counter(info.dtype for info in checkpoint_tensors(weight_files(source)).values()
                     if DTYPES.get(info.dtype, torch.uint8).is_floating_point)
    return DTYPES[stored.most_common(1)[0][0]] if stored else torch.float32
