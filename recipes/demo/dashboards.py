"""Feature dashboards and labels for the demo SAEs: one use of `qktrace.jobs.dashboards`.

    python -m recipes.demo.dashboards [--model DIR] [--saes DIR] [--docs N] [--workers N]

The corpus is a sample of the training distribution (held-out seed), one 128-token chunk per document;
labels use the demo world's token categories (names, titles, option letters, English and French words,
fact values) on top of the generic ones. `dashboards.json` and `labels.json` are written beside each
SAE's `cfg.json`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from qktrace.config import DEMO_MODEL, DEMO_SAES
from qktrace.jobs.dashboards import DashboardOptions, build_dashboards, token_kind
from qktrace.tracer import Tracer

from .corpus import LETTERS, training_documents
from .world import ALL_NAMES, ANTONYMS_EN, ANTONYMS_FR, FACTS, TITLES

# 8 contexts of 8 tokens before and 1 after; 24 activations per label; 5 output tokens
OPTIONS = DashboardOptions(
    seq_len=128, max_chunks_per_doc=1, n_contexts=8, before=8, after=1, label_pool=24, n_out=5, docs_per_shard=128
)

_NAMES = set(ALL_NAMES)
_TITLES = {t.rstrip(".") for t in TITLES}
_EN = {w for p in ANTONYMS_EN for w in p}
_FR = {w for p in ANTONYMS_FR for w in p} - _EN
_VALUES = {f.value for f in FACTS}


def demo_kind(s: str) -> str | None:
    """Category of a decoded token in the demo world, used by labels when no single token dominates."""
    w = s.strip()
    if w in _NAMES:
        return "name"
    if w.rstrip(".") in _TITLES:
        return "title"
    if w.isdigit():
        return "number"
    if w in LETTERS and s == w:
        return "option letter"
    if w in _FR:
        return "French word"
    if w in _EN:
        return "English word"
    if w in _VALUES:
        return "fact value"
    return token_kind(s)


def write_corpus(path: Path, seed: int, n_docs: int, seq_len: int = 128) -> Path:
    """Seeded training-distribution documents (long enough for a full chunk) as JSONL."""
    docs = training_documents(seed, n_docs, min_chars=int(seq_len * 4.6))
    path.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs))
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=DEMO_MODEL)
    ap.add_argument("--saes", type=Path, default=DEMO_SAES)
    ap.add_argument("--out", type=Path, default=None, help="write here instead of beside the SAEs")
    ap.add_argument("--docs", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    model = "demo" if args.model == DEMO_MODEL else str(args.model)  # what dashboards.json names the model
    tracer = Tracer.load(model, args.saes) if args.workers == 1 else None
    with tempfile.TemporaryDirectory() as tmp:
        corpus = write_corpus(Path(tmp) / "corpus.jsonl", args.seed + 40_000, args.docs)
        result = build_dashboards(
            tracer if tracer is not None else model,
            None if tracer is not None else str(args.saes),
            corpus,
            Path(tmp) / "out",
            workers=args.workers,
            options=OPTIONS,
            kind=demo_kind,
            device="cpu",
        )
        for c, folder in result.folders.items():
            dest = (args.out or args.saes) / folder.name
            dest.mkdir(parents=True, exist_ok=True)
            for name in ("dashboards.json", "labels.json"):
                shutil.copyfile(folder / name, dest / name)
            labels = json.loads((folder / "labels.json").read_text())
            common = Counter(v for v in labels.values() if v != "dead").most_common(6)
            print(f"checkpoint {c}: {result.n_alive[c]}/{len(labels)} alive; common labels {common}", flush=True)
    print(f"{result.n_tokens:,} tokens; done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
