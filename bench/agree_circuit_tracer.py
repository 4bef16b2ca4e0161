"""qktrace's plain transcoder graph against circuit-tracer 0.5.0's `attribute()`, edge for edge, and their speed.

For a random GPT-2-shaped and a random Llama-shaped model (saved with HF's save_pretrained) with random ReLU
per-layer transcoders (saved as a circuit-tracer transcoder set: config.yaml + layer_L.safetensors), both
tools build the unpruned graph of the same token ids (BOS first) on the CPU. circuit-tracer runs in its own
environment (it pins transformers <= 4.57.3), as a subprocess (`bench/ct_side.py`), and hands its graph
back as a .pt file. Printed per model and prompt length:

  jaccard      node-set Jaccard of the active features (layer, position, feature)
  acts         largest relative difference of the activations of shared features
  pearson      Pearson correlation of every edge either tool holds, over the shared nodes
  max_rel      largest |qk - ct| / |ct| over edges with |ct| >= 1e-4 * max |ct|
  max_abs      largest |qk - ct| / max |ct| over every edge
  speed        circuit-tracer's attribute() seconds / qktrace's transcoder_graph() seconds (best of --repeat)

Targets: jaccard 1.0, pearson >= 0.9999, max_rel <= 1e-4; speed >= 10x.

Not a test (it needs a second stack). Build circuit-tracer's environment once with `bench/ct_env.sh DIR`, then

  python bench/agree_circuit_tracer.py --ct DIR [--tokens 16,32] [--repeat 3] [--threads 2] [--dtype float64]

--dtype float64 runs both tools in float64 (weights, activations and backward passes), which shows how much
of max_rel is float32 rounding rather than a difference in what they compute.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from qktrace.graph.replacement import TranscoderGraph, transcoder_graph
from qktrace.models import load_model
from qktrace.saes import load_transcoders
from qktrace.testing import make_tiny_model, random_prompt

SHAPES = {  # HF config overrides: 4 layers, d_model 64, 4 heads (Llama: 2 kv heads)
    "gpt2": dict(n_layer=4, n_embd=64, n_head=4, n_inner=256),
    "llama": dict(
        num_hidden_layers=4, hidden_size=64, num_attention_heads=4, intermediate_size=256, attention_bias=False
    ),  # TransformerLens's Llama converter has no q/k/v/o biases
}
D_SAE = 1024


def input_norms(model) -> list[float]:  # type: ignore[no-untyped-def]
    """The mean norm of each layer's residual after attention (what hook_resid_mid transcoders read)."""
    trace = model.run(random_prompt(32))
    return [float((trace.resid[i + 1] - trace.mlp_out[i]).norm(dim=-1).mean()) for i in range(model.n_layers)]


def write_transcoders(folder: Path, d: int, norms: list[float], seed: int) -> None:
    """Random ReLU PLTs reading hook_resid_mid, writing hook_mlp_out: pre-activations ~ N(-2.2, 1), so about
    1.5% of the features are active at a position."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.joinpath("config.yaml").write_text(
        'model_kind: "transcoder_set"\nfeature_input_hook: "hook_resid_mid"\nfeature_output_hook: "hook_mlp_out"\n'
    )
    g = torch.Generator().manual_seed(seed)
    for layer, norm in enumerate(norms):
        w = {
            "W_enc": torch.randn(D_SAE, d, generator=g) / norm,
            "W_dec": torch.randn(D_SAE, d, generator=g) * 0.1,
            "b_enc": -2.2 + 0.1 * torch.randn(D_SAE, generator=g),
            "b_dec": 0.1 * torch.randn(d, generator=g),
        }
        save_file(w, str(folder / f"layer_{layer}.safetensors"))


def node_keys(g: TranscoderGraph) -> list[tuple]:  # type: ignore[type-arg]
    return [(n.kind.value, n.checkpoint, n.pos, n.index) for n in g.nodes]


def ct_keys(ct: dict, n_layers: int) -> list[tuple]:  # type: ignore[type-arg]
    n_pos = int(ct["input_tokens"].numel())
    feats = [("transcoder", int(l), int(p), int(f)) for l, p, f in ct["active_features"].tolist()]  # noqa: E741
    errs = [("mlp_error", layer, p, -1) for layer in range(n_layers) for p in range(n_pos)]
    toks = [("token", 0, p, int(t)) for p, t in enumerate(ct["input_tokens"].tolist())]
    logits = [("logit", n_layers, n_pos - 1, int(t)) for t in ct["logit_tokens"].tolist()]
    return feats + errs + toks + logits


def compare(g: TranscoderGraph, ct: dict, n_layers: int) -> dict[str, float]:
    """Node-set Jaccard of the features; activations and edges over the nodes both graphs hold."""
    ours, theirs = node_keys(g), ct_keys(ct, n_layers)
    f_ours = {k for k in ours if k[0] == "transcoder"}
    f_theirs = {k for k in theirs if k[0] == "transcoder"}
    shared = [k for k in ours if k in set(theirs)]
    oi = torch.tensor([ours.index(k) for k in shared])
    where = {k: i for i, k in enumerate(theirs)}
    ti = torch.tensor([where[k] for k in shared])
    a = g.adjacency[oi][:, oi].double()
    b = ct["adjacency"][ti][:, ti].double()
    held = (a != 0) | (b != 0)
    x, y = a[held], b[held]
    big = y.abs() >= 1e-4 * y.abs().max()
    nf = min(len(f_ours & f_theirs), g.n_features)
    act_ours = g.features.act[oi[:nf]].double()
    act_theirs = ct["activation_values"][ti[:nf]].double()
    return {
        "jaccard": len(f_ours & f_theirs) / max(len(f_ours | f_theirs), 1),
        "features": len(f_ours),
        "edges": int(held.sum()),
        "acts": float(((act_ours - act_theirs).abs() / act_theirs.abs()).max()),
        "pearson": float(torch.corrcoef(torch.stack([x, y]))[0, 1]),
        "max_rel": float(((x - y).abs()[big] / y.abs()[big]).max()),
        "max_abs": float((x - y).abs().max() / y.abs().max()),
    }


def run_ct(
    ct_dir: Path, model_dir: Path, tc_dir: Path, prompts: list[list[int]], repeat: int, threads: int, dtype: str
) -> list:  # type: ignore[type-arg]
    out = Path(tempfile.mkdtemp()) / "ct.pt"
    ids = ";".join(",".join(map(str, p)) for p in prompts)
    script = str(Path(__file__).with_name("ct_side.py"))
    cmd = [sys.executable, script, "--model", str(model_dir), "--transcoders", str(tc_dir), "--ids", ids,
           "--out", str(out), "--repeat", str(repeat), "--threads", str(threads), "--dtype", dtype]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ct_dir), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tempfile.gettempdir())
    if done.returncode != 0:
        raise SystemExit(f"circuit-tracer failed:\n{done.stderr[-3000:]}")
    return torch.load(out, weights_only=False)  # type: ignore[no-any-return]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ct", type=Path, required=True, help="circuit-tracer's folder (bench/ct_env.sh)")
    ap.add_argument("--tokens", default="16,32")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default=",".join(SHAPES))
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="both tools' weights and sums")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="agree-ct-"))
    lengths = [int(t) for t in args.tokens.split(",")]
    dtype = getattr(torch, args.dtype)
    for i, (family, shape) in enumerate(SHAPES.items()):
        if family not in args.models.split(","):
            continue
        model_dir = make_tiny_model(family, root / family, seed=11 + i, **shape)
        tc_dir = root / f"{family}-transcoders"
        model = load_model(model_dir, dtype=dtype)
        write_transcoders(tc_dir, model.d_model, input_norms(model), seed=21 + i)
        ts = load_transcoders(tc_dir, model, dtype=dtype)
        g = torch.Generator().manual_seed(5)
        vocab = int(model.anatomy.W_E.shape[0])
        bos = int(model.tokenizer.bos_token_id)
        prompts = [[bos, *torch.randint(3, vocab, (n - 1,), generator=g).tolist()] for n in lengths]
        theirs = run_ct(args.ct, model_dir, tc_dir, prompts, args.repeat, args.threads, args.dtype)
        for n, prompt, ct in zip(lengths, prompts, theirs):
            seconds = []
            for _ in range(args.repeat):
                t = time.perf_counter()
                ours = transcoder_graph(model, ts, prompt)
                seconds.append(time.perf_counter() - t)
            row = {"model": family, "dtype": args.dtype, "tokens": n, **compare(ours, ct, model.n_layers)}
            row |= {"qktrace_s": min(seconds), "circuit_tracer_s": min(ct["seconds"])}
            row["speed"] = row["circuit_tracer_s"] / row["qktrace_s"]
            print("RESULT " + json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
