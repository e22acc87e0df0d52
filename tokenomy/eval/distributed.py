"""Data-parallel evaluation over processes launched by torchrun: shard by sample index, gather to rank 0.

Only Python objects travel between ranks (sample records, the run timestamp), so a gloo group is used even
when each rank drives its own GPU.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


class Group:
    def __init__(self):
        world = int(os.environ.get("WORLD_SIZE", "1"))
        self.owns_group = False
        if world > 1 and not dist.is_initialized():
            dist.init_process_group(backend="gloo")
            self.owns_group = True
        self.active = dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.active else 0
        self.world = dist.get_world_size() if self.active else 1
        self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def default_device(self) -> str:
        if torch.cuda.is_available():
            return f"cuda:{self.local_rank % torch.cuda.device_count()}"
        return "cpu"

    def shard(self, indices: list[int]) -> list[int]:
        return [i for i in indices if i % self.world == self.rank]

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def gather(self, obj) -> list | None:
        """Every rank's `obj` as a list on rank 0 (None elsewhere)."""
        if not self.active:
            return [obj]
        out = [None] * self.world if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.owns_group:
            dist.destroy_process_group()
