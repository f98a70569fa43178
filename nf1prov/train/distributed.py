"""Data-parallel training: the pieces that make N ranks compute what one process would.

`nf1prov train --nproc N` (config ``train.nproc``) trains in N processes ("ranks") started by
torch.distributed's elastic launcher (`nf1prov.provenance.ranks`); `torchrun` starts them the
same way across machines. Each rank holds a replica of the model (DistributedDataParallel
averages the gradients) and a shard of every batch. ``train.batch_size`` is the *global* batch:
each rank gets ``batch_size / N`` samples of it, so a config means the same training at any
world size, and the metrics rank 0 logs equal (within float rounding) those of one process:

- `GlobalBatchShards`: the single process's shuffled order (the same `RandomSampler` draws from
  the same seeded generator), each global batch cut into N contiguous shards. Not
  `DistributedSampler`: it pads the split with repeated samples and interleaves them, which
  changes both the batches and the validation metrics.
- `GlobalBatchNorm2d`: batch statistics over the global batch (torch's `SyncBatchNorm` refuses
  CPU tensors), reduced with a differentiable all-reduce on a process group of its own.
- The loss (`WeightedBCELoss`) reduces class pixel counts and BCE sums across ranks, and each
  rank's gradient loss is scaled so that DDP's average is the gradient of the global loss.
- `EpochMetrics.sum_across` reduces the epoch's counts before the scores are computed.

`current()` is the process's `Ranks`: `SINGLE` unless `init_from_environment` ran.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import BatchSampler, RandomSampler, Sampler, SequentialSampler

WORLD_SIZE_TAG = "nf1prov.distributed.world_size"
BACKEND_TAG = "nf1prov.distributed.backend"
DEVICES_TAG = "nf1prov.distributed.devices"


@dataclass(frozen=True)
class Ranks:
    """Where this process stands: its global rank, the world size, its rank on this machine and
    the backend (None when not distributed). ``stats_group``: the process group for batch-norm
    statistics, apart from the one DDP reduces gradients on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    stats_group: Any = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def logs(self) -> bool:
        """Only rank 0 talks to MLflow and git."""
        return self.rank == 0

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce ``tensor`` in place (sum over ranks); returns it. No-op on one process."""
        if self.distributed:
            torch.distributed.all_reduce(tensor)
        return tensor

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()


SINGLE = Ranks()
_current = SINGLE


def current() -> Ranks:
    return _current


def environment_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment variables; (0, 1, 0) when
    the process was not started by a launcher."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def init_from_environment(device_type: str) -> Ranks:
    """Join the process group the launcher's environment describes (gloo on CPU, NCCL on CUDA,
    one GPU per local rank) and make it `current()`."""
    global _current
    rank, world_size, local_rank = environment_world()
    if world_size <= 1:
        _current = SINGLE
        return _current
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend)
    # gloo for the statistics in both cases: NCCL would serialise them behind the gradients
    stats = torch.distributed.new_group(backend=backend)
    _current = Ranks(rank, world_size, local_rank, backend, stats)
    return _current


def shutdown() -> None:
    global _current
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _current = SINGLE


def device_for(device: torch.device, ranks: Ranks) -> torch.device:
    """One GPU per local rank; CPU ranks share the CPU."""
    if device.type == "cuda" and ranks.distributed:
        return torch.device("cuda", ranks.local_rank)
    return device


def describe_devices(device: torch.device, ranks: Ranks) -> str:
    """E.g. ``cpu x 2`` or ``cuda x 4 (NVIDIA H100 80GB HBM3)``, for the run's tags."""
    name = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    return f"{device.type} x {ranks.world_size}{name}"


def run_tags(device: torch.device, ranks: Ranks) -> dict[str, str]:
    """What the run records about its ranks (DESIGN 3.3)."""
    return {WORLD_SIZE_TAG: str(ranks.world_size), BACKEND_TAG: ranks.backend or "none",
            DEVICES_TAG: describe_devices(device, ranks)}


def check_same_data(manifest, source: str, ranks: Ranks) -> None:
    """Every rank must cut its shards from the same files (on several machines each reads its
    own copy): compare the split manifest's ids, splits and content hashes with rank 0's."""
    if not ranks.distributed:
        return
    import hashlib

    from nf1prov.errors import UserError

    columns = ["fov_id", "split", "image_sha256", "mask_sha256"]
    ours = hashlib.sha256(manifest[columns].to_csv(index=False).encode()).hexdigest()
    theirs = [ours]
    torch.distributed.broadcast_object_list(theirs, src=0)
    if theirs[0] != ours:
        raise UserError(f"rank {ranks.rank}: the data under {source} differs from rank 0's "
                        "(other fields of view, splits or file contents); every machine needs "
                        "the same copy of the data.")


# --- batches -----------------------------------------------------------------------------------


def shard_bounds(size: int, ranks: Ranks) -> tuple[int, int]:
    """[start, stop) of this rank's contiguous share of ``size`` items (sizes differ by at most
    one; a rank may get none of a short last batch)."""
    base, extra = divmod(size, ranks.world_size)
    start = ranks.rank * base + min(ranks.rank, extra)
    return start, start + base + (1 if ranks.rank < extra else 0)


class GlobalBatchShards(Sampler[list[int]]):
    """A batch sampler: this rank's shard of each global batch of ``batch_size`` indices.

    With ``generator`` the order is the one `DataLoader(shuffle=True, generator=...)` gives a
    single process (the same `RandomSampler`, drawing the same numbers); without, the dataset
    order. Every rank yields one (possibly empty) shard per global batch, so all ranks take the
    same number of steps.
    """

    def __init__(self, dataset, batch_size: int, ranks: Ranks,
                 generator: torch.Generator | None = None) -> None:
        order = (RandomSampler(dataset, generator=generator) if generator is not None
                 else SequentialSampler(dataset))
        # the very sampler a single process's DataLoader builds, so that the generator is drawn
        # from at the same moments (they depend on how far the loader is read)
        self.batches = BatchSampler(order, batch_size, drop_last=False)
        self.ranks = ranks

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            start, stop = shard_bounds(len(batch), self.ranks)
            yield batch[start:stop]


def collate_crops(batch: list, image_shape: tuple[int, ...], target_shape: tuple[int, ...]):
    """`default_collate`, and empty tensors of the crop shapes for an empty shard."""
    from torch.utils.data import default_collate

    if batch:
        return default_collate(batch)
    return (torch.zeros((0, *image_shape)), torch.zeros((0, *target_shape)),
            torch.zeros(0, dtype=torch.int64))


# --- batch norm over the global batch ----------------------------------------------------------


class SumAcrossRanks(torch.autograd.Function):
    """Sum of a tensor over the ranks of ``group``; the gradient of each rank's input is the sum
    of the gradients of every rank's output (each output depends on every input)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        total = tensor.clone()
        torch.distributed.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """`nn.BatchNorm2d` whose training statistics are those of the global batch.

    Each rank takes its shard's per-channel mean and variance in one pass (`torch.var_mean`);
    two all-reduces of per-channel vectors on ``group`` combine them (counts and sums, then the
    squared deviations from the global mean, so nothing cancels), both differentiable, so each
    rank's gradient includes the other ranks' share. Evaluation uses the running statistics,
    which every rank updates alike. The state dict is `nn.BatchNorm2d`'s.
    """

    group: Any = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        dims, shape = (0, 2, 3), (1, -1, 1, 1)
        values = x.float()  # statistics in float32 under AMP too, as batch norm keeps them
        count = values.numel() // values.shape[1]
        if count:
            var, mean = torch.var_mean(values, dim=dims, correction=0)
        else:  # an empty shard adds nothing, but stays in the graph: its backward must take
            # part in the other ranks' all-reduces
            var = mean = values.sum(dims)
        sums = SumAcrossRanks.apply(torch.cat([mean * count, values.new_tensor([count])]),
                                    self.group)
        total = sums[-1]
        global_mean = sums[:-1] / total
        squares = SumAcrossRanks.apply(count * (var + (mean - global_mean) ** 2), self.group)
        global_var = squares / total
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            factor = (self.momentum if self.momentum is not None
                      else 1.0 / float(self.num_batches_tracked))
            unbiased = global_var * total / (total - 1).clamp_min(1)
            self.running_mean.mul_(1 - factor).add_(factor * global_mean)
            self.running_var.mul_(1 - factor).add_(factor * unbiased)
        scale = torch.rsqrt(global_var + self.eps)
        if self.affine:
            scale = scale * self.weight
        shift = -global_mean * scale + (self.bias if self.affine else 0)
        return (values * scale.view(shape) + shift.view(shape)).to(x.dtype)


def global_batch_norm(model: nn.Module, ranks: Ranks) -> nn.Module:
    """Turn every `nn.BatchNorm2d` of ``model`` into a `GlobalBatchNorm2d` in place (same
    parameters and buffers); returns ``model``."""
    for module in model.modules():
        if type(module) is nn.BatchNorm2d:
            module.__class__ = GlobalBatchNorm2d
            module.group = ranks.stats_group
    return model
