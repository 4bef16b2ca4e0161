"""GPU speed and memory at research scale: random models of two real shapes, nothing downloaded.

  gpt2-small  12 layers, d_model 768, 12 heads, d_mlp 3072, vocab 50257; TopK SAEs 24576 wide, k=64, at all
              13 checkpoints
  gemma-2-2b  26 layers, d_model 2304, 8 query / 4 key-value heads of 256, d_mlp 9216, vocab 256000, soft-caps,
              sliding window; TopK SAEs 16384 wide, k=64, at all 27 checkpoints

For each shape and prompt length (64 / 256 / 1,024 / 4,096 / 16,384 tokens): `Model.run` (the trace),
one QK row (the middle layer's head 0, from the last position, over every key), the target-driven graph,
and the full graph where asked (--full-upto), each with wall time (CUDA synchronised) and the peak device
memory it reached. One JSON line per measurement on stdout; a step that runs out of memory says "oom".
Each shape runs in its own process. The process is capped at --cap-gb (default 80 GB, the size of the
cards people have) with `torch.cuda.set_per_process_memory_fraction`.

Targets (issue 11): gemma-2-2b at 16,384 tokens: trace + QK row + target-driven graph fit in 80 GB;
gemma-2-2b full graph at 256 tokens < 24 GB (built with max_memory = 20 GB); gpt2-small full graph at
64 tokens <= 0.25 s. `python bench/bench_gpu.py --cpu-smoke` runs tiny shapes on the CPU (a check of this
script, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

SHAPES: dict[str, dict[str, Any]] = {
    "gpt2-small": dict(
        family="gpt2", layers=12, d_model=768, heads=12, kv=12, d_head=64, d_mlp=3072, vocab=50257, d_sae=24576, k=64
    ),  # fmt: skip
    "gemma-2-2b": dict(
        family="gemma2", layers=26, d_model=2304, heads=8, kv=4, d_head=256, d_mlp=9216, vocab=256000, d_sae=16384, k=64
    ),  # fmt: skip
}
SMOKE: dict[str, dict[str, Any]] = {
    "gpt2-small": dict(
        SHAPES["gpt2-small"], layers=2, d_model=64, heads=4, kv=4, d_head=16, d_mlp=128, vocab=500, d_sae=256, k=8
    ),  # fmt: skip
    "gemma-2-2b": dict(
        SHAPES["gemma-2-2b"], layers=2, d_model=64, heads=4, kv=2, d_head=16, d_mlp=128, vocab=500, d_sae=256, k=8
    ),  # fmt: skip
}
TOKENS = (64, 256, 1024, 4096, 16384)


def config(shape: dict[str, Any], n_ctx: int) -> Any:
    import transformers as T

    if shape["family"] == "gpt2":
        return T.GPT2Config(n_layer=shape["layers"], n_embd=shape["d_model"], n_head=shape["heads"],
                            n_inner=shape["d_mlp"], vocab_size=shape["vocab"], n_positions=n_ctx)  # fmt: skip
    return T.Gemma2Config(
        num_hidden_layers=shape["layers"], hidden_size=shape["d_model"], num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv"], head_dim=shape["d_head"], intermediate_size=shape["d_mlp"],
        vocab_size=shape["vocab"], max_position_embeddings=n_ctx, query_pre_attn_scalar=shape["d_head"],
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=4096,
    )  # fmt: skip


def build(shape: dict[str, Any], device: torch.device, n_ctx: int) -> tuple[Any, Any]:
    """A random model made directly on the device, and random TopK SAEs at every checkpoint."""
    import transformers as T

    from qktrace.models import Model
    from qktrace.saes import SAE, SAESet

    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.manual_seed(0)
    with torch.device(device):
        hf = T.AutoModelForCausalLM.from_config(config(shape, n_ctx), attn_implementation="eager")
    model = Model(hf.eval(), tokenizer=None, name=f"random-{shape['family']}")
    saes = {}
    d, n = shape["d_model"], shape["d_sae"]
    for c in range(shape["layers"] + 1):
        g = torch.Generator(device=device).manual_seed(c)
        W_dec = torch.randn(n, d, generator=g, device=device)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        b_enc = 0.01 * torch.randn(n, generator=g, device=device)
        # W_enc is a transposed view of W_dec: one copy of the weights per SAE
        saes[c] = SAE(c, "topk", W_dec.T, b_enc, W_dec, torch.zeros(d, device=device), k=shape["k"])
    return model, SAESet(saes)


def measure(device: torch.device, fn: Callable[[], Any]) -> tuple[Any, dict[str, Any]]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    try:
        out = fn()
    except torch.OutOfMemoryError:
        return None, {"status": "oom"}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    stats: dict[str, Any] = {"status": "ok", "wall_s": round(time.perf_counter() - t, 4)}
    if device.type == "cuda":
        stats["peak_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 3)
    return out, stats


def run_shape(name: str, shape: dict[str, Any], tokens: list[int], full_upto: int, device: torch.device) -> None:
    from qktrace import Tracer

    model, saes = build(shape, device, max(tokens))
    tracer = Tracer(model, saes)
    emit = lambda step, n, stats, **kw: print(
        json.dumps({"shape": name, "tokens": n, "step": step, **stats, **kw}), flush=True
    )  # noqa: E501, E731
    for n in tokens:
        if not one_length(name, shape, model, saes, tracer, n, full_upto, device, emit):
            break
        if device.type == "cuda":
            torch.cuda.empty_cache()


def one_length(
    name: str, shape: dict[str, Any], model: Any, saes: Any, tracer: Any, n: int, full_upto: int,
    device: torch.device, emit: Callable[..., None],
) -> bool:  # fmt: skip
    """Every step at one prompt length; False when the trace itself did not fit."""
    from qktrace.graph import build_graph

    ids = torch.randint(shape["vocab"], (n,), generator=torch.Generator().manual_seed(n), device="cpu")
    traced, stats = measure(device, lambda: tracer.run(ids))
    emit("trace", n, stats, trace_gb=round(traced.trace.nbytes / 1e9, 3) if traced is not None else None)
    if traced is None:
        return False
    att, stats = measure(device, lambda: traced.qk(model.n_layers // 2, 0, -1))
    emit("qk_row", n, stats, terms=att.terms.numel() if att is not None else None,
         max_rel_error=att.max_relative_error() if att is not None else None)  # fmt: skip
    del att
    graph, stats = measure(device, lambda: build_graph(model, saes, traced.trace, mode="target", progress=False))
    emit("graph_target", n, stats, edges=graph.n_edges if graph is not None else None)
    if n <= full_upto:
        budget = 20 * 10**9 if shape["family"] == "gemma2" and device.type == "cuda" else None
        graph, stats = measure(
            device, lambda: build_graph(model, saes, traced.trace, max_memory=budget, progress=False)
        )
        emit("graph_full", n, stats, edges=graph.n_edges if graph is not None else None, max_memory=budget)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), help="one shape, in this process (default: each in its own)")
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--full-upto", type=int, default=256, help="build full graphs up to this many tokens")
    ap.add_argument("--cap-gb", type=float, default=80.0)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU: checks this script only")
    args = ap.parse_args()
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"status": "skipped", "reason": "no CUDA GPU visible (use --cpu-smoke to check the script)"}))
        return
    tokens = [int(t) for t in args.tokens.split(",")]
    if args.cpu_smoke:
        tokens = [t for t in tokens if t <= 256]
    if args.shape is None:
        for name in SHAPES:
            cmd = [sys.executable, __file__, "--shape", name, "--tokens", ",".join(map(str, tokens)),
                   "--full-upto", str(args.full_upto), "--cap-gb", str(args.cap_gb)]  # fmt: skip
            subprocess.run(cmd + (["--cpu-smoke"] if args.cpu_smoke else []), check=False)
        return
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gb * 1e9 / total), device)
        print(json.dumps({"device": torch.cuda.get_device_name(device), "total_gb": round(total / 1e9, 1),
                          "cap_gb": args.cap_gb, "torch": torch.__version__}), flush=True)  # fmt: skip
    shape = (SMOKE if args.cpu_smoke else SHAPES)[args.shape]
    run_shape(args.shape, shape, tokens, args.full_upto, device)


if __name__ == "__main__":
    main()
