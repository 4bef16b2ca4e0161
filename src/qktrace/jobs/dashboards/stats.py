"""Per-feature statistics of one shard, and their exact merge.

A `Partial` holds, for one checkpoint's SAE over some tokens: how many tokens were seen, how many of them
each feature fired on (act > 0), a histogram of its activations over fixed bins (`HIST_EDGES`, the same
for every shard), and its top `keep` activations with their token windows. Activations are ordered by the
total order (feature, activation descending, document, offset), so the top `keep` of a union of shards is
the top `keep` of the union of their tops: merging partials in any grouping gives the numbers one pass
over the whole corpus gives, bit for bit.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ...models import Model, residuals
from ..corpus import Chunks
from .transcoders import Coder

# activation histogram bins: 10 per decade from 1e-4 to 1e5; smaller (larger) activations count in the first (last)
HIST_EDGES = (10.0 ** (np.arange(-40, 51) / 10)).astype(np.float32)  # [n_bins + 1]
N_BINS = len(HIST_EDGES) - 1
PAD = -1  # a window position outside the chunk


@dataclass(frozen=True, eq=False)
class Partial:
    """Statistics of one SAE over some tokens; top entries sorted by (feature, -act, doc, offset)."""

    n_tokens: int
    count: np.ndarray  # [d_sae] int64: tokens with act > 0
    hist: np.ndarray  # [d_sae, N_BINS] int64
    feature: np.ndarray  # [m] int64
    act: np.ndarray  # [m] float32
    doc: np.ndarray  # [m] int64
    offset: np.ndarray  # [m] int64: the token's offset in its document
    window: np.ndarray  # [m, before + 1 + after] int64 token ids, PAD outside the chunk; the token at `before`

    def starts(self) -> np.ndarray:
        """[d_sae + 1]: feature f's top entries are rows starts[f]:starts[f + 1]."""
        return np.searchsorted(self.feature, np.arange(len(self.count) + 1))


def _order(feature: np.ndarray, act: np.ndarray, doc: np.ndarray, offset: np.ndarray) -> np.ndarray:
    return np.lexsort((offset, doc, -act, feature))  # the last key is the primary one


def _top(p: Partial, keep: int) -> Partial:
    """`p` with only each feature's first `keep` entries in the total order."""
    o = _order(p.feature, p.act, p.doc, p.offset)
    f = p.feature[o]
    rank = np.arange(len(f)) - np.searchsorted(f, f, side="left")
    o = o[rank < keep]
    return Partial(p.n_tokens, p.count, p.hist, p.feature[o], p.act[o], p.doc[o], p.offset[o], p.window[o])


def merge(parts: Iterable[Partial], keep: int) -> Partial:
    """One Partial for all of `parts` (counts and histograms add; the top `keep` per feature of the union)."""
    items = list(parts)
    if not items:
        raise ValueError("nothing to merge")
    cat = Partial(
        n_tokens=sum(p.n_tokens for p in items),
        count=np.sum([p.count for p in items], axis=0),
        hist=np.sum([p.hist for p in items], axis=0),
        feature=np.concatenate([p.feature for p in items]),
        act=np.concatenate([p.act for p in items]),
        doc=np.concatenate([p.doc for p in items]),
        offset=np.concatenate([p.offset for p in items]),
        window=np.concatenate([p.window for p in items]),
    )
    return _top(cat, keep)


# ------------------------------------------------------------------------------------------- collection


class _Collector:
    """Running statistics of one SAE: counts and histogram on its device, top candidates reduced as they grow."""

    def __init__(self, sae: Coder, keep: int, device: torch.device) -> None:
        self.sae, self.keep, self.device = sae, keep, device
        self.n_tokens = 0
        self.count = torch.zeros(sae.d_sae, dtype=torch.long, device=device)
        self.hist = torch.zeros(sae.d_sae * N_BINS, dtype=torch.long, device=device)
        self.edges = torch.from_numpy(HIST_EDGES).to(device)
        self.cand: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []  # (feature, act, doc, token index in shard)
        self.held = 0

    def add(self, x: Tensor, doc: Tensor, where: Tensor, rows: int) -> None:
        """x [n, d_model] residuals of n counted tokens; doc/where [n]: their document and shard token index."""
        self.n_tokens += len(x)
        doc, where = doc.to(self.device), where.to(self.device)
        for lo in range(0, len(x), rows):
            acts = self.sae.encode(x[lo : lo + rows])  # [rows, d_sae]
            t, f = (acts > 0).nonzero(as_tuple=True)
            v = acts[t, f].float()
            self.count += torch.bincount(f, minlength=self.sae.d_sae)
            b = (torch.bucketize(v, self.edges, right=True) - 1).clamp_(0, N_BINS - 1)
            self.hist.index_add_(0, f * N_BINS + b, torch.ones_like(f))
            t = t + lo
            self.cand.append((f, v, doc[t], where[t]))
            self.held += len(f)
            if self.held > 4 * self.keep * self.sae.d_sae + (1 << 20):
                self.reduce()

    def reduce(self) -> None:
        if not self.cand:
            return
        f, v, d, w = (torch.cat(x) for x in zip(*self.cand))
        o = torch.argsort(w, stable=True)  # shard token order = (doc, offset) order within a shard
        o = o[torch.argsort(-v[o], stable=True)]
        o = o[torch.argsort(f[o], stable=True)]
        fs = f[o]
        rank = torch.arange(len(fs), device=fs.device) - torch.searchsorted(fs, fs)
        o = o[rank < self.keep]
        self.cand = [(f[o], v[o], d[o], w[o])]
        self.held = len(o)


def collect(
    model: Model,
    saes: Mapping[int, Coder],
    chunks: Chunks,
    *,
    keep: int,
    before: int,
    after: int,
    batch_tokens: int = 4096,
    encode_elements: int = 1 << 25,
    inputs: Callable[[Model, Tensor, list[int]], dict[int, Tensor]] = residuals,
) -> dict[int, Partial]:
    """Statistics of every SAE in `saes` (checkpoint -> SAE) over `chunks`, one Partial per checkpoint.

    Chunks run through the model in order, in batches of about `batch_tokens` tokens (right-padded: causal
    attention leaves the real positions alone); residuals are encoded `encode_elements // d_sae` rows at a
    time. BOS positions are not counted. `inputs(model, ids, keys)`: what each coder encodes, [batch, pos,
    d_model] per key (default: the residual at each checkpoint; transcoders: `transcoders.transcoder_inputs`)."""
    skip = int(chunks.has_bos)
    cpu = torch.device("cpu")  # token bookkeeping; residuals go where the model is
    lengths = torch.tensor([len(x) for x in chunks.ids], dtype=torch.long, device=cpu)
    # shard token index of every chunk position: chunk r's position p is token starts[r] + p
    starts = torch.cumsum(lengths, 0) - lengths
    flat = torch.cat(chunks.ids) if chunks.ids else torch.zeros(0, dtype=torch.long, device=cpu)
    col = {c: _Collector(sae, keep, sae.W_enc.device) for c, sae in saes.items()}
    r = 0
    while r < len(chunks):
        hi, width = r + 1, int(lengths[r])
        while hi < len(chunks) and (hi - r + 1) * max(width, int(lengths[hi])) <= batch_tokens:
            width = max(width, int(lengths[hi]))
            hi += 1
        ids = torch.zeros(hi - r, width, dtype=torch.long, device=cpu)
        real = torch.zeros(hi - r, width, dtype=torch.bool, device=cpu)
        for i, x in enumerate(chunks.ids[r:hi]):
            ids[i, : len(x)] = x
            real[i, skip : len(x)] = True
        res = inputs(model, ids, sorted(saes))  # {c: [batch, pos, d_model]}
        pos = torch.arange(width, device=cpu).expand(hi - r, width)
        doc = chunks.doc[r:hi, None].expand(hi - r, width)[real]
        where = (starts[r:hi, None] + pos)[real]
        for c, collector in col.items():
            x = res[c][real.to(res[c].device)]
            rows = max(1, encode_elements // collector.sae.d_sae)
            collector.add(x, doc, where, rows)
        r = hi
    out = {}
    offsets = (
        (chunks.offset - skip).repeat_interleave(lengths)
        + torch.arange(len(flat), device=cpu)
        - starts.repeat_interleave(lengths)
    )
    chunk_start = starts.repeat_interleave(lengths)
    chunk_end = chunk_start + lengths.repeat_interleave(lengths)
    span = torch.arange(-before, after + 1, device=cpu)
    for c, k in col.items():
        k.reduce()
        f, v, d, w = (
            (torch.cat(x).cpu() for x in zip(*k.cand))
            if k.cand
            else (torch.zeros(0, dtype=torch.long, device=cpu),) * 4
        )
        idx = w[:, None] + span  # [m, window]
        inside = (idx >= chunk_start[w, None]) & (idx < chunk_end[w, None])
        window = torch.where(inside, flat[idx.clamp(0, max(len(flat) - 1, 0))], torch.full_like(idx, PAD))
        out[c] = Partial(
            n_tokens=k.n_tokens,
            count=k.count.cpu().numpy(),
            hist=k.hist.view(-1, N_BINS).cpu().numpy(),
            feature=f.numpy(),
            act=v.float().numpy(),
            doc=d.numpy(),
            offset=offsets[w].numpy(),
            window=window.numpy(),
        )
    return out


# ----------------------------------------------------------------------------------------- serialisation


def to_bytes(parts: Mapping[int, Partial]) -> bytes:
    """An .npz of the partials of one shard (sparse histograms); read back by `from_bytes`."""
    arrays: dict[str, np.ndarray] = {}
    for c, p in parts.items():
        nz = np.flatnonzero(p.hist)
        arrays |= {
            f"c{c}.n_tokens": np.array(p.n_tokens, dtype=np.int64),
            f"c{c}.count": p.count,
            f"c{c}.hist_index": nz.astype(np.int64),
            f"c{c}.hist_count": p.hist.reshape(-1)[nz],
            f"c{c}.feature": p.feature,
            f"c{c}.act": p.act,
            f"c{c}.doc": p.doc,
            f"c{c}.offset": p.offset,
            f"c{c}.window": p.window,
        }
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def from_bytes(data: bytes) -> dict[int, Partial]:
    out = {}
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        for c in sorted({int(n.split(".")[0][1:]) for n in z.files}):
            count = z[f"c{c}.count"]
            hist = np.zeros(len(count) * N_BINS, dtype=np.int64)
            hist[z[f"c{c}.hist_index"]] = z[f"c{c}.hist_count"]
            out[c] = Partial(
                n_tokens=int(z[f"c{c}.n_tokens"]),
                count=count,
                hist=hist.reshape(len(count), N_BINS),
                feature=z[f"c{c}.feature"],
                act=z[f"c{c}.act"],
                doc=z[f"c{c}.doc"],
                offset=z[f"c{c}.offset"],
                window=z[f"c{c}.window"],
            )
    return out
