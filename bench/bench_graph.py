"""Attribution-graph speed and memory on a GPT-2-small-shaped random model (12 layers, d_model 768,
12 heads, d_mlp 3072; GPT2Config with random weights, nothing downloaded) with random TopK SAEs
(width 24576, k=64) at all 13 checkpoints. Not a test: run `python bench/bench_graph.py [--quick]`.

  full: 64 tokens, every active feature, full graph with head loadings. Prints wall time, the ratio
        against a batched-backward baseline measured in the same run (one backward row per target
        through the frozen layer, as circuit-tracer computes edges; timed on a subset of targets of
        one layer and extrapolated to every target of every layer), the achieved GFLOP/s (FLOPs
        counted with torch's flop registry in a second run) against a measured matmul rate, and
        peak RSS.
  long: 1024 tokens in target-driven mode; wall time and peak RSS (target < 8 GB).
  long4k: 4096 tokens: the trace, one QK row (the middle layer's head 0 from the last position over
        every key) and the target-driven graph; each one's wall time, the trace's bytes, peak RSS
        (target < 6 GB).

Each part runs in its own process, so peak RSS is per part. `--quick` shrinks every shape.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from qktrace.graph import build_graph
from qktrace.graph.build import attribute
from qktrace.graph.edges import Vectors
from qktrace.models import Model
from qktrace.models.model import Trace
from qktrace.models.replay import frozen_layer
from qktrace.saes import SAE, SAESet

FULL = dict(layers=12, d_model=768, heads=12, d_sae=24576, k=64, tokens=64, long=1024, long4k=4096)
QUICK = dict(layers=2, d_model=128, heads=4, d_sae=2048, k=16, tokens=24, long=128, long4k=256)


def gpt2_small(layers: int, d_model: int, heads: int, n_positions: int = 1024) -> Model:
    import transformers as T

    logging.getLogger("transformers").setLevel(logging.ERROR)
    cfg = T.GPT2Config(n_layer=layers, n_embd=d_model, n_head=heads, n_positions=n_positions, vocab_size=50257)
    torch.manual_seed(0)
    hf = T.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    return Model(hf.eval(), tokenizer=None, name="gpt2-small-random")


def topk_saes(layers: int, d_model: int, d_sae: int, k: int) -> SAESet:
    saes = {}
    for c in range(layers + 1):
        g = torch.Generator().manual_seed(c)
        W_dec = torch.randn(d_sae, d_model, generator=g)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        # W_enc is a transposed view of W_dec: one copy of the weights per SAE
        saes[c] = SAE(c, "topk", W_dec.T, 0.01 * torch.randn(d_sae, generator=g), W_dec, torch.zeros(d_model), k=k)
    return SAESet(saes)


def setup(shape: dict[str, int], n_tokens: int) -> tuple[Model, SAESet, Trace]:
    model = gpt2_small(shape["layers"], shape["d_model"], shape["heads"], max(1024, n_tokens))
    saes = topk_saes(shape["layers"], shape["d_model"], shape["d_sae"], shape["k"])
    ids = torch.randint(50257, (n_tokens,), generator=torch.Generator().manual_seed(n_tokens))
    return model, saes, model.run(ids)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def matmul_gflops() -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    t = time.perf_counter()
    for _ in range(5):
        a @ b
    return 5 * 2 * 2048**3 / (time.perf_counter() - t) / 1e9


def baseline_rows(model: Model, trace: Trace, layer: int, targets: Vectors, sources: Vectors) -> torch.Tensor:
    """Edges into `targets` by one backward row per target through the frozen layer (batched)."""
    x = trace.resid[layer]
    P, d = x.shape
    B = len(targets)
    xb = x.expand(B, P, d).clone().requires_grad_(True)
    with torch.enable_grad():
        y = frozen_layer(model.anatomy, trace, layer, xb)  # [batch, pos, d_model]
        inject = torch.zeros_like(y)
        inject[torch.arange(B), targets.pos] = targets.vec
        (grad,) = torch.autograd.grad(y, xb, inject)  # [batch, pos, d_model]
    return torch.einsum("bsd,sd->bs", grad[:, sources.pos], sources.vec)


class CountFlops(TorchDispatchMode):
    """FLOPs of every matmul-like aten op, by torch's own flop registry (FlopCounterMode without
    its module tracker, whose backward hooks clash with the vmapped MLP pullback)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        count = flop_registry.get(func._overloadpacket)
        if count is not None:
            self.total += count(*args, **kwargs, out_val=out)
        return out


def part_full(shape: dict[str, int], quick: bool) -> dict[str, object]:
    model, saes, trace = setup(shape, shape["tokens"])
    rate = matmul_gflops()
    t = time.perf_counter()
    graph = build_graph(model, saes, trace, progress=False)
    wall = time.perf_counter() - t
    rss = peak_rss_gb()
    with CountFlops() as counter:
        build_graph(model, saes, trace, progress=False)
    flops = counter.total

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        path = graph.save(Path(tmp) / "graph.json")
        save_s, json_mb = time.perf_counter() - t, path.stat().st_size / 1e6

    # baseline on a subset of one layer's targets, checked against our edges for those targets
    att = attribute(model, saes, trace)
    layer = model.n_layers // 2
    b = next(i for i, info in att.inputs.items() if info.layer == layer)
    info = att.inputs[b]
    n_total = sum(len(i.targets) for i in att.inputs.values()) + len(att.logits)
    batch, n_batches = (32, 2) if not quick else (16, 2)
    rows = torch.randperm(len(info.targets), generator=torch.Generator().manual_seed(0))[: batch * n_batches]
    baseline_rows(model, trace, layer, info.targets.take(rows[:batch]), info.sources)  # warm-up
    t = time.perf_counter()
    ref = torch.cat([baseline_rows(model, trace, layer, info.targets.take(r), info.sources) for r in rows.split(batch)])
    per_target = (time.perf_counter() - t) / len(rows)
    ours = att.blocks[b].weight[rows, : len(info.sources)]
    agree = float((ours - ref.detach()).abs().max() / ref.abs().max())
    baseline = per_target * n_total
    return {
        "part": "full",
        "tokens": trace.n_pos,
        "active_features": int((att.kinds == 1).sum()),
        "nodes": len(graph.nodes),
        "edges": graph.n_edges,
        "completeness": graph.completeness,
        "replacement": graph.replacement,
        "wall_s": wall,
        "gflop": flops / 1e9,
        "gflops": flops / 1e9 / wall,
        "matmul_gflops": rate,
        "baseline_s": baseline,
        "baseline_targets_timed": len(rows),
        "baseline_targets_total": n_total,
        "baseline_layer": layer,
        "baseline_max_rel_diff": agree,
        "peak_rss_gb": rss,
        "save_s": save_s,
        "json_mb": json_mb,
    }


def part_long4k(shape: dict[str, int], quick: bool) -> dict[str, object]:
    from qktrace import Tracer

    model = gpt2_small(shape["layers"], shape["d_model"], shape["heads"], max(1024, shape["long4k"]))
    saes = topk_saes(shape["layers"], shape["d_model"], shape["d_sae"], shape["k"])
    ids = torch.randint(50257, (shape["long4k"],), generator=torch.Generator().manual_seed(4))
    t = time.perf_counter()
    traced = Tracer(model, saes).run(ids)
    run_s = time.perf_counter() - t
    t = time.perf_counter()
    att = traced.qk(model.n_layers // 2, 0, -1)
    qk_s = time.perf_counter() - t
    t = time.perf_counter()
    graph = traced.graph(mode="target", qk_terms=False, progress=False)
    graph_s = time.perf_counter() - t
    return {
        "part": "long4k",
        "tokens": traced.trace.n_pos,
        "run_s": run_s,
        "trace_gb": traced.trace.nbytes / 1e9,
        "qk_s": qk_s,
        "qk_terms": att.terms.numel(),
        "qk_max_rel_error": att.max_relative_error(),
        "graph_s": graph_s,
        "nodes": len(graph.nodes),
        "edges": graph.n_edges,
        "peak_rss_gb": peak_rss_gb(),
    }


def part_long(shape: dict[str, int], quick: bool) -> dict[str, object]:
    model, saes, trace = setup(shape, shape["long"])
    t = time.perf_counter()
    graph = build_graph(model, saes, trace, mode="target", progress=False)
    wall = time.perf_counter() - t
    return {
        "part": "long",
        "tokens": trace.n_pos,
        "nodes": len(graph.nodes),
        "edges": graph.n_edges,
        "wall_s": wall,
        "peak_rss_gb": peak_rss_gb(),
        "max_nodes_per_checkpoint": graph.settings["max_nodes_per_checkpoint"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small shapes for a smoke run")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2, the target machine)")
    ap.add_argument("--part", choices=["full", "long", "long4k"], help="run one part in this process (internal)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shape = QUICK if args.quick else FULL
    if args.part:
        out = {"full": part_full, "long": part_long, "long4k": part_long4k}[args.part](shape, args.quick)
        print(json.dumps(out))
        return
    print(
        f"model: {shape['layers']} layers, d_model {shape['d_model']}, {shape['heads']} heads; "
        f"SAEs at all {shape['layers'] + 1} checkpoints, width {shape['d_sae']}, k={shape['k']}; {args.threads} threads"
    )
    for part in ("full", "long", "long4k"):
        cmd = [sys.executable, __file__, "--part", part, "--threads", str(args.threads)]
        cmd += ["--quick"] if args.quick else []
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(f"{part}: failed\n{done.stderr[-2000:]}")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        if part == "full":
            print(
                f"full graph, {r['tokens']} tokens, {r['active_features']} active features: {r['wall_s']:.1f} s "
                f"({r['nodes']} nodes, {r['edges']} edges kept; completeness {r['completeness']:.3f}, "
                f"replacement {r['replacement']:.3f})\n"
                f"  baseline (batched backward, one row per target): {r['baseline_s']:.0f} s, extrapolated from "
                f"{r['baseline_targets_timed']} targets of layer {r['baseline_layer']} to all "
                f"{r['baseline_targets_total']} targets; ratio {r['baseline_s'] / r['wall_s']:.0f}x; "
                f"edges agree to {r['baseline_max_rel_diff']:.1e}\n"
                f"  {r['gflop']:.0f} GFLOP in {r['wall_s']:.1f} s = {r['gflops']:.0f} GFLOP/s "
                f"({r['gflops'] / r['matmul_gflops']:.0%} of the measured 2048^2 matmul rate, "
                f"{r['matmul_gflops']:.0f} GFLOP/s)\n"
                f"  peak RSS {r['peak_rss_gb']:.2f} GB (graph build); saving the JSON: {r['save_s']:.1f} s, "
                f"{r['json_mb']:.0f} MB"
            )
        elif part == "long":
            print(
                f"long prompt, {r['tokens']} tokens, target-driven (top {r['max_nodes_per_checkpoint']} features "
                f"per checkpoint): {r['wall_s']:.1f} s, {r['nodes']} nodes, {r['edges']} edges; "
                f"peak RSS {r['peak_rss_gb']:.2f} GB (target < 8 GB)"
            )
        else:
            print(
                f"{r['tokens']} tokens: trace {r['run_s']:.1f} s ({r['trace_gb']:.2f} GB held), one QK row "
                f"{r['qk_s']:.2f} s ({r['qk_terms']} terms, max relative error {r['qk_max_rel_error']:.1e}), "
                f"target-driven graph {r['graph_s']:.1f} s ({r['nodes']} nodes, {r['edges']} edges); "
                f"peak RSS {r['peak_rss_gb']:.2f} GB (target < 6 GB)"
            )


if __name__ == "__main__":
    main()
