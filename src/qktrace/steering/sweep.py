"""Sweeps: one steered run per scale, the next-token distribution and watched attention weights per row."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from torch import Tensor

from ..config import parse_scales  # the sweep's scales, parsed where every front end parses them
from ..errors import check_index
from ..models.model import Model
from .interventions import Intervention, SAELike, ScalePlaceholder, run_with

if TYPE_CHECKING:
    from ..saes.attention import AttentionSAESet
    from ..saes.transcoder import TranscoderSet

log = logging.getLogger(__name__)


def _fill(ivs: Sequence[Intervention], s: float) -> list[Intervention]:
    out: list[Intervention] = []
    for iv in ivs:
        changes = {k: s for k in ("scale", "value") if isinstance(getattr(iv, k, None), ScalePlaceholder)}
        out.append(dataclasses.replace(iv, **changes) if changes else iv)  # type: ignore[arg-type]
    return out


def watch_column(layer: int, head: int, q_pos: int, k_pos: int) -> str:
    return f"attn:L{layer}.H{head}:{q_pos}->{k_pos}"


def sweep(
    model: Model,
    saes: Mapping[int, SAELike],
    prompt: str | Sequence[int] | Tensor,
    interventions: Callable[[float], Sequence[Intervention]] | Sequence[Intervention],
    scales: str | Sequence[float],
    watch_tokens: Sequence[str | int] = (),
    watch_attention: Sequence[tuple[int, int, int, int]] = (),
    top_k: int = 5,
    pos: int = -1,
    transcoders: TranscoderSet | None = None,
    attention_saes: AttentionSAESet | None = None,
) -> pd.DataFrame:
    """One row per scale: top-k next tokens and probabilities at `pos`, watched tokens' probabilities,
    the logit difference of the first two watched tokens, and watched attention weights.

    `transcoders` / `attention_saes`: the dictionaries whose features interventions of kind Kind.TRANSCODER /
    Kind.ATTN_FEATURE steer.
    Columns: scale, top_1..top_k, p_top_1..p_top_k, 'p:<token>' per watched token, logit_diff (with
    two or more watched tokens), and 'attn:L<layer>.H<head>:<q_pos>-><k_pos>' per watched weight.
    """
    ids = model.tokenize(prompt)
    n = int(ids.shape[0])
    make = interventions if callable(interventions) else (lambda s: _fill(interventions, s))
    tok_ids = [model.to_single_token(t, "watched token") for t in watch_tokens]
    tok_names = list(model.str_tokens(tok_ids))
    watched = []
    for ly, h, qp, kp in watch_attention:
        ly, h = check_index(ly, model.n_layers, "layer"), check_index(h, model.n_heads, "head")
        qp, kp = (check_index(p, n, "position", allow_negative=True) for p in (qp, kp))
        watched.append((ly, h, qp, kp))
    p = check_index(pos, n, "position", allow_negative=True)
    clean = model.run(ids)
    rows = []
    layers = {w[0] for w in watched}
    for s in parse_scales(scales):
        res = run_with(
            model,
            saes,
            ids,
            list(make(s)),
            clean=clean,
            record_attention=layers,
            last_only=p == n - 1,
            transcoders=transcoders,
            attention_saes=attention_saes,
        )
        logits = res.logits[p if p < n - 1 else -1].float()
        probs = torch.softmax(logits, dim=-1)
        top = probs.topk(min(top_k, probs.shape[0]))
        names = model.str_tokens(top.indices)
        row: dict[str, Any] = {"scale": s}
        row.update({f"top_{i + 1}": names[i] for i in range(len(names))})
        row.update({f"p_top_{i + 1}": float(top.values[i]) for i in range(len(names))})
        row.update({f"p:{name}": float(probs[t]) for name, t in zip(tok_names, tok_ids)})
        if len(tok_ids) >= 2:
            row["logit_diff"] = float(logits[tok_ids[0]] - logits[tok_ids[1]])
        row.update({watch_column(*w): float(res.patterns[w[0]][w[1:]]) for w in watched})
        rows.append(row)
        log.info("scale %g: top-1 %r (p=%.3f)", s, names[0], float(top.values[0]))
    return pd.DataFrame(rows)
