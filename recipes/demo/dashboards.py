"""Feature dashboards and automatic labels for the demo SAEs.

    python -m qktrace.demo.dashboards [--model DIR] [--saes DIR] [--docs N]

For every feature of every checkpoint's SAE: the top activating contexts on a sample of the training
distribution (short token windows with the index of the activating token), activation frequency,
top output tokens through the unembedding (W_dec row -> final norm weight -> lm_head), and a short
label derived from what it fires on. Writes `labels.json` ({"<feature>": "label"}) into each SAE
folder and one compact `dashboards.json` per checkpoint next to it.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from ..models import load_model
from ..saes import SAE, load_saes
from .corpus import LETTERS
from .train_saes import ASSETS, collect, corpus_blocks, hook_name
from .world import ALL_NAMES, ANTONYMS_EN, ANTONYMS_FR, FACTS, TITLES

N_CONTEXTS, BEFORE, AFTER, LABEL_POOL = 8, 8, 1, 24


def token_kind(s: str) -> str | None:
    """Coarse category of a decoded token, used for labels when no single token dominates."""
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
    if w and not any(ch.isalnum() for ch in w):
        return "punctuation"
    return None


_NAMES = set(ALL_NAMES)
_TITLES = {t.rstrip(".") for t in TITLES}
_EN = {w for p in ANTONYMS_EN for w in p}
_FR = {w for p in ANTONYMS_FR for w in p} - _EN
_VALUES = {f.value for f in FACTS}


def _show(s: str) -> str:
    return s.replace("\n", "\\n").strip() or repr(s)


def auto_label(cur: list[str], prev: list[str]) -> str:
    """Short label from the activating tokens and the tokens just before them (strongest first)."""
    if not cur:
        return "dead"
    ((c1, nc),) = Counter(cur).most_common(1)
    ((p1, np_),) = Counter(prev).most_common(1)
    fc, fp = nc / len(cur), np_ / len(prev)
    if fc >= 0.6 and fp >= 0.6:
        return f"{_show(p1)} {_show(c1)}"
    if fc >= 0.6:
        return f"'{_show(c1)}'" if fp < 0.3 else f"'{_show(c1)}' (after {_show(p1)})"
    kinds = Counter(token_kind(s) for s in cur)
    ((k1, nk),) = kinds.most_common(1)
    pkinds = Counter(token_kind(s) for s in prev)
    ((pk1, npk),) = pkinds.most_common(1)
    if fp >= 0.6:
        return f"{_show(p1)}→(next)" if k1 is None or nk / len(cur) < 0.6 else f"{k1} after '{_show(p1)}'"
    if k1 is not None and nk / len(cur) >= 0.6:
        return k1 if pk1 is None or npk / len(prev) < 0.6 else f"{k1} after {pk1}"
    if pk1 is not None and npk / len(prev) >= 0.6:
        return f"after {pk1}"
    top = [_show(t) for t, _ in Counter(cur).most_common(2)]
    return "/".join(top)


@torch.no_grad()
def build(
    sae: SAE,
    hook: str,
    acts: torch.Tensor,
    blocks: torch.Tensor,
    vocab: list[str],
    unembed: tuple[torch.Tensor, torch.Tensor],
) -> tuple[dict[str, str], dict[str, object]]:
    """(labels, dashboard) for `sae` (encoded as tracing encodes it) on residuals `acts` [n_tokens, d_model]."""
    d_sae, n_tok = sae.W_dec.shape[0], len(acts)
    k = sae.k if sae.k is not None else d_sae  # TopK: its k; other architectures: every feature
    val, idx = sae.encode(acts).topk(k, dim=-1)
    seq = blocks.shape[1] - 1  # BOS excluded from acts
    flat_v, flat_f = val.flatten().numpy(), idx.flatten().numpy()
    flat_p = np.repeat(np.arange(n_tok), idx.shape[1])
    keep = flat_v > 0
    flat_v, flat_f, flat_p = flat_v[keep], flat_f[keep], flat_p[keep]
    order = np.lexsort((-flat_v, flat_f))  # by feature, then activation descending
    flat_v, flat_f, flat_p = flat_v[order], flat_f[order], flat_p[order]
    starts = np.searchsorted(flat_f, np.arange(d_sae + 1))
    out_logits = (sae.W_dec * unembed[0]) @ unembed[1].T  # [d_sae, vocab]
    top_out = out_logits.topk(5, dim=-1).indices.tolist()
    labels: dict[str, str] = {}
    feats: dict[str, object] = {}
    for f in range(d_sae):
        lo, hi = int(starts[f]), int(starts[f + 1])
        if hi == lo:
            labels[str(f)] = "dead"
            continue
        ctxs: list[dict[str, object]] = []
        cur: list[str] = []
        prev: list[str] = []
        for j in range(lo, min(hi, lo + LABEL_POOL)):
            p = int(flat_p[j])
            row, col = divmod(p, seq)
            col += 1  # position in the block (BOS at 0)
            cur.append(vocab[int(blocks[row, col])])
            prev.append(vocab[int(blocks[row, col - 1])])
            if len(ctxs) < N_CONTEXTS:
                a, b = max(0, col - BEFORE), min(blocks.shape[1], col + AFTER + 1)
                ctxs.append(
                    {
                        "tokens": [vocab[int(t)] for t in blocks[row, a:b]],
                        "i": col - a,
                        "act": round(float(flat_v[j]), 3),
                    }
                )
        labels[str(f)] = auto_label(cur, prev)
        feats[str(f)] = {
            "label": labels[str(f)],
            "freq": round((hi - lo) / n_tok, 5),
            "max_act": round(float(flat_v[lo]), 3),
            "top_out": [vocab[t] for t in top_out[f]],
            "contexts": ctxs,
        }
    dash = {
        "checkpoint": sae.checkpoint,
        "hook_name": hook,
        "n_tokens": n_tok,
        "d_sae": d_sae,
        "k": k,
        "n_alive": len(feats),
        "features": feats,
    }
    return labels, dash


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=ASSETS / "model")
    ap.add_argument("--saes", type=Path, default=ASSETS / "saes")
    ap.add_argument("--docs", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    loaded = load_model(args.model)  # the user path: the same model and SAE objects that tracing uses
    model, tokenizer, n_layers = loaded.hf, loaded.tokenizer, loaded.n_layers
    saes = load_saes(args.saes, loaded)
    vocab = [tokenizer.decode([i]) for i in range(len(tokenizer))]
    unembed = (model.model.norm.weight.detach(), model.lm_head.weight.detach())
    blocks = corpus_blocks(tokenizer, args.seed + 40_000, args.docs)
    acts = collect(model, blocks)
    for c in saes.checkpoints:
        sae_dir = args.saes / hook_name(c, n_layers)
        labels, dash = build(saes[c], hook_name(c, n_layers), acts[c], blocks, vocab, unembed)
        (sae_dir / "labels.json").write_text(json.dumps(labels, ensure_ascii=False, indent=0) + "\n")
        (sae_dir / "dashboards.json").write_text(json.dumps(dash, ensure_ascii=False, separators=(",", ":")))
        common = Counter(v for v in labels.values() if v != "dead").most_common(6)
        print(f"checkpoint {c}: {dash['n_alive']}/{dash['d_sae']} alive; common labels {common}", flush=True)
    print(f"done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
