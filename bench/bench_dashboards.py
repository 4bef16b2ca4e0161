"""Feature-dashboard throughput: tokens/s, scaling with workers, and peak memory per worker.

  demo: the embedded demo model and its 5 SAEs over demo-corpus documents (`--docs`, in 128-token chunks),
        with 1 worker (this process, 2 torch threads) and with 2 Ray workers (a local runtime with 2 CPUs:
        1 CPU each). Prints the scaling of 2 workers over 1.
  gpu:  a GPT-2-small-shaped random model (12 layers, d_model 768, 12 heads, vocab 50257, a word-level
        tokenizer over its vocabulary) with random TopK SAEs (24576 wide, k=64) at `--gpu-checkpoints`
        checkpoints, over random text; 1 worker, and one per GPU when there are several. Skipped without CUDA.

tokens/s counts the tokens the SAEs read (BOS excluded) over the shard phase only: after every worker has
loaded its replica, before the merge. `wall` includes start-up (Ray, loading) and the merge. Peak RSS is
the run's process (1 worker: driver and worker are one) or each Ray worker's (VmHWM, sampled from /proc
while it runs) and the driver's. Each configuration runs in its own process.

Not a test: `python bench/bench_dashboards.py [--quick] [--part demo|gpu|all]`, from the repository root.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _ray_worker_peaks(stop: threading.Event, peaks: dict[int, int]) -> None:
    """Sample VmHWM (peak RSS, kB) of every Ray worker process holding a qktrace worker."""
    while not stop.is_set():
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                if b"_RayWorker" not in cmd:
                    continue
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peaks[int(pid)] = max(peaks.get(int(pid), 0), int(line.split()[1]))
            except OSError:
                continue
        stop.wait(0.5)


def gpu_model(root: Path, vocab: int = 50257) -> Path:
    """A random GPT-2-small-shaped model with a word-level tokenizer over its whole vocabulary, on disk."""
    import torch
    import transformers as T
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = {"<bos>": 0} | {f"t{i}": i for i in range(1, vocab)}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="t1"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    torch.manual_seed(0)
    cfg = T.GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=vocab, bos_token_id=0)
    T.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").save_pretrained(root)
    T.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>").save_pretrained(root)
    return root


def gpu_saes(root: Path, checkpoints: list[int], d_model: int = 768, d_sae: int = 24576, k: int = 64) -> Path:
    import torch

    from qktrace.saes import SAE, save_sae_lens

    for c in checkpoints:
        g = torch.Generator().manual_seed(c)
        W_dec = torch.randn(d_sae, d_model, generator=g)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        hook = f"blocks.{c}.hook_resid_pre" if c < 12 else "blocks.11.hook_resid_post"
        b_enc = 0.01 * torch.randn(d_sae, generator=g)
        sae = SAE(c, "topk", W_dec.T.contiguous(), b_enc, W_dec, torch.zeros(d_model), k=k, hook_name=hook)
        save_sae_lens(sae, root / hook)
    return root


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    """One configuration, in this process: build the inputs, run build_dashboards, measure."""
    import torch

    from qktrace.jobs.dashboards import DashboardOptions, build_dashboards

    tmp = Path(tempfile.mkdtemp(prefix="bench-dash-"))
    if args.run == "demo":
        sys.path.insert(0, str(ROOT))
        from recipes.demo.dashboards import OPTIONS, demo_kind, write_corpus

        corpus = write_corpus(tmp / "corpus.jsonl", 50_000, args.docs)
        model, saes, device, kind = "demo", None, "cpu", demo_kind
        options = dataclasses.replace(OPTIONS, max_chunks_per_doc=None, docs_per_shard=args.docs_per_shard)
        torch.set_num_threads(2 if args.workers == 1 else 1)
    else:
        checkpoints = [int(c) for c in args.gpu_checkpoints.split(",")]
        model, saes = str(gpu_model(tmp / "model")), str(gpu_saes(tmp / "saes", checkpoints))
        g = torch.Generator().manual_seed(0)
        docs = torch.randint(1, 50257, (args.docs, 1000), generator=g)
        (tmp / "corpus.jsonl").write_text(
            "".join(json.dumps({"text": " ".join(f"t{int(t)}" for t in d)}) + "\n" for d in docs)
        )
        corpus, device, kind = tmp / "corpus.jsonl", "cuda", None
        options = DashboardOptions(seq_len=1024, batch_tokens=args.batch_tokens, docs_per_shard=args.docs_per_shard)
    last: list[Any] = []
    stop, peaks = threading.Event(), {}  # type: ignore[var-annotated]
    sampler = threading.Thread(target=_ray_worker_peaks, args=(stop, peaks), daemon=True)
    sampler.start()
    if args.workers > 1 and device == "cpu":
        import ray

        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    t0 = time.perf_counter()
    result = build_dashboards(
        model,
        saes,
        corpus,
        tmp / "out",
        workers=args.workers,
        options=options,
        kind=kind,
        device=device,
        progress=last.append,
    )
    wall = time.perf_counter() - t0
    stop.set()
    p = last[-1]
    out = {
        "part": args.run,
        "workers": args.workers,
        "device": device,
        "tokens": result.n_tokens,
        "shard_seconds": round(p.seconds, 2),
        "tokens_per_s": round(p.tokens_per_s, 1),
        "wall_s": round(wall, 2),
        "peak_rss_driver_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "peak_rss_workers_gb": [round(v / 2**20, 3) for v in peaks.values()],
    }
    if device == "cuda":
        out["peak_cuda_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3) if args.workers == 1 else None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["demo", "gpu", "all"], default="all")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: check that it runs")
    ap.add_argument("--docs", type=int, default=None)
    ap.add_argument("--docs-per-shard", type=int, default=None)
    ap.add_argument("--batch-tokens", type=int, default=16384)
    ap.add_argument("--gpu-checkpoints", default="0,4,8,12")
    ap.add_argument("--run", choices=["demo", "gpu"], help=argparse.SUPPRESS)
    ap.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run:
        print(json.dumps(run_one(args)), flush=True)
        return
    configs: list[tuple[str, int, int, int]] = []  # (part, workers, docs, docs per shard)
    if args.part in ("demo", "all"):
        docs = args.docs or (24 if args.quick else 2000)
        per = args.docs_per_shard or (6 if args.quick else 100)
        configs += [("demo", 1, docs, per), ("demo", 2, docs, per)]
    if args.part in ("gpu", "all"):
        import torch

        if not torch.cuda.is_available():
            print("gpu: skipped (no CUDA device)")
        else:
            docs = args.docs or (8 if args.quick else 512)
            per = args.docs_per_shard or (4 if args.quick else 64)
            configs += [("gpu", n, docs, per) for n in sorted({1, torch.cuda.device_count()})]
    results = []
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    for part, workers, docs, per in configs:
        cmd = [sys.executable, __file__, "--run", part, "--workers", str(workers), "--docs", str(docs)]
        cmd += ["--docs-per-shard", str(per), "--batch-tokens", str(args.batch_tokens)]
        cmd += ["--gpu-checkpoints", args.gpu_checkpoints]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
        if proc.returncode != 0 or not lines:
            print(f"{part} x{workers}: failed\n{proc.stderr[-3000:]}")
            continue
        results.append(json.loads(lines[-1]))
        print(json.dumps(results[-1]), flush=True)
    for part in ("demo", "gpu"):
        rates = {r["workers"]: r["tokens_per_s"] for r in results if r["part"] == part}
        if 1 in rates and len(rates) > 1:
            n = max(rates)
            print(f"{part}: {n} workers / 1 worker = {rates[n] / rates[1]:.2f}x tokens/s")


if __name__ == "__main__":
    main()
