"""From merged statistics to files: each feature's top output tokens, its automatic label, dashboards.json
(the contract the web UI reads), labels.json, and circuit-tracer's per-feature JSON.

Top output tokens: the decoder row read through the final norm at unit scale (`anatomy.final_norm.linear`,
which centres for LayerNorm) and the unembedding (`anatomy.W_U`): the logits a unit of the feature adds
directly, up to the norm's per-token scale.

Labels (`auto_label`): from the tokens the feature fires on most strongly and the tokens just before them;
when one token, a preceding token, or a category of tokens (`TokenKind`, a hook: the demo adds its
names, titles and words) dominates, it names that; otherwise the two most common tokens and what the
feature writes: the category most of its top 5 output tokens share, else its top output token unless
that is one of the two shown.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, TypedDict

import numpy as np
import torch
from torch import Tensor

from ...models import Model
from ...nodes import visible
from .stats import HIST_EDGES, PAD, Partial
from .transcoders import Coder

VERSION = 1  # of dashboards.json: bottom outputs and histograms (files without "version" have neither)
TokenKind = Callable[[str], "str | None"]


class HistJSON(TypedDict):
    lo: int  # the first non-empty bin (an index into the file's hist_edges)
    counts: list[int]  # tokens per bin from `lo` to the last non-empty bin


class FeatureJSON(TypedDict):
    """One alive feature of dashboards.json (dead features are left out)."""

    label: str
    freq: float  # fraction of tokens it fires on
    max_act: float
    top_out: list[str]  # output tokens it raises most (decoder row through the final norm and unembedding)
    contexts: list[dict[str, Any]]  # {"tokens": [...], "i": the activating token's index, "act": activation}
    bottom_out: list[str]  # output tokens it lowers most
    hist: HistJSON


class DashboardsJSON(TypedDict):
    """dashboards.json, one per checkpoint: what the server's GET /api/features reads (the page's contract)."""

    version: int
    checkpoint: int
    hook_name: str
    model: str
    d_sae: int
    k: int | None
    n_tokens: int
    n_alive: int
    hist_edges: list[float]  # N_BINS + 1 edges, log-spaced; the first and last bins are open-ended
    features: dict[str, FeatureJSON]


def token_kind(s: str) -> str | None:
    """Generic token categories: number, punctuation; None for anything else."""
    w = s.strip()
    if w.isdigit():
        return "number"
    if w and not any(ch.isalnum() for ch in w):
        return "punctuation"
    return None


def _show(s: str) -> str:
    """A token as a label writes it: stripped, newlines and tabs as ⏎ and ⇥ (`nodes.visible`), spaces alone as ␣."""
    return visible(s.strip(), spaces=False) if s.strip() else visible(s)


def auto_label(
    cur: Sequence[str], prev: Sequence[str], top_out: Sequence[str] = (), kind: TokenKind = token_kind
) -> str:
    """Short label from the activating tokens `cur`, the tokens before them `prev` (strongest first) and
    the feature's top output tokens."""
    if not cur:
        return "dead"
    ((c1, nc),) = Counter(cur).most_common(1)
    ((p1, np_),) = Counter(prev).most_common(1)
    fc, fp = nc / len(cur), np_ / len(prev)
    if fc >= 0.6 and fp >= 0.6:
        return f"{_show(p1)} {_show(c1)}"
    if fc >= 0.6:
        return f"'{_show(c1)}'" if fp < 0.3 else f"'{_show(c1)}' (after {_show(p1)})"
    ((k1, nk),) = Counter(kind(s) for s in cur).most_common(1)
    ((pk1, npk),) = Counter(kind(s) for s in prev).most_common(1)
    if fp >= 0.6:
        return f"{_show(p1)}→(next)" if k1 is None or nk / len(cur) < 0.6 else f"{k1} after '{_show(p1)}'"
    if k1 is not None and nk / len(cur) >= 0.6:
        return k1 if pk1 is None or npk / len(prev) < 0.6 else f"{k1} after {pk1}"
    if pk1 is not None and npk / len(prev) >= 0.6:
        return f"after {pk1}"
    shown = [_show(t) for t, _ in Counter(cur).most_common(2)]
    if not top_out:
        return "/".join(shown)
    ((ok, nok),) = Counter(kind(s) for s in top_out[:5]).most_common(1)
    if ok is not None and nok >= 3:
        return f"{'/'.join(shown)} → {ok}"
    out = _show(top_out[0])  # what it writes, unless that is a token it fires on (embeddings often are)
    return "/".join(shown) if out in shown else f"{'/'.join(shown)} → '{out}'"


@torch.no_grad()
def top_outputs(model: Model, sae: Coder, n: int) -> tuple[np.ndarray, np.ndarray]:
    """([d_sae, n] top, [d_sae, n] bottom) output token ids of every feature, strongest first."""
    a = model.anatomy
    W_U = a.W_U.to(a.compute_dtype)  # [d_model, vocab] (a view for float32 models)
    n = min(n, W_U.shape[1])
    rows = max(1, (1 << 26) // W_U.shape[1])
    tops: list[Tensor] = []
    bottoms: list[Tensor] = []
    for lo in range(0, sae.d_sae, rows):
        d = sae.W_dec[lo : lo + rows].to(device=a.final_norm.weight.device, dtype=a.compute_dtype)  # [rows, d_model]
        logits = a.final_norm.linear(d, 1.0).to(W_U.device) @ W_U  # [rows, vocab]
        tops.append(logits.topk(n, dim=-1).indices.cpu())
        bottoms.append((-logits).topk(n, dim=-1).indices.cpu())
    return torch.cat(tops).numpy(), torch.cat(bottoms).numpy()


def _window(row: np.ndarray, before: int, vocab: Sequence[str]) -> tuple[list[str], int]:
    keep = row != PAD
    return [vocab[int(t)] for t in row[keep]], before - int((~keep[:before]).sum())


def render(
    part: Partial,
    *,
    header: dict[str, Any],
    vocab: Sequence[str],
    top_ids: np.ndarray,
    bottom_ids: np.ndarray,
    n_contexts: int,
    label_pool: int,
    before: int,
    n_out: int,
    kind: TokenKind = token_kind,
) -> tuple[dict[str, str], dict[str, Any]]:
    """(labels.json, dashboards.json) of one checkpoint. `header`: checkpoint, hook_name, model, d_sae, k."""
    starts = part.starts()
    labels: dict[str, str] = {}
    feats: dict[str, FeatureJSON] = {}
    for f in range(len(part.count)):
        lo, hi = int(starts[f]), int(starts[f + 1])
        if hi == lo:
            labels[str(f)] = "dead"
            continue
        cur: list[str] = []
        prev: list[str] = []
        ctxs: list[dict[str, Any]] = []
        for j in range(lo, min(hi, lo + max(label_pool, n_contexts))):
            w = part.window[j]
            if j < lo + label_pool:
                cur.append(vocab[int(w[before])])
                prev.append(vocab[int(w[before - 1])] if before and w[before - 1] != PAD else "")
            if len(ctxs) < n_contexts:
                tokens, i = _window(w, before, vocab)
                ctxs.append({"tokens": tokens, "i": i, "act": round(float(part.act[j]), 3)})
        top_out = [vocab[int(t)] for t in top_ids[f][:n_out]]
        labels[str(f)] = auto_label(cur, prev, top_out, kind)
        hist = part.hist[f]
        nz = np.flatnonzero(hist)
        feats[str(f)] = {
            "label": labels[str(f)],
            "freq": round(int(part.count[f]) / max(part.n_tokens, 1), 5),
            "max_act": round(float(part.act[lo]), 3),
            "top_out": top_out,
            "contexts": ctxs,
            "bottom_out": [vocab[int(t)] for t in bottom_ids[f][:n_out]],
            "hist": {"lo": int(nz[0]), "counts": hist[nz[0] : nz[-1] + 1].tolist()},
        }
    dash = (
        {"version": VERSION}
        | header
        | {
            "n_tokens": part.n_tokens,
            "n_alive": len(feats),
            "hist_edges": [float(f"{e:.4g}") for e in HIST_EDGES],
            "features": feats,
        }
    )
    return labels, dash


def circuit_tracer_features(dash: dict[str, Any], transcoder_id: str) -> dict[int, dict[str, Any]]:
    """Per alive feature, the JSON circuit-tracer's frontend reads for its feature examples
    (`feature_examples`: top activations, top and bottom logits, histogram, frequency). The activation is
    known at the activating token only; the other tokens of each example show 0."""
    out = {}
    for f, d in dash["features"].items():
        seen: set[tuple[str, ...]] = set()
        examples = []
        for ctx in d["contexts"]:
            tokens = [t.replace("\n", "⏎").replace("\t", "→").replace("\r", "↵") for t in ctx["tokens"]]
            acts = [0.0] * len(tokens)
            acts[ctx["i"]] = ctx["act"]
            key = tuple(ctx["tokens"])
            examples.append(
                {
                    "tokens": tokens,
                    "tokens_acts_list": acts,
                    "train_token_ind": ctx["i"],
                    "is_repeated_datapoint": key in seen,
                }
            )
            seen.add(key)
        hist = [0] * d["hist"]["lo"] + d["hist"]["counts"]
        out[int(f)] = {
            "transcoder_id": transcoder_id,
            "index": int(f),
            "examples_quantiles": [{"quantile_name": "Top activations", "examples": examples}],
            "top_logits": d["top_out"],
            "bottom_logits": d["bottom_out"],
            "act_min": 0.0,
            "act_max": d["max_act"],
            "quantile_values": [],
            "histogram": [float(x) for x in hist],
            "activation_frequency": d["freq"],
        }
    return out
