"""QK attribution speed: one (head, query) x all keys with every feature pair, on a GPT-2-small-shaped
random model with random TopK SAEs (width 24576, k=64). Prints the time per attribution at 128 and 512
tokens and the ratio against a naive version that multiplies every component pair through a dense
W_QK (d_model x d_model per head), measured in the same run. Not a test: run `python bench/bench_qk.py`.
Targets (2 CPU cores): 0.2 s at 128 tokens, 1 s at 512 tokens.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from qktrace.models import Model
from qktrace.qk import qk_attribution
from qktrace.saes import SAE


def gpt2_small(n_layers: int, d_model: int, n_heads: int) -> Model:
    import transformers as T

    logging.getLogger("transformers").setLevel(logging.ERROR)
    cfg = T.GPT2Config(n_layer=n_layers, n_embd=d_model, n_head=n_heads, n_positions=1024, vocab_size=50257)
    hf = T.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    return Model(hf.eval(), tokenizer=None, name="gpt2-small-random")


def topk_sae(checkpoint: int, d_model: int, d_sae: int, k: int, seed: int) -> SAE:
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(d_sae, d_model, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    return SAE(checkpoint, "topk", W_dec.T.contiguous(), torch.zeros(d_sae), W_dec, torch.zeros(d_model), k=k)


def time_it(fn, repeat: int) -> float:  # type: ignore[no-untyped-def]
    """Best of `repeat` runs after a warm-up: the least disturbed by other work on the machine."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small shapes for a smoke run")
    args = ap.parse_args()
    torch.set_num_threads(2)
    d_model, n_heads, layers, d_sae, k = (768, 12, 12, 24576, 64) if not args.quick else (128, 4, 2, 2048, 16)
    lengths = (128, 512) if not args.quick else (32, 64)
    model = gpt2_small(layers, d_model, n_heads)
    layer, head = layers // 2, 3
    sae = topk_sae(layer, d_model, d_sae, k, seed=0)
    print(f"model: {layers} layers, d_model {d_model}, {n_heads} heads; SAE width {d_sae}, k={k}; 2 threads")
    for n in lengths:
        ids = torch.randint(50257, (n,), generator=torch.Generator().manual_seed(n))
        trace = model.run(ids)
        acts = sae.sparse(trace.resid[layer])
        ly = model.anatomy.layers[layer]

        def fast(trace=trace, acts=acts):  # type: ignore[no-untyped-def]
            return qk_attribution(model, trace, sae, acts, layer, head, -1)

        att = fast()
        t_fast = time_it(fast, 5)

        keys = list(att.key_positions)

        def dense(trace=trace, acts=acts, ly=ly, n=n, keys=keys) -> torch.Tensor:  # type: ignore[no-untyped-def]
            # the naive way: materialise W_QK[h] = W_Q[h] W_K[kv]^T (d_model x d_model) and push every
            # (query component, key component) pair through it; components gathered exactly as fast
            W_QK = ly.W_Q[head] @ ly.W_K[ly.kv_head[head]].T  # [d_model, d_model]
            Xq, pq = _components(sae, acts, [n - 1])
            Xk, pk = _components(sae, acts, keys)
            Xq = ly.ln_attn.linear(Xq, trace.scale_ln_attn[layer][pq])
            Xk = ly.ln_attn.linear(Xk, trace.scale_ln_attn[layer][pk])
            return (Xq @ W_QK) @ Xk.T * ly.scale

        t_dense = time_it(dense, 5)
        n_terms = att.terms.numel()
        print(
            f"{n:>4} tokens: {t_fast * 1e3:7.1f} ms per (head, query) x all keys, {n_terms:,} terms "
            f"(max rel err {att.max_relative_error():.1e}); dense W_QK baseline {t_dense * 1e3:7.1f} ms; "
            f"ratio {t_dense / t_fast:5.1f}x"
        )


def _components(sae: SAE, acts, positions) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[no-untyped-def]
    """The residual's components at `positions` as d_model vectors (a_i v_i, b_dec, error), vectorised."""
    P = torch.tensor(positions)
    sel = torch.isin(acts.pos, P)
    feats = acts.act[sel][:, None] * sae.W_dec[acts.feature[sel]]
    rest = torch.stack([sae.b_dec.expand(len(P), -1), acts.error[P]], 1).reshape(-1, sae.d_model)
    return torch.cat([feats, rest]), torch.cat([acts.pos[sel], P.repeat_interleave(2)])


if __name__ == "__main__":
    main()
