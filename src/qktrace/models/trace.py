"""`Trace`: what one forward pass computed that qktrace needs, in memory that grows linearly with the prompt.

Kept (all O(pos)): the residual stream at every checkpoint, every norm's frozen scale, per-head q and
k after QK-norm and rotary, v, the MLP's input and output, the range of keys each query may see, and
the last position's logits. Not kept: anything of shape [head, q_pos, k_pos]. Scores and patterns are
recomputed from q and k when asked -- for one layer, some heads, some query rows -- exactly as HF's
eager attention computes them (same dtype, scale, soft-cap and mask), and whole layers are kept in a
small cache bounded in bytes (`config.MEMORY.pattern_cache_bytes`).

Per-layer tensors are `PerLayer` tuples: `trace.q[layer]` is one tensor on that layer's device (models
dispatched over several devices keep each layer's numbers where the layer runs); `trace.q[layer, head]`
indexes into it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

from .anatomy import Anatomy


class PerLayer(tuple):
    """One tensor per layer (or checkpoint), each on its layer's device. `x[l]` is layer l's tensor;
    `x[l, ...]` indexes into it."""

    def __getitem__(self, idx: Any) -> Any:
        if isinstance(idx, tuple):
            return tuple.__getitem__(self, idx[0])[idx[1:]]
        return tuple.__getitem__(self, idx)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self)


Rows = int | Sequence[int] | Tensor | None


class PatternCache:
    """Whole-layer patterns (or scores), least recently used first out, at most `max_bytes` held."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[str, int], Tensor] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._items.values())

    def get(self, key: tuple[str, int]) -> Tensor | None:
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
            return hit

    def put(self, key: tuple[str, int], value: Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while self.nbytes > self.max_bytes:
                self._items.popitem(last=False)


@dataclass(frozen=True, eq=False)
class Trace:
    """One prompt's forward pass. Checkpoint c is the residual stream at the input of layer c;
    checkpoint n_layers is the final residual (before the final norm). Scales are the frozen
    1/sqrt(var + eps) of each norm. Float tensors are in the anatomy's compute dtype (float32 for
    float32 and half-precision models)."""

    anatomy: Anatomy = field(repr=False)
    tokens: Tensor  # [pos]
    str_tokens: tuple[str, ...]
    resid: PerLayer  # [checkpoint][pos, d_model]
    mlp_in: PerLayer  # [layer][pos, d_model] what the HF MLP module received
    mlp_out: PerLayer  # [layer][pos, d_model] what it returned (before any post-norm)
    scale_ln_attn: PerLayer  # [layer][pos]
    scale_ln_mlp: PerLayer  # [layer][pos]
    scale_post_attn: PerLayer | None  # [layer][pos]
    scale_post_mlp: PerLayer | None  # [layer][pos]
    scale_final: Tensor  # [pos]
    scale_q_norm: PerLayer | None  # [layer][head, pos]
    scale_k_norm: PerLayer | None  # [layer][kv_head, pos]
    q: PerLayer  # [layer][head, pos, d_head] after QK-norm and rotary, as HF computed it
    k: PerLayer  # [layer][kv_head, pos, d_head]
    v: PerLayer  # [layer][kv_head, pos, d_head]
    key_range: PerLayer  # [layer][2, q_pos]: first and last key each query may attend to (HF's mask)
    last_logits: Tensor  # [vocab] the logits at the last position
    cache: PatternCache = field(repr=False)

    @property
    def n_pos(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_layers(self) -> int:
        return len(self.q)

    @property
    def positions(self) -> Tensor:
        return torch.arange(self.n_pos, device=self.tokens.device)

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor held (cache included): grows linearly with the prompt."""
        total = self.cache.nbytes
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, PerLayer):
                total += value.nbytes
            elif isinstance(value, Tensor):
                total += value.numel() * value.element_size()
        return total

    # -- the mask ----------------------------------------------------------------------------------
    def _rows(self, layer: int, q_pos: Rows) -> Tensor:
        dev = self.q[layer].device
        if q_pos is None:
            return torch.arange(self.n_pos, device=dev)
        if isinstance(q_pos, int):
            q_pos = [q_pos]
        return torch.as_tensor(q_pos, dtype=torch.long, device=dev).reshape(-1)

    def allowed(self, layer: int, q_pos: Rows = None) -> Tensor:
        """[q, k_pos] bool: the keys each query may attend to (causal mask, sliding window)."""
        rows = self._rows(layer, q_pos)
        lo, hi = self.key_range[layer][:, rows]
        k = torch.arange(self.n_pos, device=rows.device)
        return (k[None, :] >= lo[:, None]) & (k[None, :] <= hi[:, None])

    def keys(self, layer: int, q_pos: int) -> list[int]:
        """The key positions query `q_pos` may attend to in `layer`."""
        lo, hi = self.key_range[layer][:, q_pos].tolist()
        return list(range(lo, hi + 1))

    # -- scores and patterns, on demand -------------------------------------------------------------
    def scores(self, layer: int, q_pos: Rows = None, heads: Rows = None) -> Tensor:
        """HF's softmax input [head, q, k_pos] for the query rows and heads asked (default all),
        soft-capped where the family caps, -inf where masked; in the compute dtype (float32)."""
        if q_pos is None and heads is None:
            hit = self.cache.get(("scores", layer))
            if hit is not None:
                return hit
        out = self._scores(layer, q_pos, heads)
        if q_pos is None and heads is None:
            self.cache.put(("scores", layer), out)
        return out

    def pattern(self, layer: int, q_pos: Rows = None, heads: Rows = None) -> Tensor:
        """Attention probabilities [head, q, k_pos], as HF's eager softmax gives them (soft-maxed in
        float32, rounded to the model's dtype); in the compute dtype."""
        if q_pos is None and heads is None:
            hit = self.cache.get(("pattern", layer))
            if hit is not None:
                return hit
        s = self._scores(layer, q_pos, heads, model_dtype=True)
        an = self.anatomy
        out = torch.softmax(s, dim=-1, dtype=torch.float32 if an.softmax_float32 else None)
        out = out.to(an.dtype).to(an.compute_dtype)
        if q_pos is None and heads is None:
            self.cache.put(("pattern", layer), out)
        return out

    def _scores(self, layer: int, q_pos: Rows, heads: Rows, model_dtype: bool = False) -> Tensor:
        ly = self.anatomy.layers[layer]
        rows = self._rows(layer, q_pos)
        q, k = self.q[layer], self.k[layer]
        kv = ly.kv_index()
        if heads is not None:
            h = self._rows(layer, heads)
            q, kv = q[h], kv[h]
        dt = self.anatomy.dtype  # HF computes scores in the model's dtype: so do we
        s = torch.matmul(q[:, rows].to(dt), k[kv].to(dt).transpose(-1, -2)) * ly.scale  # [head, q, k_pos]
        if ly.softcap is not None:
            s = torch.tanh(s / ly.softcap) * ly.softcap
        s = s.masked_fill(~self.allowed(layer, rows)[None], float("-inf"))
        return s if model_dtype else s.to(self.anatomy.compute_dtype)
