"""DDP for the trainer: joining torchrun's process group, and leaving it together.

Under torchrun every rank runs the whole trainer; rank 0 alone does some work (reading
and tokenizing text, writing checkpoints), and these helpers keep the others from
failing at their next collective when it fails.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_world_size() -> int:
    """How many ranks torchrun started (1 when no torchrun did), from the environment:
    known before the process group exists, and after it is gone."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group torchrun describes in the environment (a no-op without it)."""
    world_size = launched_world_size()
    if world_size == 1:
        return DistInfo()
    # The trainer's own agreements (stop flags, data generator states, first-batch
    # fingerprints) are small CPU tensors, which nccl does not carry: on CUDA they go
    # over gloo, the model's gradients over nccl.
    dist.init_process_group(backend="cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), world_size, int(os.environ.get("LOCAL_RANK", "0")))


class RankStopped(Exception):
    """Another rank stopped the run on an error of its own, which it reports."""


def leave_together(dist_info: DistInfo, group: dist.ProcessGroup | None = None) -> None:
    """Wait for every rank before they leave `group`, so that none destroys its end of
    the group while another still works in it (rank 0 writing the last checkpoint).
    What gloo's threads still hold after that is left behind by `exit_process`."""
    if dist_info.enabled:
        dist.barrier(group=group)


def share_rank0_error(
    error: Exception | None,
    dist_info: DistInfo,
    elsewhere: Exception,
    group: dist.ProcessGroup | None = None,
) -> None:
    """After work rank 0 did alone: raise its `error` there and `elsewhere` on every
    other rank, so that all stop together with a message instead of the others failing
    at their next collective (collective under DDP, on `group`: every rank calls it)."""
    if dist_info.enabled:
        failed = torch.tensor([float(error is not None)])
        dist.broadcast(failed, src=0, group=group)
        if bool(failed):
            leave_together(dist_info, group)
            if error is None:
                raise elsewhere
    if error is not None:
        raise error
