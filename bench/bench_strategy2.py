"""Strategy 2 (transcoders + attention-output SAEs) at 32 tokens: the unpruned sweep with the head axis
(`by_head=True`: every attention row swept once per head, every non-zero edge's per-head parts held) against
without it (`by_head=False`), and the pruned graph that sweeps without heads and computes head loadings for
the kept attention features only (`build_checkpointed_graph`). Not a test: `python bench/bench_strategy2.py`.

The model is a random tiny Llama (4 layers; d_model 32 and 4 heads, then d_model 64 and 8 heads) with random
ReLU transcoders and hook_z / attn_out attention SAEs (a negative encoder bias: a few features per token).
Each part runs in its own process, so its peak RSS (above the process after loading) is its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPES = [dict(d_model=32, heads=4, d_sae=64), dict(d_model=64, heads=8, d_sae=128)]
PARTS = ("by_head", "summed", "pruned")


def rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def part(name: str, d_model: int, heads: int, d_sae: int, tokens: int) -> dict[str, float]:
    from qktrace.graph.strategy2 import checkpointed_graph
    from qktrace.graph.strategy2_graph import build_checkpointed_graph
    from qktrace.models import load_model
    from qktrace.saes import load_transcoders
    from qktrace.testing import make_tiny_model, random_attention_saes, random_prompt, write_transcoder_set

    root = Path(tempfile.mkdtemp())
    extra = dict(
        hidden_size=d_model, num_attention_heads=heads, num_key_value_heads=heads // 2, intermediate_size=2 * d_model
    )
    model = load_model(make_tiny_model("llama", root / "m", seed=0, num_hidden_layers=4, **extra))
    ts = load_transcoders(write_transcoder_set(root / "ct", d_model, 4, d_sae=d_sae), model)
    att = random_attention_saes(model, ("z", "attn_out", "z", "attn_out"), d_sae)
    trace = model.run(random_prompt(tokens - 1, seed=1))
    torch.set_num_threads(1)
    before = rss()
    t0 = time.perf_counter()
    if name == "pruned":
        g = build_checkpointed_graph(model, ts, att, trace, loadings_per_edge=heads)
        n = {"edges_kept": g.n_edges, "nodes_kept": len(g.nodes)}
    else:
        cg = checkpointed_graph(model, ts, att, trace, by_head=name == "by_head")
        n = {"nodes": len(cg.nodes), "attention_features": int(cg.attention_features.layer.numel())}
    return {"seconds": time.perf_counter() - t0, "peak_rss_mb": (rss() - before) / 2**20, "tokens": trace.n_pos, **n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=PARTS)
    ap.add_argument("--shape", type=int, default=0)
    ap.add_argument("--tokens", type=int, default=32)
    a = ap.parse_args()
    if a.part:
        print(json.dumps(part(a.part, tokens=a.tokens, **SHAPES[a.shape])))
        return
    for s, shape in enumerate(SHAPES):
        for name in PARTS:
            cmd = [sys.executable, __file__, "--part", name, "--shape", str(s), "--tokens", str(a.tokens)]
            out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            print(json.dumps({"shape": shape, "part": name, **out}))


if __name__ == "__main__":
    main()
