"""Blocks of edges computed on demand, under a memory budget.

A graph is layered: a list of `Block`s, each the dense weights from its source nodes into its target
nodes, in topological order from the logits down. Every pass over the graph (influence, pruning)
reads each block row-chunk by row-chunk through `BlockStore.chunks`. The store keeps whole blocks in
memory while they fit in half of the budget (then every pass reuses them: one computation per block,
the fast path for prompts of ordinary length); a block that does not fit is recomputed, one chunk of
target rows at a time, at each pass, so a graph of any size runs in bounded memory. A block's rows
depend only on their own targets, so the edges are the same however the rows are chunked.

`memory_budget(device, max_memory)` turns the user's `max_memory` (bytes, or None for a fraction of
the device's free memory) into the number of bytes a build may use.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..config import MEMORY

log = logging.getLogger(__name__)
Rows = Callable[[Tensor], Tensor]  # target row indices [r] -> weights [r, src]
_BYTES_PER_CELL = 4 * 4  # a float32 weight plus the temporaries a pass makes of it (|w|, masks, scores)


@dataclass(eq=False)
class Block:
    """Weights from `sources` into `targets` (global node indices); rows are targets. `rows` computes
    any subset of rows; `weight` is the whole block (computed once, then held)."""

    targets: Tensor  # [tgt] long
    sources: Tensor  # [src] long
    rows: Rows
    _weight: Tensor | None = field(default=None, repr=False)

    @staticmethod
    def dense(targets: Tensor, sources: Tensor, weight: Tensor) -> Block:
        return Block(targets, sources, lambda r: weight[r], weight)

    @property
    def nbytes(self) -> int:
        return len(self.targets) * len(self.sources) * 4

    @property
    def weight(self) -> Tensor:
        if self._weight is None:
            self._weight = self.rows(torch.arange(len(self.targets), device=self.targets.device))
        return self._weight


class BlockStore:
    """The layered blocks of one graph, read in row chunks under `budget` bytes."""

    def __init__(self, blocks: list[Block], budget: int):
        self.blocks = blocks
        self.budget = budget
        held, self.held = 0, []
        for b in blocks:  # top blocks first: they are read first and by every pass
            keep = b._weight is not None or held + b.nbytes <= budget // 2
            held += b.nbytes if keep else 0
            self.held.append(keep)
        self.recomputed = 0  # rows computed again by a pass (0 when everything fits)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, b: int) -> Block:
        return self.blocks[b]

    def chunk_rows(self, b: int) -> int:
        n_src = max(1, len(self.blocks[b].sources))
        return max(1, (self.budget // 2) // (n_src * _BYTES_PER_CELL))

    def chunks(self, b: int) -> Iterator[tuple[Tensor, Tensor]]:
        """(row indices, weights [rows, src]) covering block b's targets, top to bottom."""
        block = self.blocks[b]
        n = len(block.targets)
        dev = block.targets.device
        step = self.chunk_rows(b)
        for t0 in range(0, n, step):
            rows = torch.arange(t0, min(n, t0 + step), device=dev)
            if self.held[b]:
                yield rows, block.weight[t0 : t0 + len(rows)]
            else:
                self.recomputed += len(rows)
                yield rows, block.rows(rows)


def free_bytes(device: torch.device) -> int:
    """Memory free for new tensors on `device`: CUDA's own count, or MemAvailable on the host."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30  # no /proc (not Linux): assume 8 GB


def memory_budget(device: torch.device, max_memory: int | None) -> int:
    """The bytes a build may use: `max_memory` (checked by `GraphOptions`, through `config.parse_bytes`), or
    `MEMORY.budget_fraction` of what is free now."""
    if max_memory is None:
        return int(MEMORY.budget_fraction * free_bytes(device))
    return max_memory
