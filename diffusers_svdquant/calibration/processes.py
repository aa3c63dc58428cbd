"""The process group calibration runs in, and its progress bars (shown on rank 0 only)."""

from __future__ import annotations

import os
from typing import Any

import torch


class Processes:
    """The process group calibration runs in: accelerate's state when launched with several
    processes, otherwise a lone process (no process group is created)."""

    def __init__(self) -> None:
        self.state = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import PartialState

            # Without a GPU, a plain PartialState() treats each launched process as a lone one;
            # cpu=True makes them join one gloo group.
            self.state = PartialState(cpu=not torch.cuda.is_available())
        self.rank = self.state.process_index if self.state else 0
        self.world = self.state.num_processes if self.state else 1

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (on every rank)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def gather_root(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` in rank order on rank 0, None on the others: what rank 0 alone merges and writes,
        without every rank holding every rank's share (as :meth:`gather` does)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] | None = [None] * self.world if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0)
        return out

    def my_share(self, n: int) -> list[int]:
        """Contiguous block of ``range(n)`` for this rank (accelerate's split)."""
        if self.world == 1:
            return list(range(n))
        with self.state.split_between_processes(list(range(n))) as part:
            return list(part)

    def close(self) -> None:
        """Leave the process group once the collective work is done, on every rank: a barrier (all ranks are
        past their last collective), then ``destroy_process_group``. A rank that exits with the group still up
        while another still runs can abort in gloo's teardown ("terminate called without an active exception",
        exit code -6). The rank and world stay as they were; no collective may follow."""
        if self.world == 1:
            return
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
