"""THE training loop, the same for every method: methods differ only in what trains and what is saved."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from rich.console import Console

from sftlab.config import Config, to_yaml
from sftlab.data import packing
from sftlab.data.batching import Batch, collate, collate_packed
from sftlab.data.dataset import EncodedDataset
from sftlab.errors import SftlabError
from sftlab.methods import Method
from sftlab.models.attention import packed_attention
from sftlab.train import checkpoint
from sftlab.train.checkpoint import TrainState
from sftlab.train.loss import loss_sum
from sftlab.train.metrics import MetricsLog, StepTimer, plot_loss
from sftlab.train.optim import build_optimizer, build_scheduler


class TrainingError(SftlabError):
    """Training cannot go on (e.g. the loss became NaN); the last good checkpoint is kept."""


@dataclass
class RunResult:
    output_dir: Path
    steps: int
    final_loss: float | None
    eval_loss: float | None
    export_dir: Path | None


@dataclass
class Setup:
    """Everything the loop needs, prepared by `sftlab.train.setup.prepare` (or a test)."""
    config: Config
    model: torch.nn.Module
    tokenizer: object
    method: Method
    train_data: EncodedDataset
    train_indices: np.ndarray
    eval_data: EncodedDataset | None
    eval_indices: np.ndarray | None
    device: torch.device


def epoch_plan(setup: Setup, epoch: int) -> list[np.ndarray]:
    """The example indices of each micro-batch of `epoch`, in order: a pure function of (data, seed, epoch)."""
    cfg = setup.config
    lengths = setup.train_data.lengths
    if cfg.data.packing:
        return packing.packed_plan(lengths, setup.train_indices, capacity=cfg.data.max_seq_len,
                                   rows_per_batch=cfg.train.micro_batch_size, seed=cfg.train.seed, epoch=epoch)
    return packing.grouped_plan(lengths, setup.train_indices, micro_batch_size=cfg.train.micro_batch_size,
                                grad_accum_steps=cfg.train.grad_accum_steps, seed=cfg.train.seed, epoch=epoch)


def total_steps(setup: Setup) -> int:
    cfg = setup.config
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    # An epoch ends with a short micro-batch rather than borrowing from the next epoch.
    per_epoch = packing.plan_length(setup.train_data.lengths, setup.train_indices, packing=cfg.data.packing,
                                    capacity=cfg.data.max_seq_len, micro_batch_size=cfg.train.micro_batch_size)
    return max(1, math.ceil(cfg.train.epochs * per_epoch / cfg.train.grad_accum_steps))


def make_batch(setup: Setup, data: EncodedDataset, chosen: np.ndarray, pad_id: int) -> Batch:
    examples = [data[int(i)] for i in chosen]
    return collate_packed(examples) if setup.config.data.packing else collate(examples, pad_id=pad_id)


def micro_batches(setup: Setup, state: TrainState, pad_id: int) -> Iterator[Batch]:
    """An endless stream of micro-batches; advances state.epoch / state.position (micro-batches done)."""
    while True:
        plan = epoch_plan(setup, state.epoch)
        while state.position < len(plan):
            chosen = plan[state.position]
            state.position += 1
            yield make_batch(setup, setup.train_data, chosen, pad_id)
        state.epoch, state.position = state.epoch + 1, 0


def evaluate(setup: Setup, pad_id: int) -> float:
    """Mean loss over every supervised token of the eval examples (batched as training batches them)."""
    cfg, model = setup.config, setup.model
    lengths, indices = setup.eval_data.lengths, setup.eval_indices
    if cfg.data.packing:
        plan = packing.packed_plan(lengths, indices, capacity=cfg.data.max_seq_len,
                                   rows_per_batch=cfg.train.micro_batch_size, seed=None, epoch=0)
    else:
        ordered = indices[np.argsort(-lengths[indices], kind="stable")]  # similar lengths pad little
        plan = [ordered[i:i + cfg.train.micro_batch_size] for i in range(0, len(ordered), cfg.train.micro_batch_size)]
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for chosen in plan:
            batch = make_batch(setup, setup.eval_data, chosen, pad_id)
            total += float(loss_sum(model, batch.to(setup.device), setup.method))
            count += batch.num_supervised
    model.train()
    return total / max(count, 1)


def train(setup: Setup, *, console: Console | None = None,
          on_step: Callable[[int], None] | None = None) -> RunResult:
    cfg, model, method = setup.config, setup.model, setup.method
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg), encoding="utf-8")
    console = console or Console(stderr=True)
    pad_id = _pad_id(setup.tokenizer)
    params = method.trainable_parameters(model)
    optimizer = build_optimizer(params, cfg.train)
    steps = total_steps(setup)
    scheduler = build_scheduler(optimizer, cfg.train, steps)
    state = TrainState()
    latest = checkpoint.latest_checkpoint(out) if cfg.train.resume == "auto" else None
    if latest is not None:
        state, weights = checkpoint.load_checkpoint(latest, optimizer=optimizer, scheduler=scheduler)
        method.load_state_dict(model, weights)
        console.print(f"resuming from {latest} (step {state.step} of {steps})")
    if cfg.train.gradient_checkpointing:
        _enable_recompute(model)
    if cfg.train.compile:
        model.base_model.compile()
    model.train()
    stream = micro_batches(setup, state, pad_id)
    log = MetricsLog(out, total_steps=steps, start_step=state.step, console=console,
                     tensorboard=cfg.train.tensorboard)
    timer = StepTimer(enabled=cfg.train.profile, device=setup.device)
    last_loss = eval_loss = None
    attention = packed_attention(model) if cfg.data.packing else contextlib.nullcontext()
    with attention:
        try:
            while state.step < steps:
                started = time.perf_counter()
                timer.start()
                batches = [next(stream) for _ in range(cfg.train.grad_accum_steps)]
                supervised = sum(b.num_supervised for b in batches)  # counted on the host, before the move
                tokens = sum(b.num_tokens for b in batches)
                timer.mark("data")
                step_loss = torch.zeros((), device=setup.device)
                for batch in batches:
                    # Each micro-batch's summed loss over the step's supervised-token count: the gradients
                    # add up to those of the mean over every supervised token of the step.
                    step_loss += _forward_backward(model, batch.to(setup.device), method, supervised, timer)
                grad_norm = _clip(params, cfg.train.max_grad_norm)
                # The one host sync of the step, for the log and the NaN check.
                last_loss, norm = torch.stack([step_loss, grad_norm.to(step_loss)]).tolist()
                if not math.isfinite(last_loss):
                    sources = ", ".join(w for b in batches for w in b.where[:4])
                    raise TrainingError(f"the loss became {last_loss} at step {state.step + 1} (rows {sources}); "
                                        f"nothing was updated. The last good checkpoint is "
                                        f"{checkpoint.latest_checkpoint(out)}. Lower train.lr or check those rows.")
                lr = scheduler.get_last_lr()[0]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                timer.mark("optimizer")
                state.step += 1
                if state.step % cfg.train.log_every_steps == 0 or state.step == steps:
                    log.log({"step": state.step, "epoch": state.epoch, "loss": last_loss, "lr": lr,
                             "grad_norm": norm, "tokens": tokens, "supervised_tokens": supervised,
                             "seconds": time.perf_counter() - started, **timer.seconds()})
                stop = False
                if setup.eval_indices is not None and len(setup.eval_indices) and (
                        state.step == steps or (cfg.train.eval_every_steps and state.step % cfg.train.eval_every_steps == 0)):
                    eval_loss = evaluate(setup, pad_id)
                    log.log({"step": state.step, "eval_loss": eval_loss, "eval_perplexity": math.exp(min(eval_loss, 50))})
                    stop = _early_stop(state, eval_loss, cfg.train.early_stopping_patience)
                if state.step == steps or stop or (cfg.train.save_every_steps and state.step % cfg.train.save_every_steps == 0):
                    checkpoint.save_checkpoint(out, state, trainable=method.state_dict(model), optimizer=optimizer,
                                               scheduler=scheduler, keep=cfg.train.keep_checkpoints)
                if on_step is not None:
                    on_step(state.step)
                if stop:
                    console.print(f"early stopping: no better eval loss in {cfg.train.early_stopping_patience} evaluations")
                    break
        finally:
            log.close()
    plot_loss(out / "metrics.jsonl", out / "loss.png")
    export_dir = _export(setup, out)
    return RunResult(out, state.step, last_loss, eval_loss, export_dir)


def _forward_backward(model: torch.nn.Module, batch: Batch, method: Method, supervised: int,
                      timer: StepTimer) -> torch.Tensor:
    """Forward and backward of one micro-batch; returns its detached share of the step loss. The graph
    dies with this frame: a loss kept across steps holds its graph, which fragments the CPU heap (peak
    RSS grew ~30% over a few steps when the loop kept it)."""
    loss = loss_sum(model, batch, method) / max(supervised, 1)
    timer.mark("forward")
    loss.backward()
    timer.mark("backward")
    return loss.detach()


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
    from sftlab import export

    return export.save_trained(setup.model, setup.method, setup.config, setup.tokenizer, out)
