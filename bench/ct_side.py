"""circuit-tracer's side of bench/agree_circuit_tracer.py: runs in circuit-tracer's own environment (never
imports qktrace). Reads an HF save_pretrained model and a circuit-tracer transcoder set, converts the HF
weights to TransformerLens (its own converters, no folding), builds circuit-tracer's TransformerLens
ReplacementModel and then answers the bench's requests on stdin: `run I` runs `attribute()` on prompt I
once and prints its seconds; `save I PATH` saves that graph's tensors with torch.save. So the
bench can alternate the two tools run by run, under the same load.

  PYTHONPATH=$CT python bench/ct_side.py --model DIR --transcoders DIR --ids 1,5,7;1,8,9 [--dtype float64]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch


def tl_config(hf_cfg: dict, dtype: torch.dtype):  # type: ignore[no-untyped-def]
    from transformer_lens import HookedTransformerConfig

    kind = hf_cfg["model_type"]
    if kind == "gpt2":
        d = hf_cfg["n_embd"]
        extra = dict(
            n_layers=hf_cfg["n_layer"], d_model=d, n_heads=hf_cfg["n_head"], d_head=d // hf_cfg["n_head"],
            d_mlp=hf_cfg.get("n_inner") or 4 * d, n_ctx=hf_cfg["n_positions"], act_fn="gelu_new",
            normalization_type="LN", eps=hf_cfg["layer_norm_epsilon"], positional_embedding_type="standard",
            original_architecture="GPT2LMHeadModel",
        )  # fmt: skip
    elif kind == "llama":
        d, h = hf_cfg["hidden_size"], hf_cfg["num_attention_heads"]
        d_head = hf_cfg.get("head_dim") or d // h
        rope = hf_cfg.get("rope_parameters") or {}
        extra = dict(
            n_layers=hf_cfg["num_hidden_layers"], d_model=d, n_heads=h, d_head=d_head,
            n_key_value_heads=hf_cfg["num_key_value_heads"], d_mlp=hf_cfg["intermediate_size"],
            n_ctx=min(hf_cfg.get("max_position_embeddings", 2048), 2048), act_fn="silu", normalization_type="RMS",
            eps=hf_cfg["rms_norm_eps"], positional_embedding_type="rotary", rotary_dim=d_head,
            rotary_base=rope.get("rope_theta", hf_cfg.get("rope_theta", 10000.0)), rotary_adjacent_pairs=False,
            gated_mlp=True, final_rms=True, original_architecture="LlamaForCausalLM",
        )  # fmt: skip
    else:
        raise SystemExit(f"ct_side.py converts gpt2 and llama models, not {kind}")
    return HookedTransformerConfig(d_vocab=hf_cfg["vocab_size"], dtype=dtype, device="cpu", **extra)


def replacement_model(model_dir: Path, tc_dir: Path, dtype: torch.dtype):  # type: ignore[no-untyped-def]
    import yaml
    from circuit_tracer.replacement_model.replacement_model_transformerlens import TransformerLensReplacementModel
    from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set
    from transformer_lens.pretrained import weight_conversions as W
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    hf_cfg = json.loads((model_dir / "config.json").read_text())
    cfg = tl_config(hf_cfg, dtype)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=dtype)
    convert = {"gpt2": W.convert_gpt2_weights, "llama": W.convert_llama_weights}[hf_cfg["model_type"]]
    tok_dir = Path(tempfile.mkdtemp())  # the saved tokenizer_config names a transformers-5 class: re-save it for 4.x
    PreTrainedTokenizerFast(
        tokenizer_file=str(model_dir / "tokenizer.json"), bos_token="<bos>", unk_token="<unk>"
    ).save_pretrained(tok_dir)
    tok = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    model = TransformerLensReplacementModel(cfg, tokenizer=tok)
    model.load_and_process_state_dict(
        convert(hf, cfg), fold_ln=False, center_writing_weights=False, center_unembed=False,
        fold_value_biases=False, refactor_factored_attn_matrices=False,
    )  # fmt: skip
    tc_cfg = yaml.safe_load((tc_dir / "config.yaml").read_text())
    paths = {i: str(tc_dir / f"layer_{i}.safetensors") for i in range(cfg.n_layers)}
    tset = load_transcoder_set(
        paths, scan="bench", feature_input_hook=tc_cfg["feature_input_hook"],
        feature_output_hook=tc_cfg["feature_output_hook"], device=torch.device("cpu"), dtype=dtype,
        lazy_encoder=False, lazy_decoder=False,
    )  # fmt: skip
    model._configure_replacement_model(tset)
    return model.eval()


def serve(model, prompts: list[torch.Tensor], batch_size: int) -> None:  # type: ignore[no-untyped-def]
    """Answer `run I` (attribute prompt I once: its seconds), `save I PATH`
    (the last graph of prompt I) and `quit` on stdin, one `CT {json}` line each on stdout."""
    from circuit_tracer import attribute

    graphs: dict[int, object] = {}
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        i = int(cmd[1])
        if cmd[0] == "run":
            t = time.perf_counter()
            graphs[i] = attribute(prompts[i], model, max_n_logits=10, desired_logit_prob=0.95, batch_size=batch_size)
            answer = {"seconds": time.perf_counter() - t}
        else:
            g = graphs[i]
            torch.save(
                {
                    "adjacency": g.adjacency_matrix,  # type: ignore[attr-defined]
                    "active_features": g.active_features,  # type: ignore[attr-defined]
                    "activation_values": g.activation_values,  # type: ignore[attr-defined]
                    "logit_tokens": torch.tensor([t.vocab_idx for t in g.logit_targets]),  # type: ignore[attr-defined]
                    "logit_probabilities": g.logit_probabilities,  # type: ignore[attr-defined]
                    "input_tokens": g.input_tokens,  # type: ignore[attr-defined]
                },
                cmd[2],
            )
            answer = {}
        print("CT " + json.dumps(answer), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--transcoders", type=Path, required=True)
    ap.add_argument("--ids", required=True, help="comma-separated token ids, BOS first; ';' separates prompts")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=512, help="attribute()'s batch_size (its default: 512)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = replacement_model(args.model, args.transcoders, getattr(torch, args.dtype))
    serve(model, [torch.tensor([int(i) for i in p.split(",")]) for p in args.ids.split(";")], args.batch_size)


if __name__ == "__main__":
    main()
