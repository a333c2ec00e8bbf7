"""Several processes, one run: `torchrun --nproc-per-node N -m sftlab train CONFIG`, on PyTorch's own engine.

torchrun starts N processes and tells each its RANK / WORLD_SIZE / LOCAL_RANK; `Dist.from_env` joins them
(NCCL on GPUs, gloo on CPU). The loop (train/loop.py) stays the one loop:

- the model runs through `TrainingForward` (the loss as a module) wrapped in DDP, or with FSDP2's
  `fully_shard` on each decoder layer and on the whole (`train.distributed`: auto picks DDP when the model
  and its training state fit one device, FSDP2 otherwise);
- every rank builds the same epoch plan (packing happens first, so ranks get balanced tokens) and takes
  every world-th micro-batch of it: within an epoch no example is seen twice or skipped; a rank left
  without a micro-batch at an epoch's end runs an empty one, so the collectives still meet;
- a step's loss is the mean over the supervised tokens of the whole global batch: the token count is
  summed over ranks before backward, and each rank's loss is scaled by the world size because DDP and
  FSDP average gradients;
- rank 0 alone writes logs, metrics, checkpoints and exports; under FSDP the checkpoint is written by all
  ranks with torch.distributed.checkpoint, and the export is consolidated (parameters gathered) first.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from sftlab.errors import ConfigError

NF4_SHARDED_PARTS = ("quantized_scalers", "quantization_factor", "quantized_data")
"""The inner tensors of torchao's NF4Tensor that FSDP2 splits evenly across ranks."""


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    mode: str = "single"
    """single | ddp | fsdp"""

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def sharded(self) -> bool:
        return self.mode == "fsdp"

    @classmethod
    def from_env(cls) -> Dist:
        """This process's place in a torchrun launch (joining the process group), or a single process."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return cls(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0")))

    def device(self) -> torch.device:
        if torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def close(self) -> None:
        """Leave the process group (at the end of a torchrun launch)."""
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of `values` over all ranks (float64 on the communication device)."""
        if not self.enabled:
            return list(values)
        device = torch.device("cuda", self.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return tensor.tolist()


SINGLE = Dist()


def choose_mode(setting: str, method: str, model: nn.Module, device: torch.device, world: int) -> str:
    """auto: DDP when parameters + the trainable ones' gradients and AdamW state fit in 60% of one
    device's memory (always on CPU), else FSDP2."""
    if world <= 1:
        return "single"
    mode = setting
    if setting == "auto":
        mode = "ddp"
        if device.type == "cuda":
            need = sum(p.numel() * p.element_size() + (12 * p.numel() if p.requires_grad else 0)
                       for p in model.parameters())
            mode = "ddp" if need < 0.6 * torch.cuda.get_device_properties(device).total_memory else "fsdp"
    if mode == "fsdp":
        _check_nf4_shards(model, world)
    return mode


def _check_nf4_shards(model: nn.Module, world: int) -> None:
    """QLoRA under FSDP2: torchao shards each NF4 weight by splitting its quantized data, block scales and
    scale factors evenly across ranks, so each must divide by the number of processes."""
    for name, param in model.named_parameters():
        for part in NF4_SHARDED_PARTS:
            inner = getattr(param, part, None)
            if isinstance(inner, torch.Tensor) and inner.numel() % world:
                raise ConfigError(f"{name} cannot be sharded over {world} processes: its NF4 {part} has "
                                  f"{inner.numel()} elements, not a multiple of {world} (a layer this small "
                                  "gains nothing from sharding). Set train.distributed=ddp, or use a number of "
                                  "processes that divides it.")


class TrainingForward(nn.Module):
    """The summed loss of a batch as one module call, so DDP's and FSDP's forward/backward hooks see the whole
    computation (decoder, method and the supervised-positions head)."""

    def __init__(self, model: nn.Module, method: Any) -> None:
        super().__init__()
        self.model = model
        self.method = method

    def forward(self, batch: Any) -> torch.Tensor:
        from sftlab.train.loss import loss_sum

        return loss_sum(self.model, batch, self.method)


def wrap(model: nn.Module, method: Any, ctx: Dist, *, forward: nn.Module | None = None) -> nn.Module:
    """The module the loop calls with a batch: plain, DDP-wrapped, or FSDP2-sharded (model changed in place).
    `forward` holds `model` and computes a batch's loss (the training objective's engine); by default the
    supervised loss, TrainingForward."""
    forward = forward if forward is not None else TrainingForward(model, method)
    if ctx.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [ctx.local_rank] if torch.cuda.is_available() else None
        # Every rank built the same model (same weights, same seed before the method's initialisation), so
        # DDP's initial broadcast is not needed, and it would mangle QLoRA's NF4 tensor subclass.
        return DistributedDataParallel(forward, device_ids=device_ids, init_sync=False)
    if ctx.mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from sftlab.methods.bottleneck import decoder_layers

        mesh = init_device_mesh("cuda" if torch.cuda.is_available() else "cpu", (ctx.world,))
        for layer in decoder_layers(model)[1]:
            fully_shard(layer, mesh=mesh)
        fully_shard(forward, mesh=mesh)
        reference = getattr(forward, "reference", None)
        if reference is not None:  # stage dpo, full fine-tuning: the frozen copy is sharded the same way
            for layer in decoder_layers(reference.model)[1]:
                fully_shard(layer, mesh=mesh)
            fully_shard(reference, mesh=mesh)
    return forward


@contextmanager
def gradient_sync(engine: nn.Module, ctx: Dist, *, last: bool) -> Iterator[None]:
    """Gradients are reduced across ranks only on the step's last micro-batch."""
    if ctx.mode == "ddp" and not last:
        with engine.no_sync():
            yield
        return
    if ctx.mode == "fsdp":
        engine.set_requires_gradient_sync(last)
    yield


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (collective: every rank calls it); other tensors as they are.

    A shard that is a tensor subclass with FSDP's all-gather extension (torchao's NF4 weights:
    `fsdp_pre_all_gather` names its inner tensors, `fsdp_post_all_gather` rebuilds the whole) is gathered
    through that extension, as FSDP gathers it for every forward, with one blocking all-gather per inner
    tensor into a buffer of the right size. DTensor's own route hands the subclass to torchao's
    asynchronous functional collectives, which corrupted the heap of a CPU (gloo) process now and then
    (`malloc(): unaligned tcache chunk detected` while consolidating a QLoRA run)."""
    if not hasattr(tensor, "full_tensor"):
        return tensor
    whole = _gather_by_extension(tensor)
    return whole if whole is not None else tensor.full_tensor()


def _gather_by_extension(tensor: Any) -> torch.Tensor | None:
    from torch.distributed.tensor import Shard

    local = tensor.to_local()
    if not hasattr(local, "fsdp_pre_all_gather") or tensor.device_mesh.ndim != 1:
        return None
    group = tensor.device_mesh.get_group()
    size = dist.get_world_size(group)
    if tuple(tensor.placements) != (Shard(0),) or local.shape[0] * size != tensor.shape[0]:
        return None  # replicated, or sharded unevenly (padded): DTensor's own route
    try:
        inner, meta = local.fsdp_pre_all_gather(tensor.device_mesh)
    except TypeError:  # a newer extension signature (module, mixed precision): not this one
        return None
    gathered = []
    for part in inner:
        part = part.contiguous()
        out = part.new_empty((part.shape[0] * size, *part.shape[1:]))
        dist.all_gather_into_tensor(out, part, group=group)
        gathered.append(out)
    result = local.fsdp_post_all_gather(tuple(gathered), meta, local.dtype)
    return result[0] if isinstance(result, tuple) else result


def reshard(engine: nn.Module, ctx: Dist) -> None:
    """Under FSDP: put every parameter back in its shards. A forward without backward (evaluation) leaves
    the root's parameters gathered, and the optimizer and checkpoints know the sharded ones."""
    if ctx.sharded:
        for module in engine.modules():
            if hasattr(module, "reshard") and hasattr(module, "unshard"):
                module.reshard()


def consolidate(model: nn.Module, ctx: Dist) -> None:
    """Under FSDP: gather every parameter and buffer whole (all ranks take part, one tensor at a time) and
    register the whole tensors on rank 0's model, which then exports as a single-process run does. A
    no-op otherwise. Training is over: rank 0 holds the whole model from here on."""
    if not ctx.sharded:
        return
    whole = {name: full_tensor(value).detach() for name, value in model.state_dict().items()}
    if not ctx.main:
        return
    for name, value in whole.items():
        owner_name, _, attribute = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        if attribute in owner._parameters:
            old = owner._parameters[attribute]
            owner._parameters[attribute] = nn.Parameter(value.clone(), requires_grad=old.requires_grad)
        elif attribute in owner._buffers:
            owner._buffers[attribute] = value.clone()
    if getattr(model.config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
