"""THE training loop, the same for every method and stage: methods differ only in what trains and what is
saved, stages (sft, dpo) only in their objective (train/objective.py): what a micro-batch is, which module sums
its loss, and what the step's summed loss is divided by."""

from __future__ import annotations

import contextlib
import math
import signal
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.text import Text

from sftlab.config import PAIR_STAGES, Config, to_yaml
from sftlab.data import packing
from sftlab.data.batching import Batch
from sftlab.data.dataset import EncodedDataset
from sftlab.data.mixture import Mixture
from sftlab.data.preference import PairDataset
from sftlab.errors import SftlabError
from sftlab import files
from sftlab.files import DISK_ERRORS, WriteError, atomic_dir, describe, write_text_atomic
from sftlab.methods import Method
from sftlab.models.attention import packed_attention
from sftlab.train import checkpoint, distributed, lock, rundir
from sftlab.train.checkpoint import TrainState
from sftlab.train.forgetting import RunProbe
from sftlab.train.distributed import SINGLE, Dist
from sftlab.train.trackers import open_trackers
from sftlab.train.metrics import MetricsLog, StepTimer, plot_loss
from sftlab.train.objective import Objective, objective_for
from sftlab.train.optim import build_optimizer, build_scheduler
from sftlab.train.report import write_report
from sftlab.train.signals import StopRequest, TrainingInterrupted


class TrainingError(SftlabError):
    """Training cannot go on (e.g. the loss became NaN); the last good checkpoint is kept."""


@dataclass
class RunResult:
    output_dir: Path
    steps: int
    final_loss: float | None
    eval_loss: float | None
    export_dir: Path | None
    report: Path | None = None
    """OUTPUT/report.html (rank 0)."""


@dataclass
class Setup:
    """Everything the loop needs, prepared by `sftlab.train.setup.prepare` (or a test)."""
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


def epoch_plan(setup: Setup, epoch: int) -> list[np.ndarray]:
    """The example indices of each micro-batch of `epoch`, in order: a pure function of (data, seed, epoch)."""
    cfg = setup.config
    lengths = setup.train_data.lengths
    indices = epoch_indices(setup, epoch)
    if cfg.data.packing:
        return packing.packed_plan(lengths, indices, capacity=objective_for(cfg).capacity,
                                   rows_per_batch=cfg.train.micro_batch_size, seed=cfg.train.seed, epoch=epoch)
    # Grouped by global step: micro-batches x accumulation x ranks (what a single process with the same
    # global batch would group).
    return packing.grouped_plan(lengths, indices, micro_batch_size=cfg.train.micro_batch_size,
                                grad_accum_steps=grad_accum_steps(setup) * setup.dist.world, seed=cfg.train.seed,
                                epoch=epoch)


def epoch_indices(setup: Setup, epoch: int) -> np.ndarray:
    """The items `epoch` trains: every training index, or the mixture's choice for this epoch."""
    return setup.train_indices if setup.mixture is None else setup.mixture.epoch_indices(epoch)


def epoch_length(setup: Setup) -> int:
    """Micro-batches in one epoch (the same for every epoch). An epoch ends with a short micro-batch rather
    than borrowing from the next epoch. With a mixture and packing, later epochs' rows may differ by a few
    from epoch 0's (other examples)."""
    cfg = setup.config
    return packing.plan_length(setup.train_data.lengths, epoch_indices(setup, 0), packing=cfg.data.packing,
                               capacity=objective_for(cfg).capacity, micro_batch_size=cfg.train.micro_batch_size)


def grad_accum_steps(setup: Setup, per_epoch: int | None = None) -> int:
    """train.grad_accum_steps, clamped to the micro-batches one epoch has (per rank): a step larger than the
    data would run through it several times over, the same examples summed twice or more into one update.
    Clamped, each step takes at most one epoch's worth; `_train` says so when it clamps."""
    wanted = setup.config.train.grad_accum_steps
    if wanted == 1:
        return 1
    per_epoch = epoch_length(setup) if per_epoch is None else per_epoch
    return max(1, min(wanted, per_epoch // setup.dist.world))


def total_steps(setup: Setup) -> int:
    cfg = setup.config
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    per_epoch = epoch_length(setup)
    per_step = grad_accum_steps(setup, per_epoch) * setup.dist.world  # micro-batches of one global step
    return max(1, math.ceil(cfg.train.epochs * per_epoch / per_step))


def make_batch(setup: Setup, data: EncodedDataset | PairDataset, chosen: np.ndarray, pad_id: int) -> Batch:
    return objective_for(setup.config).batch(data, chosen, pad_id)


def micro_batches(setup: Setup, state: TrainState, pad_id: int) -> Iterator[Batch]:
    """An endless stream of this rank's micro-batches. The run's global stream is the epoch plans one after
    the other; each round of `world` entries gives rank r its r-th, so the ranks together train exactly
    the micro-batches (and steps) one process would, each entry once. state.epoch / state.position is the
    global cursor, the same on every rank."""
    rank, world = setup.dist.rank, setup.dist.world
    plans: dict[int, list[np.ndarray]] = {}
    while True:
        entries = []
        while len(entries) < world:
            if state.epoch not in plans:
                plans = {state.epoch: epoch_plan(setup, state.epoch)}
            if state.position >= len(plans[state.epoch]):
                state.epoch, state.position = state.epoch + 1, 0
                continue
            entries.append(plans[state.epoch][state.position])
            state.position += 1
        yield make_batch(setup, setup.train_data, entries[rank], pad_id)


def evaluate(setup: Setup, pad_id: int, engine: torch.nn.Module | None = None,
             indices: np.ndarray | None = None) -> tuple[float, dict[str, float]]:
    """The objective's loss over the eval data, per unit (the mean over every supervised token, or pair), and
    its metrics per unit; batched as training batches them; with several ranks, each runs every world-th batch
    and the sums are added up."""
    cfg, model, ctx = setup.config, setup.model, setup.dist
    objective = objective_for(cfg)
    engine = engine or objective.engine(model, setup.method, reference_model=setup.reference_model)
    lengths = setup.eval_data.lengths
    indices = setup.eval_indices if indices is None else indices
    if cfg.data.packing:
        plan = packing.packed_plan(lengths, indices, capacity=objective.capacity,
                                   rows_per_batch=cfg.train.micro_batch_size, seed=None, epoch=0)
    else:
        ordered = indices[np.argsort(-lengths[indices], kind="stable")]  # similar lengths pad little
        plan = [ordered[i:i + cfg.train.micro_batch_size] for i in range(0, len(ordered), cfg.train.micro_batch_size)]
    sums = torch.zeros(1 + len(objective.metrics), dtype=torch.float64)  # loss, metrics
    count = 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(plan), ctx.world):
            mine = start + ctx.rank
            batch = objective.batch(setup.eval_data, plan[mine], pad_id) if mine < len(plan) \
                else objective.empty_batch(pad_id)
            loss, metrics = objective.split(engine(batch.to(setup.device)))
            sums += torch.cat([loss.reshape(1), metrics]).double().cpu()
            count += objective.count(batch)
    distributed.reshard(engine, ctx)
    model.train()
    count, *totals = ctx.sum([count, *sums.tolist()])
    means = [total / max(count, 1) for total in totals]
    return means[0], objective.present(dict(zip(objective.metrics, means[1:])))


NONFINITE_STREAK = 10
"""With train.on_nonfinite=skip, the run stops after this many non-finite steps in a row."""


def train(setup: Setup, *, console: Console | None = None,
          on_step: Callable[[int], None] | None = None) -> RunResult:
    """Train as the config says, from the newest checkpoint when train.resume=auto finds one; export,
    report, and mark the run finished. SIGINT/SIGTERM end it after the current step with a checkpoint
    (TrainingInterrupted); a non-finite step stops or is skipped (train.on_nonfinite); the output dir's
    lock is released however it ends."""
    cfg, ctx = setup.config, setup.dist
    out = Path(cfg.output_dir)
    if ctx.main:
        lock.acquire(out)  # one run per output dir (taken already if prepare() ran in this process)
    try:
        with StopRequest() as stop:
            return _train(setup, out, console, on_step, stop)
    except OSError as exc:
        if exc.errno not in DISK_ERRORS:
            raise
        # A write the loop makes itself (metrics, config, plot) on a full disk; checkpoints and the export
        # say so themselves (WriteError).
        raise WriteError(f"writing into {out} failed: {describe(exc)}. The last complete checkpoint is "
                         f"{checkpoint.latest_checkpoint(out)}.") from None
    finally:
        if ctx.main:
            lock.release(out)


def _train(setup: Setup, out: Path, console: Console | None, on_step: Callable[[int], None] | None,
           stop: StopRequest) -> RunResult:
    cfg, model, method, ctx = setup.config, setup.model, setup.method, setup.dist
    if ctx.main:
        write_text_atomic(files.owned(out, "config.yaml"), to_yaml(cfg))
        files.owned(out, "checkpoints")  # recorded before the first checkpoint (every rank writes into it)
    console = console if ctx.main and console is not None else Console(stderr=True, quiet=not ctx.main)
    pad_id = _pad_id(setup.tokenizer)
    if cfg.train.gradient_checkpointing:
        _enable_recompute(model)
    if cfg.train.compile:
        model.base_model.compile()
    objective = objective_for(cfg)
    forward = objective.engine(model, method, reference_model=setup.reference_model)
    engine = distributed.wrap(model, method, ctx, forward=forward)  # FSDP replaces the parameters: collect them after
    params = method.trainable_parameters(model)
    optimizer = build_optimizer(params, cfg.train)
    steps = total_steps(setup)
    accum = _clamped_accum(setup, console)
    scheduler = build_scheduler(optimizer, cfg.train, steps)
    state = TrainState()
    latest = checkpoint.latest_checkpoint(out) if cfg.train.resume == "auto" else None
    if latest is not None:
        state = checkpoint.load_checkpoint(latest, optimizer=optimizer, scheduler=scheduler, method=method,
                                           model=model, ctx=ctx)
        console.print(f"resuming from {latest} (step {state.step} of {steps})", markup=False)
    state.extra["data"] = rundir.data_fingerprints(cfg)  # what this run's checkpoints were trained on
    model.train()
    stream = micro_batches(setup, state, pad_id)
    log = MetricsLog(out, total_steps=steps, start_step=state.step, console=console,
                     trackers=open_trackers(cfg, out)) if ctx.main else None
    timer = StepTimer(enabled=cfg.train.profile, device=setup.device)
    probe = RunProbe.start(setup, out, console, state, pad_id=pad_id)  # the base's answers, before any step
    run_started = time.perf_counter()
    last_loss = eval_loss = None
    streak = 0  # non-finite steps in a row

    def save() -> Path:
        return checkpoint.save_checkpoint(out, state, trainable=method.state_dict(model), optimizer=optimizer,
                                          scheduler=scheduler, keep=cfg.train.keep_checkpoints, ctx=ctx, model=model)

    attention = packed_attention(model) if cfg.data.packing else contextlib.nullcontext()
    with attention:
        try:
            while state.step < steps:
                started = time.perf_counter()
                timer.start()
                batches = [next(stream) for _ in range(accum)]
                # Counted on the host before the move, then over all ranks: the step's loss is the mean
                # over every unit (supervised token, or pair) of the global batch.
                units, supervised, tokens = (int(n) for n in ctx.sum([sum(objective.count(b) for b in batches),
                                                                      sum(b.num_supervised for b in batches),
                                                                      sum(b.num_tokens for b in batches)]))
                timer.mark("data")
                step_loss = torch.zeros((), device=setup.device)
                step_sums = torch.zeros(len(objective.metrics), device=setup.device)
                for index, batch in enumerate(batches):
                    with distributed.gradient_sync(engine, ctx, last=index == len(batches) - 1):
                        share, sums = _forward_backward(engine, objective, batch.to(setup.device), units, ctx.world,
                                                        timer)
                    step_loss += share
                    step_sums += sums
                grad_norm = distributed.full_tensor(_clip(params, cfg.train.max_grad_norm))
                # The one host sync of the step, for the log and the NaN check (plus one sum over ranks,
                # which also tells every rank whether any was asked to stop).
                local_loss, norm, *local_sums = torch.cat([torch.stack([step_loss, grad_norm.to(step_loss)]),
                                                           step_sums]).tolist()
                last_loss, stops, *metric_sums = ctx.sum([local_loss, float(stop.signum is not None), *local_sums])
                lr = scheduler.get_last_lr()[0]
                if math.isfinite(last_loss) and math.isfinite(norm):
                    streak = 0
                    optimizer.step()
                else:
                    streak += 1
                    problem = _nonfinite(state, last_loss, norm, batches, out)
                    if cfg.train.on_nonfinite == "stop" or streak >= NONFINITE_STREAK:
                        again = f" ({streak} such steps in a row)" if streak > 1 else ""
                        raise TrainingError(f"{problem}{again}. Nothing of this step was applied; the last "
                                            f"complete checkpoint is {checkpoint.latest_checkpoint(out)}. Lower "
                                            "train.lr, check those rows, or set train.on_nonfinite=skip.")
                    console.print(Text(f"{problem}: step skipped (train.on_nonfinite=skip)", style="yellow"))
                    state.skipped_steps += 1
                    if log is not None:
                        log.log({"step": state.step + 1, "skipped": problem,
                                 "rows": [w for b in batches for w in b.where]})
                with warnings.catch_warnings():  # a skipped first step: torch warns the order looks wrong
                    warnings.simplefilter("ignore", UserWarning)
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                timer.mark("optimizer")
                state.step += 1
                if log is not None and streak == 0 and (state.step % cfg.train.log_every_steps == 0 or state.step == steps):
                    log.log({"step": state.step, "epoch": state.epoch, "loss": last_loss, "lr": lr,
                             "grad_norm": norm, "tokens": tokens, "supervised_tokens": supervised,
                             **_per_unit(objective, units, metric_sums),
                             "seconds": time.perf_counter() - started, **timer.seconds()})
                early = False
                evaluated = bool(setup.eval_indices is not None and len(setup.eval_indices) and (
                        state.step == steps or (cfg.train.eval_every_steps and state.step % cfg.train.eval_every_steps == 0)))
                if evaluated:
                    eval_loss, eval_metrics = evaluate(setup, pad_id, engine)
                probed = probe.at_step(state, steps, eval_loss, evaluated) if probe is not None else {}
                if evaluated:
                    if log is not None:
                        log.log({"step": state.step, "eval_loss": eval_loss,
                                 **({"eval_perplexity": math.exp(min(eval_loss, 50))} if objective.stage == "sft"
                                    else {f"eval_{k}": v for k, v in eval_metrics.items()}),
                                 **_eval_per_source(setup, pad_id, engine), **probed})
                    early = _early_stop(state, eval_loss, cfg.train.early_stopping_patience)
                elif probed and log is not None:
                    log.log({"step": state.step, **probed})
                early = early or (probe is not None and probe.should_stop())
                kept = probe is not None and probe.wants_checkpoint(state)  # the recommended step so far
                if state.step == steps or early or stops or kept or (cfg.train.save_every_steps and state.step % cfg.train.save_every_steps == 0):
                    saved = save()
                    if stops:
                        raise TrainingInterrupted(
                            f"stopped by {stop.name or 'a signal on another rank'} after step {state.step} of {steps}; "
                            f"saved checkpoint {saved}. To continue, run the same command again: train.resume=auto "
                            "resumes from it.", signum=stop.signum or signal.SIGTERM)
                if on_step is not None:
                    on_step(state.step)
                if early:
                    console.print(f"early stopping: no better eval loss in {cfg.train.early_stopping_patience} evaluations"
                                  if probe is None or not probe.should_stop() else "early stopping: eval.probe_stop=true")
                    break
        finally:
            if log is not None:
                log.close()
    distributed.consolidate(model, ctx)  # FSDP: the whole parameters on rank 0, for the export
    export_dir = report = None
    if ctx.main:
        plot_loss(out / "metrics.jsonl", files.owned(out, "loss.png"))
        if probe is not None:
            probe.finish(time.perf_counter() - run_started)
        export_dir = _export(setup, out)
        report = write_report(out, setup=setup)
        rundir.finish(out, steps=state.step, export=export_dir, final_loss=last_loss)
    ctx.barrier()
    return RunResult(out, state.step, last_loss, eval_loss, export_dir or out / ("model" if method.name == "full" else "adapter"),
                     report)


def _clamped_accum(setup: Setup, console: Console) -> int:
    """grad_accum_steps(setup), printing what was clamped and why when it is less than the config's."""
    cfg = setup.config
    wanted = cfg.train.grad_accum_steps
    per_epoch = epoch_length(setup) if wanted > 1 else 1
    accum = grad_accum_steps(setup, per_epoch)
    if accum < wanted:
        units = "pairs" if cfg.stage in PAIR_STAGES else "examples"
        made = f"{per_epoch} micro-batches of {cfg.train.micro_batch_size} " + \
            ("packed rows" if cfg.data.packing else units)
        ranks = f" over {setup.dist.world} processes" if setup.dist.world > 1 else ""
        console.print(f"train.grad_accum_steps={wanted} is more than the data holds: an epoch of "
                      f"{len(setup.train_indices)} {units} makes {made}{ranks}; using grad_accum_steps={accum}, so "
                      "a step never runs through the data more than once. Lower train.grad_accum_steps (or "
                      "train.micro_batch_size) to choose yourself.", markup=False)
    return accum


def _nonfinite(state: TrainState, loss: float, norm: float, batches: list[Batch], out: Path) -> str:
    what = f"the loss became {loss}" if not math.isfinite(loss) else f"the gradient norm became {norm}"
    rows = [w for b in batches for w in b.where]
    shown = ", ".join(rows[:8]) + (f" and {len(rows) - 8} more" if len(rows) > 8 else "")
    return f"{what} at step {state.step + 1} (rows {shown})"


def _forward_backward(engine: torch.nn.Module, objective: Objective, batch: Batch, units: int, world: int,
                      timer: StepTimer) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward of one micro-batch; returns its detached share of the step loss (its summed loss
    over the global batch's units: supervised tokens, or pairs) and its metric sums. The backward is scaled by
    the number of ranks, whose gradients DDP and FSDP average. The graph dies with this frame: a loss kept
    across steps holds its graph, which fragments the CPU heap (peak RSS grew ~30% over a few steps when the
    loop kept it)."""
    loss, sums = objective.split(engine(batch))
    share = loss / max(units, 1)
    timer.mark("forward")
    (share * world if world > 1 else share).backward()
    timer.mark("backward")
    return share.detach(), sums.detach()


def _per_unit(objective: Objective, units: int, sums: list[float]) -> dict[str, float]:
    """The step's metric sums per unit (stage dpo: per pair), and the pair count; nothing for sft."""
    if not objective.metrics:
        return {}
    return {objective.unit: units, **objective.present({name: total / max(units, 1)
                                                        for name, total in zip(objective.metrics, sums)})}


def _enable_recompute(model: torch.nn.Module) -> None:
    """transformers ≥ 5.2x calls it activation checkpointing; older releases gradient checkpointing."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _clip(params: dict[str, torch.nn.Parameter], max_norm: float | None) -> torch.Tensor:
    """The global gradient norm (a tensor: no host sync), after clipping the gradients to max_norm."""
    grads = [p for p in params.values() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if max_norm is None:
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in grads]))
    return torch.nn.utils.clip_grad_norm_(grads, max_norm)


def _eval_per_source(setup: Setup, pad_id: int, engine: torch.nn.Module) -> dict[str, float]:
    """eval_loss/<source> for each of several eval sources (every rank runs it: evaluate sums across ranks)."""
    groups = setup.eval_groups or {}
    return {f"eval_loss/{label}": evaluate(setup, pad_id, engine, indices)[0]
            for label, indices in groups.items() if len(indices)}


def _early_stop(state: TrainState, eval_loss: float, patience: int | None) -> bool:
    if state.best_eval_loss is None or eval_loss < state.best_eval_loss:
        state.best_eval_loss, state.evals_without_improvement = eval_loss, 0
        return False
    state.evals_without_improvement += 1
    return patience is not None and state.evals_without_improvement >= patience


def _pad_id(tokenizer: object) -> int:
    for attribute in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attribute, None)
        if isinstance(value, int):
            return value
    return 0


def _export(setup: Setup, out: Path) -> Path:
    """adapter/ or model/, written beside and renamed into place: a failed export leaves no partial dir."""
    from sftlab import export

    final = files.owned(out, "model" if setup.method.name == "full" else "adapter")
    with atomic_dir(final, what="the export") as tmp:
        export.save_trained(setup.model, setup.method, setup.config, setup.tokenizer, out, into=tmp)
    return final
