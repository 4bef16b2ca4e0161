"""qktrace's plain transcoder graph against circuit-tracer 0.5.0's `attribute()`, edge for edge, and their speed.

For a random GPT-2-shaped and a random Llama-shaped model (saved with HF's save_pretrained) with random ReLU
per-layer transcoders (saved as a circuit-tracer transcoder set: config.yaml + layer_L.safetensors), both
tools build the unpruned graph of the same token ids (BOS first) on the CPU. circuit-tracer runs in its own
environment (it pins transformers <= 4.57.3) as a worker process (`bench/ct_side.py`) that runs `attribute()`
when asked, so the two tools alternate run by run under the same load (same thread count, one warm-up run
each, medians over --repeat runs).

Each tool is also compared with a float64 ground truth: qktrace in float64 with every float32 step of the
forward pass made float64 (HF's Llama computes RMSNorm, the rotary angles and the softmax in float32 even in a
float64 model, and qktrace's norm scales follow HF; `honest_float64` patches all four, for the truth only).
Rows, per model, dtype and prompt length (`a` against `b`):

  jaccard      node-set Jaccard of the active features (layer, position, feature)
  acts         largest relative difference of the activations of shared features
  pearson      Pearson correlation of every edge either graph holds, over the shared nodes
  max_rel      strict: largest |a - b| / |b| over edges with |b| >= 1e-4 * max |b| (so near-zero edges, all
               rounding, do not decide it alone)
  row_rel      scale-relative: largest |a - b| / max_j |b[target, j]| (an edge's error against the largest
               edge into the same target)
  max_abs      largest |a - b| / max |b| over every edge

Pairs: qk~ct (the tools against each other), qk~truth, ct~truth. Speed (float32 and float64 rows alike):
circuit-tracer's attribute() median seconds / qktrace's transcoder_graph() median seconds, with every active
feature (both unpruned); `attribute()` runs with batch_size 256, faster on these shapes than its default 512
(--ct-batch). A markdown table of all rows closes the output.
Targets: jaccard 1.0, pearson >= 0.9999, max_rel <= 1e-4; speed >= 10x.

Not a test (it needs a second stack). Build circuit-tracer's environment once with `bench/ct_env.sh DIR`, then

  python bench/agree_circuit_tracer.py --ct DIR [--tokens 16,32] [--repeat 7] [--threads 1] [--dtype both]
      [--ct-batch 256]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from qktrace.graph.replacement import TranscoderGraph, transcoder_graph
from qktrace.models import load_model
from qktrace.models.anatomy import Norm
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


@contextlib.contextmanager
def honest_float64() -> Iterator[None]:
    """Inside: HF's Llama RMSNorm, rotary angles and eager softmax, and qktrace's norm scales, in the input's
    dtype (float64) instead of float32. For the ground truth only; restored on exit."""
    from transformers.models.llama import modeling_llama as ml

    def rms(self, x):  # type: ignore[no-untyped-def]
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    def rotary(self, x, position_ids):  # type: ignore[no-untyped-def]
        dim = self.inv_freq.numel() * 2
        base = self.config.rope_parameters["rope_theta"]
        inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        freqs = position_ids[..., None].double() * inv
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)

    def scale(self, x):  # type: ignore[no-untyped-def]
        var = x.var(-1, unbiased=False) if self.kind == "layernorm" else x.pow(2).mean(-1)
        return torch.rsqrt(var + self.eps)

    softmax = torch.nn.functional.softmax

    def softmax64(x, dim=None, _stacklevel=3, dtype=None):  # type: ignore[no-untyped-def]
        return softmax(x, dim=dim, dtype=None if x.dtype == torch.float64 else dtype)

    saved = (ml.LlamaRMSNorm.forward, ml.LlamaRotaryEmbedding.forward, Norm.scale)
    ml.LlamaRMSNorm.forward, ml.LlamaRotaryEmbedding.forward, Norm.scale = rms, rotary, scale  # type: ignore[method-assign]
    torch.nn.functional.softmax = softmax64
    try:
        yield
    finally:
        ml.LlamaRMSNorm.forward, ml.LlamaRotaryEmbedding.forward, Norm.scale = saved  # type: ignore[method-assign]
        torch.nn.functional.softmax = softmax


def truth_graphs(model_dir: Path, tc_dir: Path, prompts: list[list[int]]) -> list[TranscoderGraph]:
    """qktrace's graphs in honest float64 (see `honest_float64`): the ground truth both tools are held to."""
    with honest_float64():
        model = load_model(model_dir, dtype=torch.float64)
        object.__setattr__(model.anatomy, "softmax_float32", False)  # qktrace's replayed pattern, likewise
        ts = load_transcoders(tc_dir, model, dtype=torch.float64)
        return [transcoder_graph(model, ts, p) for p in prompts]


@dataclasses.dataclass
class Side:
    """One graph as the comparison reads it: node keys, adjacency [target, source], feature activations."""

    keys: list[tuple]  # type: ignore[type-arg]
    adjacency: torch.Tensor
    acts: torch.Tensor  # [feature], in key order

    @staticmethod
    def of_qktrace(g: TranscoderGraph) -> Side:
        keys = [(n.kind.value, n.checkpoint, n.pos, n.index) for n in g.nodes]
        return Side(keys, g.adjacency, g.features.act)

    @staticmethod
    def of_ct(ct: dict, n_layers: int) -> Side:  # type: ignore[type-arg]
        n_pos = int(ct["input_tokens"].numel())
        feats = [("transcoder", int(l), int(p), int(f)) for l, p, f in ct["active_features"].tolist()]  # noqa: E741
        errs = [("mlp_error", layer, p, -1) for layer in range(n_layers) for p in range(n_pos)]
        toks = [("token", 0, p, int(t)) for p, t in enumerate(ct["input_tokens"].tolist())]
        logits = [("logit", n_layers, n_pos - 1, int(t)) for t in ct["logit_tokens"].tolist()]
        return Side(feats + errs + toks + logits, ct["adjacency"], ct["activation_values"])


def compare(a: Side, b: Side) -> dict[str, float]:
    """`a` against `b` (the reference): node-set Jaccard of the features; activations and edges over the nodes
    both graphs hold (see the module docstring for each measure)."""
    fa = {k for k in a.keys if k[0] == "transcoder"}
    fb = {k for k in b.keys if k[0] == "transcoder"}
    where = {k: i for i, k in enumerate(b.keys)}
    shared = [(i, where[k]) for i, k in enumerate(a.keys) if k in where]
    ai = torch.tensor([i for i, _ in shared])
    bi = torch.tensor([j for _, j in shared])
    x = a.adjacency[ai][:, ai].double()
    y = b.adjacency[bi][:, bi].double()
    held = (x != 0) | (y != 0)
    big = y.abs() >= 1e-4 * y.abs().max()
    row_scale = y.abs().amax(1, keepdim=True).expand_as(y)
    feat = torch.tensor([a.keys[i][0] == "transcoder" for i, _ in shared])
    act_a, act_b = a.acts[ai[feat]].double(), b.acts[bi[feat]].double()
    diff = (x - y).abs()
    return {
        "jaccard": len(fa & fb) / max(len(fa | fb), 1),
        "features": len(fa),
        "edges": int(held.sum()),
        "acts": float(((act_a - act_b).abs() / act_b.abs()).max()),
        "pearson": float(torch.corrcoef(torch.stack([x[held], y[held]]))[0, 1]),
        "max_rel": float((diff[big] / y.abs()[big]).max()),
        "row_rel": float((diff[held] / row_scale[held]).max()),
        "max_abs": float(diff.max() / y.abs().max()),
    }


class CircuitTracer:
    """circuit-tracer's worker (`bench/ct_side.py` in its own environment), asked for one run at a time."""

    def __init__(self, ct_dir: Path, model_dir: Path, tc_dir: Path, prompts: list[list[int]], threads: int,
                 dtype: str, batch_size: int) -> None:  # fmt: skip
        ids = ";".join(",".join(map(str, p)) for p in prompts)
        script = str(Path(__file__).with_name("ct_side.py"))
        cmd = [sys.executable, script, "--model", str(model_dir), "--transcoders", str(tc_dir), "--ids", ids,
               "--threads", str(threads), "--dtype", dtype, "--batch-size", str(batch_size)]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(ct_dir), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed with the worker)
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, cwd=tempfile.gettempdir())  # fmt: skip

    def ask(self, line: str) -> dict:  # type: ignore[type-arg]
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        for out in self.proc.stdout:
            if out.startswith("CT "):
                return json.loads(out[3:])  # type: ignore[no-any-return]
        self.log.seek(0)
        raise SystemExit(f"circuit-tracer failed:\n{self.log.read().decode()[-3000:]}")

    def graph(self, i: int) -> dict:  # type: ignore[type-arg]
        path = Path(tempfile.mkdtemp()) / "ct.pt"
        self.ask(f"save {i} {path}")
        return torch.load(path, weights_only=False)  # type: ignore[no-any-return]

    def close(self) -> None:
        with contextlib.suppress(BrokenPipeError):
            self.proc.communicate("quit\n", timeout=60)
        self.log.close()


def timed(model, ts, prompt: list[int]) -> tuple[TranscoderGraph, float]:  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    g = transcoder_graph(model, ts, prompt)
    return g, time.perf_counter() - t


def race(ct: CircuitTracer, model, ts, i: int, prompt: list[int], repeat: int) -> tuple:  # type: ignore[no-untyped-def, type-arg]
    """One warm-up each, then `repeat` alternating runs: (qktrace's graph, both median seconds)."""
    ct.ask(f"run {i}")
    timed(model, ts, prompt)
    ct_s, qk_s = [], []
    for _ in range(repeat):
        ct_s.append(ct.ask(f"run {i}")["seconds"])
        g, sec = timed(model, ts, prompt)
        qk_s.append(sec)
    return g, statistics.median(qk_s), statistics.median(ct_s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ct", type=Path, required=True, help="circuit-tracer's folder (bench/ct_env.sh)")
    ap.add_argument("--tokens", default="16,32")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1, help="both tools' torch threads (1: robust on a shared machine)")
    ap.add_argument("--models", default=",".join(SHAPES))
    ap.add_argument(
        "--ct-batch", type=int, default=256, help="attribute()'s batch_size (its default 512 is slower here)"
    )
    ap.add_argument(
        "--dtype", default="both", choices=["float32", "float64", "both"], help="both tools' weights and sums"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="agree-ct-"))
    lengths = [int(t) for t in args.tokens.split(",")]
    dtypes = ["float32", "float64"] if args.dtype == "both" else [args.dtype]
    rows: list[dict] = []  # type: ignore[type-arg]
    for i, (family, shape) in enumerate(SHAPES.items()):
        if family not in args.models.split(","):
            continue
        model_dir = make_tiny_model(family, root / family, seed=11 + i, **shape)
        tc_dir = root / f"{family}-transcoders"
        write_transcoders(tc_dir, shape_d(model_dir), input_norms(load_model(model_dir)), seed=21 + i)
        g = torch.Generator().manual_seed(5)
        model = load_model(model_dir)
        vocab, bos = int(model.anatomy.W_E.shape[0]), int(model.tokenizer.bos_token_id)
        prompts = [[bos, *torch.randint(3, vocab, (n - 1,), generator=g).tolist()] for n in lengths]
        truth = [Side.of_qktrace(t) for t in truth_graphs(model_dir, tc_dir, prompts)]
        for dtype in dtypes:
            model = load_model(model_dir, dtype=getattr(torch, dtype))
            ts = load_transcoders(tc_dir, model, dtype=getattr(torch, dtype))
            ct = CircuitTracer(args.ct, model_dir, tc_dir, prompts, args.threads, dtype, args.ct_batch)
            for k, (n, prompt) in enumerate(zip(lengths, prompts)):
                ours, qk_s, ct_s = race(ct, model, ts, k, prompt, args.repeat)
                qk, theirs = Side.of_qktrace(ours), Side.of_ct(ct.graph(k), model.n_layers)
                row: dict[str, object] = {"model": family, "dtype": dtype, "tokens": n}
                row |= {"qk~ct": compare(qk, theirs), "qk~truth": compare(qk, truth[k]),
                        "ct~truth": compare(theirs, truth[k])}  # fmt: skip
                row |= {"qktrace_s": qk_s, "circuit_tracer_s": ct_s, "speed": ct_s / qk_s}
                print("RESULT " + json.dumps(row), flush=True)
                rows.append(row)
            ct.close()
    print(table(rows))


def table(rows: list[dict]) -> str:  # type: ignore[type-arg]
    """The RESULT rows as a markdown table: per pair jaccard / pearson / max_rel / row_rel, then the speed."""
    pairs = ("qk~ct", "qk~truth", "ct~truth")
    head = ["model", "dtype", "tokens", "features", *pairs, "qktrace ms", "circuit-tracer ms", "speed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], r["dtype"], str(r["tokens"]), str(r["qk~ct"]["features"])]
        for p in pairs:
            c = r[p]
            cells.append(f"{c['jaccard']:.3g} / {1 - c['pearson']:.0e} / {c['max_rel']:.1e} / {c['row_rel']:.1e}")
        cells += [f"{r['qktrace_s'] * 1e3:.1f}", f"{r['circuit_tracer_s'] * 1e3:.1f}", f"{r['speed']:.1f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return "pairs: jaccard / 1 - pearson / max_rel (strict) / row_rel (scale-relative)\n" + "\n".join(lines)


def shape_d(model_dir: Path) -> int:
    cfg = json.loads((model_dir / "config.json").read_text())
    return int(cfg.get("n_embd") or cfg["hidden_size"])


if __name__ == "__main__":
    main()
