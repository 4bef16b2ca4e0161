"""Train TopK residual-stream SAEs for the demo model at every checkpoint.

    python -m recipes.demo.train_saes [--model DIR] [--out DIR] [--minutes M]

Residuals come from the library (`qktrace.models.residuals`: forward-pre hooks on the model's blocks;
checkpoint n_layers is the last block's output, before the final norm), over the synthetic training
corpus; the BOS position is excluded (its residual is a huge outlier that would otherwise dominate the
reconstruction loss). Each trained SAE becomes a `qktrace.saes.SAE` and is written by
`qktrace.saes.save_sae_lens` in SAELens format under `blocks.{c}.hook_resid_pre` (or
`blocks.{n_layers-1}.hook_resid_post`); held-out variance explained and L0, measured through
`SAE.encode`/`SAE.decode` (what tracing uses), go to `eval.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qktrace.config import DEMO_MODEL, DEMO_SAES
from qktrace.models import Model, load_model, residuals
from qktrace.saes import SAE, save_sae_lens

from .corpus import training_documents

MODEL_NAME, CONTEXT = "qktrace-demo", 128


def hook_name(c: int, n_layers: int) -> str:
    """SAELens hook name of checkpoint c."""
    return f"blocks.{c}.hook_resid_pre" if c < n_layers else f"blocks.{n_layers - 1}.hook_resid_post"


def corpus_blocks(tokenizer, seed: int, n_docs: int, seq_len: int = 128) -> Tensor:
    """[n_docs, seq_len] token blocks (BOS first) from seeded training-distribution documents."""
    docs = training_documents(seed, n_docs, min_chars=int(seq_len * 4.6))
    rows = [ids[:seq_len] for ids in tokenizer(docs)["input_ids"]]
    rows = [r for r in rows if len(r) == seq_len]
    return torch.tensor(rows, dtype=torch.long)


def collect(model: Model, blocks: Tensor, batch: int = 32) -> Tensor:
    """[checkpoint, n_tokens, d_model] residuals of every non-BOS position, `batch` blocks per forward pass."""
    out = []
    for i in range(0, len(blocks), batch):
        res = residuals(model, blocks[i : i + batch])  # {checkpoint: [batch, pos, d_model]}
        out.append(torch.stack([res[c] for c in sorted(res)])[:, :, 1:].flatten(1, 2))
    return torch.cat(out, dim=1)


class TopKTrainer(nn.Module):
    """The trainable parameters of a TopK SAE and its training forward pass (sparse decode, AuxK needs
    the pre-activations); `to_sae` freezes them into the library's `qktrace.saes.SAE`, whose `encode`
    and `decode` compute the same function densely."""

    def __init__(self, d_in: int, d_sae: int, k: int, mean: Tensor) -> None:
        super().__init__()
        w = torch.randn(d_sae, d_in)
        w = w / w.norm(dim=-1, keepdim=True)
        self.W_dec = nn.Parameter(w)  # [d_sae, d_model]
        self.W_enc = nn.Parameter(w.t().clone())  # [d_model, d_sae]
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(mean.clone())
        self.k = k

    def pre(self, x: Tensor) -> Tensor:
        return x @ self.W_enc + self.b_enc

    def decode_sparse(self, idx: Tensor, val: Tensor) -> Tensor:
        return F.embedding_bag(idx, self.W_dec, per_sample_weights=val, mode="sum") + self.b_dec

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        pre = self.pre(x)
        val, idx = pre.topk(self.k, dim=-1)
        val = val.relu()
        return self.decode_sparse(idx, val), idx, val, pre

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def to_sae(self, checkpoint: int, hook: str) -> SAE:
        """The trained SAE as tracing loads it (no b_dec subtracted from the input, as trained)."""
        w = {n: getattr(self, n).detach().clone() for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
        meta = {"model_name": MODEL_NAME, "prepend_bos": True, "context_size": CONTEXT}
        known = {f.name for f in dataclasses.fields(SAE)}  # SAE fields for SAELens metadata, where it has them
        return SAE(
            checkpoint=checkpoint,
            architecture="topk",
            k=self.k,
            apply_b_dec_to_input=False,
            hook_name=hook,
            **w,
            **{key: v for key, v in meta.items() if key in known},  # type: ignore[arg-type]
        )


def train_sae(
    acts: Tensor,
    d_sae: int,
    k: int,
    steps: int,
    seconds: float,
    seed: int,
    batch: int = 2048,
    lr: float = 2e-3,
    target: Tensor | None = None,
) -> tuple[TopKTrainer, int]:
    """TopK SAE with an AuxK loss on dead latents; fixed step count, `seconds` is a safety cap.
    `target` [n_tokens, d_out]: what to reconstruct from `acts` (a transcoder: the MLP output from its
    input); None: `acts` itself (an SAE)."""
    torch.manual_seed(seed)
    target = acts if target is None else target
    sae = TopKTrainer(acts.shape[1], d_sae, k, target.mean(0))
    opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999))
    last_fired = torch.zeros(d_sae, dtype=torch.long)
    k_aux, dead_after = min(acts.shape[1] // 2, 2 * k), 200
    gen = torch.Generator().manual_seed(seed)
    t0, step = time.time(), 0
    while step < steps and time.time() - t0 < seconds:
        frac = max(step / steps, (time.time() - t0) / seconds)
        for g in opt.param_groups:  # constant, then linear decay over the last 30%
            g["lr"] = lr * min(1.0, (1 - frac) / 0.3)
        rows = torch.randint(0, len(acts), (batch,), generator=gen)
        x, y = acts[rows], target[rows]
        y_hat, idx, val, pre = sae(x)
        var = (y - y.mean(0)).pow(2).sum(-1).mean()
        loss = (y - y_hat).pow(2).sum(-1).mean() / var
        fired = torch.zeros(d_sae, dtype=torch.bool)
        fired[idx[val > 0]] = True
        last_fired = torch.where(fired, torch.full_like(last_fired, step), last_fired)
        dead = (step - last_fired) > dead_after
        if dead.any():
            err = (y - y_hat).detach()
            aux_pre = pre.masked_fill(~dead, -math.inf)
            av, ai = aux_pre.topk(min(k_aux, int(dead.sum())), dim=-1)
            e_hat = F.embedding_bag(ai, sae.W_dec, per_sample_weights=av.relu(), mode="sum")
            aux = (err - e_hat).pow(2).sum(-1).mean() / err.pow(2).sum(-1).mean().clamp_min(1e-8)
            loss = loss + aux / 32
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sae.normalize_decoder()
        step += 1
    return sae, step


@torch.no_grad()
def evaluate_sae(sae: SAE, acts: Tensor) -> dict[str, float]:
    """Variance explained (1 - SSE / SST around the per-dimension mean), L0, dead fraction, through the
    library's `SAE.encode`/`SAE.decode`."""
    dense = sae.encode(acts)  # [n_tokens, d_sae]
    x_hat = sae.decode(dense)
    sse = (acts - x_hat).pow(2).sum()
    sst = (acts - acts.mean(0)).pow(2).sum()
    fired = (dense > 0).any(0)
    return {
        "variance_explained": round(float(1 - sse / sst), 4),
        "l0": round(float((dense > 0).sum(-1).float().mean()), 2),
        "dead_fraction": round(float(1 - fired.float().mean()), 4),
        "n_tokens": int(len(acts)),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=DEMO_MODEL)
    ap.add_argument("--out", type=Path, default=DEMO_SAES)
    ap.add_argument("--minutes", type=float, default=20.0, help="wall-clock cap on SAE training, all checkpoints")
    ap.add_argument("--steps", type=int, default=2500, help="optimizer steps per SAE")
    ap.add_argument("--d-sae", type=int, default=1024)
    ap.add_argument("--k", type=int, default=24)
    ap.add_argument("--train-docs", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.time()

    model = load_model(args.model, name=MODEL_NAME)
    tokenizer, n_layers = model.tokenizer, model.n_layers
    train_acts = collect(model, corpus_blocks(tokenizer, args.seed + 20_000, args.train_docs))
    test_acts = collect(model, corpus_blocks(tokenizer, args.seed + 30_000, 160))
    print(
        f"collected {train_acts.shape[1]:,} train / {test_acts.shape[1]:,} held-out tokens per checkpoint "
        f"in {time.time() - t0:.0f}s",
        flush=True,
    )

    report: dict[str, object] = {"bos_excluded": True, "d_sae": args.d_sae, "k": args.k, "checkpoints": {}}
    budget = args.minutes * 60 - (time.time() - t0)
    for c in range(n_layers + 1):
        t_c = time.time()
        seconds = max(10.0, budget / (n_layers + 1 - c))
        trainer, steps = train_sae(train_acts[c], args.d_sae, args.k, args.steps, seconds, args.seed + c)
        hook = hook_name(c, n_layers)
        sae = trainer.to_sae(c, hook)
        save_sae_lens(sae, args.out / hook)
        stats = evaluate_sae(sae, test_acts[c]) | {"steps": steps, "seconds": round(time.time() - t_c, 1)}
        report["checkpoints"][str(c)] = {"hook_name": hook} | stats  # type: ignore[index]
        print(f"checkpoint {c} ({hook}): {stats}", flush=True)
        budget -= time.time() - t_c
    report["total_minutes"] = round((time.time() - t0) / 60, 2)
    (args.out / "eval.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
