"""A tiny model, SAEs of every architecture and a small corpus on disk, for dashboards and batch tests."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from qktrace.saes import SAE, save_sae_lens
from qktrace.testing import make_tiny_model, random_prompt

# checkpoint -> (hook, architecture): the tiny llama has 2 layers, so checkpoints 0, 1 and 2 (= resid_post of 1)
SAES = {
    0: ("blocks.0.hook_resid_pre", "topk"),
    1: ("blocks.1.hook_resid_pre", "standard"),
    2: ("blocks.1.hook_resid_post", "jumprelu"),
}


@dataclass(frozen=True)
class Setup:
    model: Path
    saes: Path
    corpus: Path


def write_saes(root: Path, d_model: int = 32, d_sae: int = 48, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    for c, (hook, arch) in SAES.items():
        W = torch.randn(d_model, d_sae, generator=g)
        sae = SAE(
            checkpoint=c,
            architecture=arch,
            W_enc=W,
            b_enc=0.3 * torch.randn(d_sae, generator=g),
            W_dec=0.3 * W.T.contiguous(),
            b_dec=0.1 * torch.randn(d_model, generator=g),
            threshold=torch.rand(d_sae, generator=g) if arch == "jumprelu" else None,
            k=6 if arch == "topk" else None,
            apply_b_dec_to_input=arch == "standard",
            hook_name=hook,
        )
        save_sae_lens(sae, root / hook)
    return root


def write_corpus(path: Path, n_docs: int = 30, seed: int = 0) -> Path:
    """Documents of 3..40 words (some longer than one chunk in the tests), as JSONL."""
    lines = [json.dumps({"text": random_prompt(3 + (7 * i + seed) % 38, seed=seed + i)}) for i in range(n_docs)]
    path.write_text("\n".join(lines) + "\n")
    return path


def make_setup(root: Path) -> Setup:
    return Setup(
        model=make_tiny_model("llama", root / "model", seed=3),
        saes=write_saes(root / "saes"),
        corpus=write_corpus(root / "corpus.jsonl"),
    )


def tree(root: Path) -> dict[str, bytes]:
    """Every file under `root` (relative path -> bytes)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
