"""Tiny random models and SAEs for tests, benchmarks and the offline smoke demo.

Nothing here downloads anything: each model is built from a small config, given large random
weights (so every term of every decomposition matters), saved with `save_pretrained` and loaded
back through `load_model`, the path users take.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

WORDS = [f"w{i}" for i in range(90)] + ["Aunt", "Sally", "Uncle", "Bob", ".", ",", "the", "is", "of", "opposite"]


def tiny_config(family: str, vocab: int, **overrides: object):  # type: ignore[no-untyped-def]
    import transformers as T

    cfg: Any
    common: dict[str, Any] = dict(
        vocab_size=vocab, hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=48
    )
    if family == "gpt2":
        cfg = T.GPT2Config(vocab_size=vocab, n_embd=32, n_head=4, n_layer=2, n_positions=128, n_inner=48)
    elif family == "gpt_neox":
        rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
        cfg = T.GPTNeoXConfig(**common, rope_parameters=rope, use_parallel_residual=True, attention_bias=True)
    elif family == "llama":
        cfg = T.LlamaConfig(**common, num_key_value_heads=2, attention_bias=True, mlp_bias=False)
    elif family == "mistral":
        cfg = T.MistralConfig(**common, num_key_value_heads=2, sliding_window=5)
    elif family == "qwen2":
        cfg = T.Qwen2Config(**common, num_key_value_heads=2)
    elif family == "qwen3":
        cfg = T.Qwen3Config(**common, num_key_value_heads=2, head_dim=12)
    elif family == "gemma2":
        cfg = T.Gemma2Config(
            **common,
            num_key_value_heads=2,
            head_dim=12,
            query_pre_attn_scalar=20,
            attn_logit_softcapping=3.0,
            final_logit_softcapping=20.0,
            sliding_window=5,
        )
    else:
        raise ValueError(family)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


TINY_FAMILIES = ("gpt2", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "gemma2")


def randomize(model: Any, seed: int = 0, std: float = 0.35) -> None:
    """Large random weights: matrices N(0, std), norm gains 1 + N(0, 0.2), biases N(0, 0.2)."""
    g = torch.Generator().manual_seed(seed)
    gemma = model.config.model_type == "gemma2"
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, device="cpu")
            if "norm" in name or name.split(".")[-2].startswith("ln"):
                p.copy_((0.0 if gemma and name.endswith("weight") else 1.0) * (name.endswith("weight")) + 0.2 * noise)
            elif p.ndim == 1:
                p.copy_(0.2 * noise)
            else:
                p.copy_(std * noise)


def word_tokenizer(path: Path):  # type: ignore[no-untyped-def]
    """A word-level tokenizer over WORDS with a BOS token, saved next to the model."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<bos>": 0, "<unk>": 1}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", unk_token="<unk>")
    fast.save_pretrained(path)
    return fast


def make_tiny_model(family: str, path: Path, seed: int = 0, **overrides: object) -> Path:
    """Build, randomise and save a tiny model of `family` with a word-level tokenizer; return its path."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    vocab = len(WORDS) + 2
    hf = AutoModelForCausalLM.from_config(tiny_config(family, vocab, **overrides), attn_implementation="eager")
    randomize(hf, seed)
    path.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(path)
    word_tokenizer(path)
    return path


def random_prompt(n: int, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(WORDS), (n,), generator=g, device="cpu")
    return " ".join(WORDS[int(i)] for i in idx)
