"""Data-parallel plumbing for `torchrun`: environment detection, process-group set-up, rank-0 helpers.

Without torchrun's variables everything degrades to a single process and the collectives are no-ops.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect() -> DistInfo:
    """Read the variables torchrun sets (RANK, LOCAL_RANK, WORLD_SIZE)."""
    env = os.environ
    return DistInfo(rank=int(env.get("RANK", 0)), local_rank=int(env.get("LOCAL_RANK", 0)),
                    world_size=int(env.get("WORLD_SIZE", 1)))


def init(device_type: str, timeout_s: float = 600) -> DistInfo:
    """Join the process group (nccl on CUDA, gloo on CPU) when launched by torchrun."""
    info = detect()
    if not info.enabled or dist.is_initialized():
        return info
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
    return info


def device_for(info: DistInfo, device_type: str) -> torch.device:
    return torch.device("cuda", info.local_rank) if device_type == "cuda" else torch.device("cpu")


def any_flags(flags: list[bool], device: torch.device) -> list[bool]:
    """Per-flag logical OR over all ranks (one tiny all-reduce), so every rank takes the same branch."""
    if not (dist.is_available() and dist.is_initialized()):
        return flags
    tensor = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [bool(v) for v in tensor.tolist()]


def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """Rank 0's decision, on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    tensor = torch.tensor([float(flag)], device=device)
    dist.broadcast(tensor, src=0)
    return bool(tensor.item())


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def gather_shards(rows: torch.Tensor, total: int, world_size: int) -> tuple[torch.Tensor, list[int]]:
    """Per-sample rows (first dimension) of every rank's shard, back in the order of the whole.

    Rank r read positions r, r + W, r + 2W ... of the padded order (DistributedSampler's rule, which FFCV,
    DALI and the torch loader all follow here); positions >= `total` are the padding repeats and are dropped.
    Returns (rows of all `total` positions, valid samples per rank); one process: the rows as given.
    """
    if world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return rows[:total], [min(len(rows), total)]
    lengths = [torch.zeros(1, dtype=torch.int64, device=rows.device) for _ in range(world_size)]
    dist.all_gather(lengths, torch.tensor([len(rows)], dtype=torch.int64, device=rows.device))
    lengths = [int(length) for length in lengths]
    longest = max(lengths)
    padded = torch.zeros((longest, *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
    padded[:len(rows)] = rows
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded)   # all_gather, not all_gather_into_tensor: gloo has only the former
    whole = torch.empty((total, *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
    filled = torch.zeros(total, dtype=torch.int64)
    counts = []
    for rank, (part, length) in enumerate(zip(parts, lengths)):
        positions = torch.arange(rank, rank + length * world_size, world_size)
        keep = positions < total
        whole[positions[keep].to(rows.device)] = part[:length][keep.to(rows.device)]
        filled[positions[keep]] += 1
        counts.append(int(keep.sum()))
    if not bool((filled == 1).all()):
        raise RuntimeError(f"The ranks' shards do not cover the {total} samples once each (shard lengths "
                           f"{lengths}): the loader did not shard as DistributedSampler does.")
    return whole, counts


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank: each rank updated its own copy in its
    last forward pass, and rank 0's are the ones its checkpoint holds."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    for buffer in module.buffers():
        dist.broadcast(buffer.data, src=0)
