"""THE training loop, the same for every method and stage: methods differ only in what trains and what is
saved, stages (sft, dpo) only in their objective (train/objective.py): what a micro-batch is, which module sums
its loss, and what the step's summed loss is divided by. The loop runs the steps (with eval and checkpoints);
the run around it (the output dir's lock, export, report, finished.json) is runs.py's."""

from __future__ import annotations

import contextlib
import math
import signal
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.text import Text

from sftlab import files
from sftlab.config import PAIR_STAGES, to_yaml
from sftlab.data import packing
from sftlab.data.batching import Batch
from sftlab.data.dataset import EncodedDataset
from sftlab.data.preference import PairDataset
from sftlab.errors import SftlabError
from sftlab.files import write_text_atomic
from sftlab.models.attention import packed_attention, prefix_sharing
from sftlab.train import checkpoint, distributed, rundir
from sftlab.train.checkpoint import TrainState
from sftlab.train.forgetting import RunProbe
from sftlab.train.metrics import MetricsLog, StepTimer
from sftlab.train.objective import Objective, objective_for
from sftlab.train.optim import build_optimizer, build_scheduler
from sftlab.train.setup import Setup, pad_id
from sftlab.train.signals import StopRequest, TrainingInterrupted
from sftlab.train.trackers import open_trackers


class TrainingError(SftlabError):
    """Training cannot go on (e.g. the loss became NaN); the last good checkpoint is kept."""


@dataclass
class Progress:
    """What the steps did; runs.finish reads it."""
    steps: int
    final_loss: float | None = None
    eval_loss: float | None = None


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
    """train.max_steps, else the steps that train.epochs passes over the data take: the micro-batches of those
    passes (epoch_limits) in steps of grad_accum_steps x ranks, the last step taking what is left."""
    cfg = setup.config
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    per_step = grad_accum_steps(setup) * setup.dist.world  # micro-batches of one global step
    return max(1, math.ceil(sum(epoch_limits(setup)) / per_step))


def epoch_limits(setup: Setup) -> list[int]:
    """The micro-batches each epoch trains with train.epochs (a fraction of a pass trains that share of the
    last epoch's plan, rounded up); [] with train.max_steps (the data then repeats until the steps are done).
    Plans keep their length from epoch to epoch except with a mixture and packing, where each is measured."""
    cfg = setup.config
    if cfg.train.max_steps is not None:
        return []
    passes = math.ceil(cfg.train.epochs)
    varies = setup.mixture is not None and cfg.data.packing
    lengths = [len(epoch_plan(setup, e)) for e in range(passes)] if varies else [epoch_length(setup)] * passes
    return [length if e + 1 <= cfg.train.epochs else math.ceil((cfg.train.epochs - e) * length)
            for e, length in enumerate(lengths)]


def make_batch(setup: Setup, data: EncodedDataset | PairDataset, chosen: np.ndarray, pad_id: int) -> Batch:
    return objective_of(setup).batch(data, chosen, pad_id)


def objective_of(setup: Setup) -> Objective:
    """The run's objective, its packed rows sharing prefixes where the config and the model's attention allow. Not
    under train.compile: the compiled layers would be specialised (and recompiled) for every row's prefixes."""
    sharing = prefix_sharing(setup.model) and not setup.config.train.compile
    return objective_for(setup.config, share_prefixes=sharing)


class MicroBatches:
    """This rank's micro-batches. The run's global stream is the epoch plans one after the other (each cut at
    its epoch_limits entry, and ended after the last, when train.epochs sets the length; endless with
    train.max_steps); each round of `world` entries gives rank r its r-th, so the ranks together train exactly
    the micro-batches (and steps) one process would, each entry once. A last round with fewer entries than
    ranks gives the others a batch that adds nothing (the objective's empty batch), so their collectives meet.
    state.epoch / state.position is the global cursor, the same on every rank (and in each checkpoint)."""

    def __init__(self, setup: Setup, state: TrainState, pad_id: int) -> None:
        self.setup, self.state, self.pad_id = setup, state, pad_id
        self.limits = epoch_limits(setup)
        self.plans: dict[int, list[np.ndarray]] = {}

    def take(self, rounds: int) -> list[Batch]:
        """Up to `rounds` micro-batches of this rank; fewer only at the end of the last epoch."""
        batches = []
        for _ in range(rounds):
            entries = self._round()
            if not entries:
                break
            rank = self.setup.dist.rank
            batches.append(make_batch(self.setup, self.setup.train_data, entries[rank], self.pad_id)
                           if rank < len(entries) else objective_for(self.setup.config).empty_batch(self.pad_id))
        return batches

    def _round(self) -> list[np.ndarray]:
        state, entries = self.state, []
        while len(entries) < self.setup.dist.world:
            if self.limits and state.epoch >= len(self.limits):
                break  # every epoch trained
            if state.epoch not in self.plans:
                self.plans = {state.epoch: epoch_plan(self.setup, state.epoch)}
            plan = self.plans[state.epoch]
            end = self.limits[state.epoch] if self.limits else len(plan)
            if state.position >= end:
                state.epoch, state.position = state.epoch + 1, 0
                continue
            entries.append(plan[state.position])
            state.position += 1
        return entries

    def epochs_done(self) -> float:
        """Passes over the data so far: whole epochs plus the share of the current one's plan consumed."""
        plan = self.plans.get(self.state.epoch)
        return self.state.epoch + (self.state.position / len(plan) if plan else 0.0)


def evaluate(setup: Setup, pad_id: int, engine: torch.nn.Module | None = None,
             indices: np.ndarray | None = None) -> tuple[float, dict[str, float]]:
    """The objective's loss over the eval data, per unit (the mean over every supervised token, or pair), and
    its metrics per unit; batched as training batches them; with several ranks, each runs every world-th batch
    and the sums are added up."""
    cfg, model, ctx = setup.config, setup.model, setup.dist
    objective = objective_of(setup)
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


@dataclass
class Loop:
    """One training run's moving parts, made by `_start` and shared by the step's functions."""
    setup: Setup
    out: Path
    console: Console
    objective: Objective
    engine: torch.nn.Module
    params: dict[str, torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    state: TrainState
    batches: MicroBatches
    log: MetricsLog | None
    timer: StepTimer
    steps: int
    accum: int
    pad_id: int
    stop: StopRequest
    probe: RunProbe | None = None
    """The forgetting probe (train/forgetting.py); None when eval.probe=none or on ranks other than 0."""
    started: float = 0.0
    streak: int = 0
    """Non-finite steps in a row."""
    tokens: int = 0
    shared_tokens: int = 0
    """This process's training tokens so far, and those of them read from a shared prefix (data.share_prefixes)."""

    def save(self) -> Path:
        cfg, model = self.setup.config, self.setup.model
        return checkpoint.save_checkpoint(self.out, self.state, trainable=self.setup.method.state_dict(model),
                                          optimizer=self.optimizer, scheduler=self.scheduler,
                                          keep=cfg.train.keep_checkpoints, ctx=self.setup.dist, model=model)


def train(setup: Setup, *, console: Console | None = None, on_step: Callable[[int], None] | None = None) -> Progress:
    """The optimizer steps as the config says, from the newest checkpoint when train.resume=auto finds one; the
    metrics logged, eval run and checkpoints saved on the way. SIGINT/SIGTERM end it after the current step
    with a checkpoint (TrainingInterrupted); a non-finite step stops or is skipped (train.on_nonfinite). The
    run's end (export, report, finished.json) is runs.finish's."""
    with StopRequest() as stop:
        run = _start(setup, console, stop)
        progress = Progress(run.state.step)
        attention = packed_attention(setup.model) if setup.config.data.packing else contextlib.nullcontext()
        with attention:
            try:
                while run.state.step < run.steps:
                    batches = run.batches.take(run.accum)
                    if not batches:
                        break  # a mixture's packed epochs came out shorter than planned
                    progress.final_loss, stops = _step(run, batches)
                    early = _after_step(run, progress, stops)
                    if on_step is not None:
                        on_step(run.state.step)
                    if early:
                        run.console.print("early stopping: eval.probe_stop=true" if run.probe is not None and
                                          run.probe.should_stop() else "early stopping: no better eval loss in "
                                          f"{setup.config.train.early_stopping_patience} evaluations")
                        break
            finally:
                if run.log is not None:
                    run.log.close()
    progress.steps = run.state.step
    if run.shared_tokens:
        run.console.print(f"shared prefixes: {run.shared_tokens:,} of the {run.tokens:,} tokens trained on "
                          f"({run.shared_tokens / run.tokens:.0%}) were read from an identical beginning in their "
                          "packed row, not run again (data.share_prefixes)", markup=False)
    if run.probe is not None:
        run.probe.finish(time.perf_counter() - run.started)
    return progress


def _start(setup: Setup, console: Console | None, stop: StopRequest) -> Loop:
    """The run's config recorded, the model made ready (recompute, compile, the distributed wrapper), the
    optimizer and schedule built, and the newest checkpoint loaded when train.resume=auto finds one."""
    cfg, model, method, ctx = setup.config, setup.model, setup.method, setup.dist
    out = Path(cfg.output_dir)
    if ctx.main:
        write_text_atomic(files.owned(out, "config.yaml"), to_yaml(cfg))
        files.owned(out, "checkpoints")  # recorded before the first checkpoint (every rank writes into it)
    console = console if ctx.main and console is not None else Console(stderr=True, quiet=not ctx.main)
    if cfg.train.gradient_checkpointing:
        _enable_recompute(model)
    if cfg.train.compile:
        model.base_model.compile()
    objective = objective_of(setup)
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
    log = MetricsLog(out, total_steps=steps, start_step=state.step, console=console,
                     trackers=open_trackers(cfg, out)) if ctx.main else None
    pad = pad_id(setup.tokenizer)
    started = time.perf_counter()  # the probe's base answers count in the run's time (its share is of the whole)
    probe = RunProbe.start(setup, out, console, state, pad_id=pad)  # the base's answers, before any step
    return Loop(setup, out, console, objective, engine, params, optimizer, scheduler, state,
                MicroBatches(setup, state, pad), log, StepTimer(enabled=cfg.train.profile, device=setup.device),
                steps, accum, pad, stop, probe, started)


def _step(run: Loop, batches: list[Batch]) -> tuple[float, float]:
    """One optimizer step over `batches` (this rank's micro-batches of it): (the step's loss, whether any rank
    was asked to stop). The loss is the mean over every unit (supervised token, or pair) of the global batch."""
    setup, objective, ctx, timer = run.setup, run.objective, run.setup.dist, run.timer
    started = time.perf_counter()
    timer.start()
    # Counted on the host before the move, then over all ranks.
    units, supervised, tokens, shared = (int(n) for n in ctx.sum([sum(objective.count(b) for b in batches),
                                                                  sum(b.num_supervised for b in batches),
                                                                  sum(b.num_tokens for b in batches),
                                                                  sum(b.shared_tokens for b in batches)
                                                                  if objective.share_prefixes else 0]))
    run.tokens, run.shared_tokens = run.tokens + tokens, run.shared_tokens + shared
    timer.mark("data")
    step_loss = torch.zeros((), device=setup.device)
    step_sums = torch.zeros(len(objective.metrics), device=setup.device)
    for index, batch in enumerate(batches):
        with distributed.gradient_sync(run.engine, ctx, last=index == len(batches) - 1):
            share, sums = _forward_backward(run.engine, objective, batch.to(setup.device), units, ctx.world, timer)
        step_loss += share
        step_sums += sums
    grad_norm = distributed.full_tensor(_clip(run.params, setup.config.train.max_grad_norm))
    # The one host sync of the step, for the log and the NaN check (plus one sum over ranks, which also tells
    # every rank whether any was asked to stop).
    local_loss, norm, *local_sums = torch.cat([torch.stack([step_loss, grad_norm.to(step_loss)]),
                                               step_sums]).tolist()
    loss, stops, *metric_sums = ctx.sum([local_loss, float(run.stop.signum is not None), *local_sums])
    lr = run.scheduler.get_last_lr()[0]
    applied = _apply_or_skip(run, loss, norm, batches)
    run.state.step += 1
    cfg = setup.config
    if run.log is not None and applied and (run.state.step % cfg.train.log_every_steps == 0
                                            or run.state.step == run.steps):
        run.log.log({"step": run.state.step, "epoch": round(run.batches.epochs_done(), 4), "loss": loss, "lr": lr,
                     "grad_norm": norm, "tokens": tokens, "supervised_tokens": supervised,
                     **({"tokens_shared": shared} if objective.share_prefixes else {}),
                     **_per_unit(objective, units, metric_sums),
                     "seconds": time.perf_counter() - started, **timer.seconds()})
    return loss, stops


def _apply_or_skip(run: Loop, loss: float, norm: float, batches: list[Batch]) -> bool:
    """The optimizer step when loss and gradient norm are finite; else the step is skipped (or the run stopped,
    train.on_nonfinite). The schedule advances either way. True when the step was applied."""
    cfg, state = run.setup.config, run.state
    if math.isfinite(loss) and math.isfinite(norm):
        run.streak = 0
        run.optimizer.step()
    else:
        run.streak += 1
        problem = _nonfinite(state, loss, norm, batches, run.out)
        if cfg.train.on_nonfinite == "stop" or run.streak >= NONFINITE_STREAK:
            again = f" ({run.streak} such steps in a row)" if run.streak > 1 else ""
            raise TrainingError(f"{problem}{again}. Nothing of this step was applied; the last complete checkpoint "
                                f"is {checkpoint.latest_checkpoint(run.out)}. Lower train.lr, check those rows, or "
                                "set train.on_nonfinite=skip.")
        run.console.print(Text(f"{problem}: step skipped (train.on_nonfinite=skip)", style="yellow"))
        state.skipped_steps += 1
        if run.log is not None:
            run.log.log({"step": state.step + 1, "skipped": problem, "rows": [w for b in batches for w in b.where]})
    with warnings.catch_warnings():  # a skipped first step: torch warns the order looks wrong
        warnings.simplefilter("ignore", UserWarning)
        run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.timer.mark("optimizer")
    return run.streak == 0


def _after_step(run: Loop, progress: Progress, stops: float) -> bool:
    """Eval when due (logged; early stopping decided), a checkpoint when due, and the stop a signal asked for.
    True when early stopping ends the run."""
    cfg, state, setup = run.setup.config, run.state, run.setup
    early = False
    last = state.step == run.steps
    evaluated = bool(setup.eval_indices is not None and len(setup.eval_indices) and (
        last or (cfg.train.eval_every_steps and state.step % cfg.train.eval_every_steps == 0)))
    metrics = eval_metrics(setup, run.pad_id, run.engine) if evaluated else {}
    if evaluated:
        progress.eval_loss = metrics["eval_loss"]
    probed = run.probe.at_step(state, run.steps, progress.eval_loss, evaluated) if run.probe is not None else {}
    if run.log is not None and (metrics or probed):
        run.log.log({"step": state.step, **metrics, **probed})
    if evaluated:
        early = _early_stop(state, progress.eval_loss, cfg.train.early_stopping_patience)
    early = early or (run.probe is not None and run.probe.should_stop())
    kept = run.probe is not None and run.probe.wants_checkpoint(state)  # the recommended step so far
    if last or early or stops or kept or (cfg.train.save_every_steps and state.step % cfg.train.save_every_steps == 0):
        saved = run.save()
        if stops:
            raise TrainingInterrupted(
                f"stopped by {run.stop.name or 'a signal on another rank'} after step {state.step} of {run.steps}; "
                f"saved checkpoint {saved}. To continue, run the same command again: train.resume=auto resumes "
                "from it.", signum=run.stop.signum or signal.SIGTERM)
    return early


def eval_metrics(setup: Setup, pad_id: int, engine: torch.nn.Module) -> dict[str, float]:
    """Everything logged at an eval point, as one dict: eval_loss, eval_perplexity (sft) or the stage's eval_
    metrics, and eval_loss/<source> for several eval sources. Every rank runs it (the sums are across ranks)."""
    eval_loss, metrics = evaluate(setup, pad_id, engine)
    stage_metrics = {"eval_perplexity": math.exp(min(eval_loss, 50))} if objective_for(setup.config).stage == "sft" \
        else {f"eval_{k}": v for k, v in metrics.items()}
    return {"eval_loss": eval_loss, **stage_metrics, **_eval_per_source(setup, pad_id, engine)}


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
