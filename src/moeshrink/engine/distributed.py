"""Data-parallel calibration with torch.distributed (``torchrun --nproc_per_node N -m moeshrink prune ...``).

Each rank calibrates on a contiguous slice of the calibration set and keeps its own slice's hidden
states. At every layer boundary the statistics are combined before the method plans the layer:
sums are all-reduced, token samples are gathered in rank order (so the sample equals the one a
single process takes from the same data), and every rank then makes the same plan and applies it
to its own copy of the model. Rank 0 alone writes the output. gloo works on CPU; nccl on GPUs.
"""

from __future__ import annotations

import os
from dataclasses import fields

import torch
import torch.distributed as dist

from moeshrink.engine.observers import LayerStats

# LayerStats fields that are sums over tokens (all-reduced) and token samples (gathered).
_SUMS = (
    "counts",
    "soft_mass",
    "coactivation",
    "norm_sum",
    "gated_norm_sum",
    "output_sum",
    "input_sq",
    "intermediate_sq",
)
_SAMPLES = ("logits", "inputs")


def launched_distributed() -> bool:
    """Whether this process was started by torchrun (or another launcher) with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: str) -> torch.device:
    """Join the process group torchrun describes; returns this rank's device (``cuda:LOCAL_RANK`` on GPUs)."""
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return torch.device(device)


def is_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_active() else 0


def world_size() -> int:
    return dist.get_world_size() if is_active() else 1


def shard(input_ids: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous slice of the calibration sequences."""
    if not is_active():
        return input_ids
    world, r = dist.get_world_size(), dist.get_rank()
    if input_ids.shape[0] < world:
        raise ValueError(f"{input_ids.shape[0]} calibration sequences cannot be split over {world} processes")
    bounds = [round(i * input_ids.shape[0] / world) for i in range(world + 1)]
    return input_ids[bounds[r] : bounds[r + 1]]


def _gather_rows(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """Concatenate every rank's rows in rank order (ranks may hold different numbers of rows)."""
    have = torch.tensor([0 if tensor is None else tensor.shape[0]], device=device)
    counts = [torch.zeros_like(have) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, have)
    counts = [int(c) for c in counts]
    if sum(counts) == 0:
        return None
    width = tensor.shape[1:] if tensor is not None else None
    widths = [None] * dist.get_world_size()
    dist.all_gather_object(widths, None if tensor is None else (tuple(width), str(tensor.dtype)))
    shape, dtype = next(w for w in widths if w is not None)
    dtype = getattr(torch, dtype.removeprefix("torch."))
    padded = torch.zeros(max(counts), *shape, dtype=dtype, device=device)
    if tensor is not None and tensor.shape[0]:
        padded[: tensor.shape[0]] = tensor.to(device)
    parts = [torch.zeros_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)]).cpu()


def _collective_device() -> torch.device:
    """Where tensors must be for a collective: this rank's GPU with nccl, the CPU with gloo."""
    return (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )


def reduce_stats(stats: LayerStats, max_sample_tokens: int) -> None:
    """Combine every rank's statistics of one layer in place (a no-op in a single process)."""
    if not is_active():
        return
    device = _collective_device()
    total = torch.tensor([stats.num_tokens], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    stats.num_tokens = int(total.item())
    names = {f.name for f in fields(stats)}
    for name in _SUMS:
        value = getattr(stats, name)
        present = torch.tensor([value is not None], dtype=torch.int32, device=device)
        dist.all_reduce(present, op=dist.ReduceOp.MAX)
        if not present.item():
            continue
        assert value is not None and name in names, f"rank {rank()} lacks statistic {name}"
        reduced = value.to(device).clone()
        dist.all_reduce(reduced)
        setattr(stats, name, reduced.to(value.device))
    for name in _SAMPLES:
        gathered = _gather_rows(getattr(stats, name), device)
        setattr(stats, name, None if gathered is None else gathered[:max_sample_tokens])


def reduce_sums(sums: dict[str, torch.Tensor]) -> None:
    """All-reduce named sums in place (every rank holds the same names); a no-op in a single process."""
    if not is_active():
        return
    device = _collective_device()
    for name in sorted(sums):
        reduced = sums[name].to(device).clone()
        dist.all_reduce(reduced)
        sums[name] = reduced.to(sums[name].device)


def barrier() -> None:
    if is_active():
        dist.barrier()
