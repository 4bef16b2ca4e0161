"""PNG figures for intervention sweeps and head tables (matplotlib's Agg canvas, no pyplot state).

`plot_sweep`: as in the paper's steering figures -- the top prediction's probability and the watched
tokens' probabilities against the steering scale, the top-1 token written at each scale, and the
watched attention weights in a panel beneath. `plot_heads`: layer x head heat maps of the head scores
and the QK spectrum's sign skew.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..errors import InputError
from ..files import atomic_open

log = logging.getLogger(__name__)


def _save(fig: Figure, path: str | os.PathLike[str]) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    with atomic_open(out) as f:  # a temp file beside `out`, renamed over it: never a half-written PNG
        fig.savefig(f, format="png", dpi=110)
    log.info("wrote %s", out)
    return out


def plot_sweep(df: pd.DataFrame, path: str | os.PathLike[str], title: str | None = None) -> Path:
    """Write a sweep DataFrame (from `sweep.sweep`) as a PNG; returns the path."""
    if "scale" not in df.columns or "top_1" not in df.columns or df.empty:
        raise InputError("plot_sweep needs a non-empty sweep() DataFrame with 'scale' and 'top_1' columns")
    df = df.sort_values("scale")
    x = df["scale"].to_numpy(dtype=float)
    watched = [c for c in df.columns if c.startswith("p:")]
    attn = [c for c in df.columns if c.startswith("attn:")]
    fig = Figure(figsize=(7.5, 6.5 if attn else 4.2))
    axes = fig.subplots(2 if attn else 1, 1, sharex=True, squeeze=False)[:, 0]
    top = axes[0]
    p1 = df["p_top_1"].to_numpy(dtype=float)
    top.plot(x, p1, color="0.35", lw=2, marker="o", label="top prediction")
    for xi, yi, tok in zip(x, p1, df["top_1"]):
        top.annotate(repr(str(tok)), (xi, yi), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
    for c in watched:
        top.plot(x, df[c].to_numpy(dtype=float), marker=".", label=f"p({c[2:]!r})")
    top.set_ylabel("probability")
    top.set_ylim(0, 1.12)
    top.legend(fontsize=8, loc="best")
    if title:
        top.set_title(title)
    if attn:
        bottom = axes[1]
        for c in attn:
            bottom.plot(x, df[c].to_numpy(dtype=float), marker=".", label=c[5:])
        bottom.set_ylabel("attention weight")
        bottom.set_ylim(0, 1.05)
        bottom.legend(fontsize=8, loc="best")
    for ax in axes:
        ax.axvline(1.0, color="0.8", lw=1, ls="--", zorder=0)  # scale 1 = clean
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("steering scale")
    fig.tight_layout()
    return _save(fig, path)


HEAD_COLUMNS = ("prev_token", "induction", "duplicate", "qk_skew")


def plot_heads(table: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Layer x head heat maps of every score column of `heads.heads_table`; returns the path."""
    missing = {"layer", "head"} - set(table.columns)
    cols = [c for c in HEAD_COLUMNS if c in table.columns]
    if missing or not cols:
        raise InputError("plot_heads needs a heads_table() DataFrame with layer, head and score columns")
    n_layers, n_heads = int(table["layer"].max()) + 1, int(table["head"].max()) + 1
    fig = Figure(figsize=(3.2 * len(cols), 0.35 * n_layers + 2.0))
    axes = fig.subplots(1, len(cols), squeeze=False)[0]
    for ax, col in zip(axes, cols):
        grid = np.full((n_layers, n_heads), np.nan)
        grid[table["layer"].to_numpy(), table["head"].to_numpy()] = table[col].to_numpy(dtype=float)
        skew = col == "qk_skew"
        im = ax.imshow(grid, aspect="auto", cmap="RdBu_r" if skew else "viridis", vmin=-1 if skew else 0, vmax=1)
        ax.set_title(col)
        ax.set_xticks(range(0, n_heads, max(1, n_heads // 16)))
        ax.set_yticks(range(0, n_layers, max(1, n_layers // 16)))
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return _save(fig, path)
