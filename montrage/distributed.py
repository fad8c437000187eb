"""Process-group awareness in one place: who is rank 0, how work is split, how results meet.

Works with or without an ``accelerate.Accelerator``; without one (or with one process) every
collective is the identity, so single-process code paths are the same code.
"""
from __future__ import annotations

import os
from typing import Any, List, Optional

from montrage.errors import ConfigError


class ProcessContext:
    def __init__(self, accelerator: Optional[Any] = None) -> None:
        self.accelerator = accelerator
        launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if accelerator is not None and launched > 1 and self.world_size == 1:
            # e.g. torchrun on a machine without CUDA and a plain Accelerator(): accelerate then runs
            # every process on its own, and they would all train alone and fight over one run store.
            raise ConfigError(f"launched as {launched} processes (WORLD_SIZE={launched}) but the Accelerator "
                              "runs a single process; without GPUs create it as Accelerator(cpu=True) so the "
                              "processes join one gloo process group")

    @property
    def world_size(self) -> int:
        return int(self.accelerator.num_processes) if self.accelerator is not None else 1

    @property
    def rank(self) -> int:
        return int(self.accelerator.process_index) if self.accelerator is not None else 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> List[int]:
        """This rank's share of ``range(n)`` (strided, so shares differ by at most one item)."""
        return list(range(self.rank, n, self.world_size))

    def gather(self, obj: Any) -> Optional[List[Any]]:
        """Every rank's ``obj``, in rank order, on rank 0 only (None elsewhere): capture shards go to the
        writer without copying every rank's shards to every rank. A collective: call it on all ranks."""
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        out: Optional[List[Any]] = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank. A collective."""
        if self.world_size == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world_size > 1:
            self.accelerator.wait_for_everyone()

    def unwrap(self, model: Any) -> Any:
        return self.accelerator.unwrap_model(model) if self.accelerator is not None else model
