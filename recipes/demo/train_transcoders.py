"""Train the demo model's per-layer transcoders and attention-output (hook_z) SAEs, for strategy-2 graphs.

    python -m recipes.demo.train_transcoders [--model DIR] [--minutes M] [--steps N] [--d-sae D] [--k K]

1. Collect (`collect_sites`): each corpus block goes through `Model.run`, the same forward pass graphs
   trace, and every layer gives three [n_tokens, width] tensors, BOS excluded:
   - the MLP's input as the Llama family defines it for transcoders (circuit-tracer's `mlp.hook_in`: the
     pre-MLP RMSNorm's output, gain included; `Trace.mlp_in`);
   - the MLP's output (`mlp.hook_out` = `hook_mlp_out`, no post-MLP norm in this family; `Trace.mlp_out`);
   - the heads' outputs before W_O, side by side (`hook_z` flattened: z_h = pattern_h @ v_kv(h), head h at
     columns h*d_head:(h+1)*d_head).
2. Train (`train_sae` of `train_saes`, TopK with AuxK): a transcoder maps the MLP input to the MLP output;
   an attention SAE reconstructs z.
3. Save in formats qktrace (and the tools they come from) read: the transcoders as a circuit-tracer
   transcoder set (`config.yaml` + `layer_L.safetensors`, W_enc in torch Linear layout, activation topk
   with its k), the attention SAEs as SAELens folders on `blocks.L.attn.hook_z` (`save_sae_lens`).
4. Evaluate through the library's loaders (`load_transcoders`, `load_attention_saes`) on held-out blocks:
   variance explained of the MLP output / of z, and L0, per layer, into each folder's `eval.json`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from qktrace.config import DEMO_ATTENTION_SAES, DEMO_MODEL, DEMO_TRANSCODERS
from qktrace.models import Model, load_model
from qktrace.saes import load_attention_saes, load_transcoders, save_sae_lens

from .train_saes import MODEL_NAME, TopKTrainer, corpus_blocks, train_sae

INPUT_HOOK, OUTPUT_HOOK = "mlp.hook_in", "mlp.hook_out"  # circuit-tracer's names for a Llama model's MLP


def z_hook(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_z"


@torch.no_grad()
def collect_sites(model: Model, blocks: Tensor) -> dict[str, list[Tensor]]:
    """Step 1: {"mlp_in", "mlp_out", "z"}: per layer [n_tokens, width], every non-BOS position of `blocks`."""
    an = model.anatomy
    out: dict[str, list[list[Tensor]]] = {k: [[] for _ in range(an.n_layers)] for k in ("mlp_in", "mlp_out", "z")}
    for ids in blocks:
        trace = model.run(ids)
        for layer, ly in enumerate(an.layers):
            A = trace.pattern(layer)  # [head, q_pos, k_pos]
            z = torch.einsum("hqk,hke->qhe", A, trace.v[layer][ly.kv_index()].to(A))  # [pos, head, d_head]
            out["mlp_in"][layer].append(trace.mlp_in[layer][1:].float())
            out["mlp_out"][layer].append(trace.mlp_out[layer][1:].float())
            out["z"][layer].append(z[1:].flatten(-2).float())
    return {k: [torch.cat(rows) for rows in per_layer] for k, per_layer in out.items()}


def hook_z_config(folder: Path) -> None:
    """SAELens reads a hook_z SAE's input as [pos, head, d_head] and flattens it (`reshape_activations`)."""
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps(cfg | {"reshape_activations": "hook_z"}, indent=2) + "\n")


def save_transcoders(trainers: list[TopKTrainer], k: int, folder: Path) -> None:
    """Step 3: a circuit-tracer transcoder set (config.yaml + layer_L.safetensors)."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.joinpath("config.yaml").write_text(
        f'model_kind: "transcoder_set"\nfeature_input_hook: "{INPUT_HOOK}"\nfeature_output_hook: "{OUTPUT_HOOK}"\n'
        f'activation: "topk"\nk: {k}\nmodel_name: "{MODEL_NAME}"\ntranscoders:\n'
        + "".join(f'  - "layer_{layer}.safetensors"\n' for layer in range(len(trainers)))
    )
    for layer, t in enumerate(trainers):
        w = {"W_enc": t.W_enc.T, "W_dec": t.W_dec, "b_enc": t.b_enc, "b_dec": t.b_dec}  # W_enc [d_sae, d_model]
        save_file({n: v.detach().contiguous() for n, v in w.items()}, str(folder / f"layer_{layer}.safetensors"))


@torch.no_grad()
def variance_explained(target: Tensor, recon: Tensor) -> float:
    """1 - SSE / SST around the per-dimension mean."""
    return float(1 - (target - recon).pow(2).sum() / (target - target.mean(0)).pow(2).sum())


@torch.no_grad()
def evaluate(model: Model, held_out: dict[str, list[Tensor]], transcoders: Path, attention: Path) -> dict:
    """Step 4: per layer, VE and L0 of the files as the library loads them."""
    ts, saes = load_transcoders(transcoders, model), load_attention_saes(attention, model)
    rows: dict[str, dict] = {"transcoders": {}, "attention_saes": {}}
    for layer in range(model.n_layers):
        x, y, z = (held_out[k][layer] for k in ("mlp_in", "mlp_out", "z"))
        acts = ts[layer].encode(x)
        rows["transcoders"][str(layer)] = {
            "variance_explained": round(variance_explained(y, ts[layer].decode(acts)), 4),
            "l0": round(float((acts > 0).sum(-1).float().mean()), 2),
        }
        acts = saes[layer].encode(z)
        rows["attention_saes"][str(layer)] = {
            "hook_name": z_hook(layer),
            "variance_explained": round(variance_explained(z, saes[layer].decode(acts)), 4),
            "l0": round(float((acts > 0).sum(-1).float().mean()), 2),
        }
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=DEMO_MODEL)
    ap.add_argument("--transcoders", type=Path, default=DEMO_TRANSCODERS)
    ap.add_argument("--attention-saes", type=Path, default=DEMO_ATTENTION_SAES)
    ap.add_argument(
        "--minutes",
        type=float,
        default=60.0,
        help="wall-clock safety cap, all coders (reproducible while it does not bind)",
    )
    ap.add_argument("--steps", type=int, default=1000, help="optimizer steps per coder")
    ap.add_argument("--batch", type=int, default=1024, help="tokens per step")
    ap.add_argument("--d-sae", type=int, default=512)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--train-docs", type=int, default=800)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="1: much faster than 2 on a shared, loaded machine")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.time()
    model = load_model(args.model, name=MODEL_NAME)
    train = collect_sites(model, corpus_blocks(model.tokenizer, args.seed + 40_000, args.train_docs))
    held_out = collect_sites(model, corpus_blocks(model.tokenizer, args.seed + 50_000, 80))
    print(f"collected {len(train['z'][0]):,} train / {len(held_out['z'][0]):,} held-out tokens per layer "
          f"in {time.time() - t0:.0f}s", flush=True)  # fmt: skip
    n = model.n_layers
    budget = args.minutes * 60 - (time.time() - t0)
    trainers, steps = [], {}
    for i, (layer, kind) in enumerate((layer, kind) for kind in ("transcoder", "z") for layer in range(n)):
        seconds = max(10.0, budget / (2 * n - i))
        t_i = time.time()
        seed = args.seed + 100 * (kind == "z") + layer
        x, y = (train["mlp_in"][layer], train["mlp_out"][layer]) if kind == "transcoder" else (train["z"][layer], None)
        trainer, steps[f"{kind} {layer}"] = train_sae(
            x, args.d_sae, args.k, args.steps, seconds, seed, batch=args.batch, target=y
        )
        if kind == "transcoder":
            trainers.append(trainer)
        else:
            hook_z_config(save_sae_lens(trainer.to_sae(layer, z_hook(layer)), args.attention_saes / z_hook(layer)))
        site = ("mlp_in", "mlp_out") if kind == "transcoder" else ("z", "z")
        with torch.no_grad():
            ve = variance_explained(held_out[site[1]][layer], trainer(held_out[site[0]][layer])[0])
        print(f"{kind} {layer}: {steps[f'{kind} {layer}']} steps in {time.time() - t_i:.0f}s, held-out VE {ve:.3f}",
              flush=True)  # fmt: skip
        budget -= time.time() - t_i
        if steps[f"{kind} {layer}"] < args.steps:
            print(f"the time cap stopped {kind} {layer} early: rerun with a larger --minutes to reproduce", flush=True)
    save_transcoders(trainers, args.k, args.transcoders)
    report = evaluate(model, held_out, args.transcoders, args.attention_saes)
    settings = {"d_sae": args.d_sae, "k": args.k, "seed": args.seed, "bos_excluded": True,
                "n_tokens": len(held_out["z"][0]), "minutes": round((time.time() - t0) / 60, 2)}  # fmt: skip
    for kind, folder in (("transcoders", args.transcoders), ("attention_saes", args.attention_saes)):
        per_layer = {lay: r | {"steps": steps[f"{'transcoder' if kind == 'transcoders' else 'z'} {lay}"]}
                     for lay, r in report[kind].items()}  # fmt: skip
        (folder / "eval.json").write_text(json.dumps(settings | {"layers": per_layer}, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
