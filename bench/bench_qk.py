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
    fn()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t) / repeat


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
        t_fast = time_it(fast, 3)

        def dense(trace=trace, acts=acts, ly=ly, n=n, att=att) -> torch.Tensor:  # type: ignore[no-untyped-def]
            # the naive way: materialise W_QK per head (and a rotated copy per key position when rotary)
            # and push every (query component, key component) pair through it
            W_QK = ly.W_Q[head] @ ly.W_K[ly.kv_head[head]].T  # [d_model, d_model]
            Xq = ly.ln_attn.linear(_components(sae, acts, [n - 1]), trace.scale_ln_attn[layer][n - 1])
            Xk_all = []
            for p in att.key_positions:
                Xk_all.append(ly.ln_attn.linear(_components(sae, acts, [p]), trace.scale_ln_attn[layer][p]))
            Xk = torch.cat(Xk_all)
            return (Xq @ W_QK) @ Xk.T * ly.scale

        t_dense = time_it(dense, 1)
        n_terms = att.terms.numel()
        print(
            f"{n:>4} tokens: {t_fast * 1e3:7.1f} ms per (head, query) x all keys, {n_terms:,} terms "
            f"(max rel err {att.max_relative_error():.1e}); dense W_QK baseline {t_dense * 1e3:7.1f} ms; "
            f"ratio {t_dense / t_fast:5.1f}x"
        )


def _components(sae: SAE, acts, positions) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """The residual's components at `positions` as d_model vectors: a_i v_i, b_dec, error."""
    rows = []
    for p in positions:
        f, a = acts.at(p)
        rows += [a[:, None] * sae.W_dec[f], sae.b_dec[None], acts.error[p][None]]
    return torch.cat(rows)


if __name__ == "__main__":
    main()
