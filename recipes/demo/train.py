"""Train the embedded demo model: a tiny Llama trained from scratch on the synthetic corpus.

    python -m recipes.demo.train [--out DIR] [--minutes M] [--steps N] [--seed S]

Builds the tokenizer, trains a `LlamaForCausalLM` (RoPE, RMSNorm, GQA) with AdamW and a
warmup + cosine schedule for a fixed number of steps (reproducible for a seed; `--minutes` is only a
safety cap), saves model + tokenizer with `save_pretrained`, then measures greedy next-token
accuracy on the held-out prompts of every task family and writes `eval.json`.

`--init DIR --mix stage2` continues a saved model (keeping its tokenizer) on a mixture weighted towards
facts, multiple choice and yes/no; `make train-demo` runs the two stages that made the shipped model.
`--eval-only` re-measures the model in `--out`.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from qktrace.config import DEMO_MODEL

from .corpus import (
    EVAL_FAMILIES,
    MIX_STAGE1,
    MIXES,
    PAPER_PROMPTS,
    CorpusGenerator,
    EvalItem,
    eval_items,
    required_tokens,
    training_documents,
)
from .tokenizer import single_token_id, train_tokenizer

DEFAULT_OUT = DEMO_MODEL


def build_config(
    vocab_size: int, bos: int, eos: int, pad: int, d_model: int, n_layers: int, d_mlp: int, seq_len: int
) -> LlamaConfig:
    """The demo architecture: 8 query heads sharing 4 key/value heads, tied embeddings."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=d_model,
        intermediate_size=d_mlp,
        num_hidden_layers=n_layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=d_model // 8,
        max_position_embeddings=max(256, seq_len),
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
        initializer_range=0.02,
        rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
        use_cache=False,
    )


class Batches:
    """Seeded stream of ([batch, seq_len + 1] tokens starting with BOS, [batch, seq_len] loss weights).

    Next-token targets that are task answers (names to be recalled, antonyms, option letters, Yes/No)
    get weight `answer_weight`; every other target gets weight 1.
    """

    def __init__(
        self,
        tokenizer,
        seed: int,
        batch: int,
        seq_len: int,
        answer_weight: float,
        mix: tuple[tuple[str, float], ...] = MIX_STAGE1,
    ) -> None:
        self.tok, self.gen, self.batch, self.seq_len = tokenizer, CorpusGenerator(seed, mix), batch, seq_len
        self.answer_weight = answer_weight

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.seq_len + 1
        rows: list[list[int]] = []
        weights: list[torch.Tensor] = []
        while len(rows) < self.batch:
            text, spans = self.gen.document_with_answers(int(self.seq_len * 4.6))
            enc = self.tok(text, return_offsets_mapping=True)
            ids, offs = enc["input_ids"], enc["offset_mapping"]
            if len(ids) < n:
                continue
            w = torch.ones(n)
            starts = torch.tensor([o[0] for o in offs[:n]])
            ends = torch.tensor([o[1] for o in offs[:n]])
            for a, b in spans:
                w[(starts < b) & (ends > a)] = self.answer_weight
            w[0] = 1.0  # BOS has offsets (0, 0)
            rows.append(ids[:n])
            weights.append(w[1:])
        return torch.tensor(rows, dtype=torch.long), torch.stack(weights)


def lr_at(step: int, total: int, peak: float, warmup: int, time_frac: float = 0.0) -> float:
    """Linear warmup then cosine to 10% of peak. Progress is the step fraction, or the elapsed
    fraction of the wall-clock cap if that is larger (only on a slow/contended machine)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = max((step - warmup) / max(1, total - warmup), time_frac)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    tokenizer,
    items: list[EvalItem],
    batch: int = 64,
) -> tuple[dict[str, float], list[tuple[EvalItem, str]]]:
    """Greedy next-token accuracy per family; also returns every (item, predicted token) pair."""
    model.eval()
    preds: list[tuple[EvalItem, str]] = []
    pad = tokenizer.pad_token_id
    for i in range(0, len(items), batch):
        chunk = items[i : i + batch]
        enc = [tokenizer(it.prompt)["input_ids"] for it in chunk]
        width = max(len(e) for e in enc)
        ids = torch.tensor([e + [pad] * (width - len(e)) for e in enc])
        logits = model(input_ids=ids).logits
        last = torch.tensor([len(e) - 1 for e in enc])
        top = logits[torch.arange(len(chunk)), last].argmax(-1).tolist()
        preds += [(it, tokenizer.decode([t])) for it, t in zip(chunk, top)]
    acc: dict[str, float] = {}
    for fam in dict.fromkeys(it.family for it in items):
        rows = [(it, p) for it, p in preds if it.family == fam]
        acc[fam] = sum(p == it.answer for it, p in rows) / len(rows)
    return acc, preds


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--minutes", type=float, default=36.0, help="wall-clock cap on training")
    ap.add_argument("--steps", type=int, default=4400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--d-model", type=int, default=192)
    ap.add_argument("--d-mlp", type=int, default=576)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--vocab", type=int, default=3072)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--init", type=Path, default=None, help="continue from this saved model (+ tokenizer)")
    ap.add_argument("--mix", choices=sorted(MIXES), default="stage1", help="training segment mixture")
    ap.add_argument("--answer-weight", type=float, default=4.0, help="loss weight of answer tokens")
    ap.add_argument("--probe-minutes", type=float, default=4.0, help="interval of the progress probe")
    ap.add_argument("--eval-n", type=int, default=200, help="eval prompts per family")
    ap.add_argument("--eval-only", action="store_true", help="only evaluate the model saved in --out")
    args = ap.parse_args(argv)
    if args.eval_only:
        log = args.out / "train.json"
        train = json.loads(log.read_text()) if log.is_file() else {}
        write_report(args.out, args.eval_n, train, [])
        return

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    t_start = time.time()

    previous: list[dict[str, object]] = []
    if args.init is not None:  # continue training a saved model (stage 2), keeping its tokenizer
        tokenizer = AutoTokenizer.from_pretrained(args.init)
        if (args.init / "eval.json").is_file():
            prev = json.loads((args.init / "eval.json").read_text())
            stage = prev["train"] | {"heldout_accuracy": prev["heldout_accuracy"]}
            previous = prev.get("previous_stages", []) + [stage]
    else:
        tokenizer = train_tokenizer(training_documents(args.seed + 10_000, 4000), required_tokens(), args.vocab)
    missing = [w for w in required_tokens() if single_token_id(tokenizer, w) is None]  # type: ignore[arg-type]
    if missing:
        raise SystemExit(f"tokenizer: not single tokens: {missing[:20]}")
    cfg = build_config(
        len(tokenizer),
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
        args.d_model,
        args.layers,
        args.d_mlp,
        args.seq_len,
    )
    if args.init is not None:
        model = AutoModelForCausalLM.from_pretrained(args.init, attn_implementation="sdpa", dtype=torch.float32)
    else:
        model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa")
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"vocab {len(tokenizer)}  params {n_params / 1e6:.2f}M  steps {args.steps}  "
        f"tokens/step {args.batch * args.seq_len}",
        flush=True,
    )

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    data = Batches(
        tokenizer,
        args.seed + 1 + (100 if args.mix == "stage2" else 0),
        args.batch,
        args.seq_len,
        args.answer_weight,
        MIXES[args.mix],
    )
    probe = eval_items(seed=99, n_per_family=25)  # progress probe (different seed from the final eval)
    last_probe = time.time()
    warmup = max(50, args.steps // 40)
    t_train, last_log, ema, step = time.time(), time.time(), None, 0
    model.train()
    while step < args.steps:
        if time.time() - t_train > args.minutes * 60:
            print(f"time cap reached at step {step}/{args.steps}", flush=True)
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, warmup, (time.time() - t_train) / (args.minutes * 60))
        x, w = data.next()
        logits = model(input_ids=x[:, :-1]).logits
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="none"
        )
        loss = (nll * w.reshape(-1)).sum() / w.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if time.time() - last_log > 30 or step == args.steps:
            el = time.time() - t_train
            print(
                f"step {step:6d}  loss {ema:.4f}  lr {opt.param_groups[0]['lr']:.2e}  "
                f"tok/s {step * args.batch * args.seq_len / el:,.0f}  elapsed {el / 60:.1f} min",
                flush=True,
            )
            last_log = time.time()
        if time.time() - last_probe > args.probe_minutes * 60:
            acc, _ = evaluate(model, tokenizer, probe)
            model.train()
            print("  probe " + " ".join(f"{k}={v:.2f}" for k, v in acc.items()), flush=True)
            last_probe = time.time()
    train_minutes = (time.time() - t_train) / 60

    args.out.mkdir(parents=True, exist_ok=True)
    model.config.use_cache = True
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)

    train = {
        "init": None if args.init is None else str(args.init),
        "mix": args.mix,
        "steps": step,
        "planned_steps": args.steps,
        "minutes": round(train_minutes, 2),
        "total_minutes": round((time.time() - t_start) / 60, 2),
        "final_loss_ema": round(ema or 0, 4),
        "tokens": step * args.batch * args.seq_len,
        "stopped_by_time_cap": step < args.steps,
        "seed": args.seed,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "lr": args.lr,
        "answer_weight": args.answer_weight,
        "params": n_params,
        "threads": args.threads,
    }
    (args.out / "train.json").write_text(json.dumps(train, indent=1) + "\n")
    write_report(args.out, args.eval_n, train, previous)


def write_report(out: Path, eval_n: int, train: dict[str, object], previous: list[dict[str, object]]) -> None:
    """Evaluate the saved artifact exactly as users load it and write `eval.json`."""
    model = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(out)
    acc, preds = evaluate(model, tokenizer, eval_items(seed=1234, n_per_family=eval_n))
    _, paper = evaluate(model, tokenizer, list(PAPER_PROMPTS))
    report = {
        "heldout_accuracy": {f: round(acc[f], 4) for f in EVAL_FAMILIES},
        "eval_prompts_per_family": eval_n,
        "paper_prompts": [{"prompt": it.prompt, "expected": it.answer, "predicted": p} for it, p in paper],
        "mistakes_sample": [
            {"family": it.family, "prompt": it.prompt[-100:], "expected": it.answer, "predicted": p}
            for it, p in preds
            if p != it.answer
        ][:40],
        "previous_stages": previous,
        "train": train,
    }
    (out / "eval.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    print(json.dumps({"heldout_accuracy": report["heldout_accuracy"], "train": report["train"]}, indent=1))
    for r in report["paper_prompts"]:  # type: ignore[attr-defined]
        print(f"  {r['prompt'][-50:]!r} -> {r['predicted']!r} (expected {r['expected']!r})")


if __name__ == "__main__":
    main()
