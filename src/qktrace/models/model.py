"""`load_model` and `Model`: an HF causal LM, its tokenizer, its anatomy, and one-forward `Trace`s."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import DEMO_MODEL, DEMO_NAME
from ..errors import InputError, ModelLoadError, QKTraceError
from .anatomy import Anatomy
from .capture import Recorder, SeamHooks, attention_seam, first_tensor, forward_hooks, output_tensor
from .families import family_for, module_paths, read_anatomy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Trace:
    """Everything one forward pass computed that qktrace needs, captured from the HF modules.

    Checkpoint c is the residual stream at the input of layer c; checkpoint n_layers is the final
    residual (before the final norm). Scales are the frozen 1/sqrt(var + eps) of each norm.
    """

    tokens: Tensor  # [pos]
    str_tokens: tuple[str, ...]
    resid: Tensor  # [checkpoint, pos, d_model]
    attn_out: Tensor  # [layer, pos, d_model] attention output (o_proj, before any post-norm)
    mlp_in: Tensor  # [layer, pos, d_model] what the HF MLP module received
    mlp_out: Tensor  # [layer, pos, d_model] what it returned (before any post-norm)
    scale_ln_attn: Tensor  # [layer, pos]
    scale_ln_mlp: Tensor  # [layer, pos]
    scale_post_attn: Tensor | None  # [layer, pos]
    scale_post_mlp: Tensor | None  # [layer, pos]
    scale_final: Tensor  # [pos]
    scale_q_norm: Tensor | None  # [layer, head, pos]
    scale_k_norm: Tensor | None  # [layer, kv_head, pos]
    q: Tensor  # [layer, head, pos, d_head] after QK-norm and rotary, as HF computed it
    k: Tensor  # [layer, kv_head, pos, d_head]
    v: Tensor  # [layer, kv_head, pos, d_head]
    scores: Tensor  # [layer, head, q_pos, k_pos] HF's own softmax input (soft-capped); masked = -inf
    patterns: Tensor  # [layer, head, q_pos, k_pos]
    logits: Tensor  # [pos, vocab]

    @property
    def n_pos(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def positions(self) -> Tensor:
        return torch.arange(self.n_pos, device=self.tokens.device)


class Model:
    """A loaded HF causal LM with its tokenizer and uniform anatomy. Stateless apart from the weights."""

    def __init__(self, hf: Any, tokenizer: Any = None, name: str | None = None):
        self.hf: Any = hf.eval()
        self.tokenizer: Any = tokenizer
        self.name = name or getattr(hf.config, "_name_or_path", "") or hf.config.model_type
        self.anatomy: Anatomy = read_anatomy(hf)
        self._modules: dict[str, Any] = module_paths(hf)

    # -- shape facts -------------------------------------------------------------------------------
    @property
    def family(self) -> str:
        return self.anatomy.family

    @property
    def n_layers(self) -> int:
        return self.anatomy.n_layers

    @property
    def d_model(self) -> int:
        return self.anatomy.d_model

    @property
    def n_heads(self) -> int:
        return self.anatomy.layers[0].n_heads

    @property
    def device(self) -> torch.device:
        return self.anatomy.W_E.device

    @property
    def attn_modules(self) -> list[Any]:
        """The HF attention module of each layer (what `attention_seam` wraps)."""
        return self._modules["attn"]

    @property
    def blocks(self) -> list[Any]:
        """The HF decoder block of each layer (block c's input is checkpoint c)."""
        return self._modules["blocks"]

    # -- tokens ------------------------------------------------------------------------------------
    def tokenize(self, prompt: str | Sequence[int] | Tensor) -> Tensor:
        """Token ids [pos] of a prompt (the tokenizer's own special tokens, e.g. BOS, included)."""
        if isinstance(prompt, str):
            if not prompt.strip():
                raise InputError("the prompt is empty: give at least one token of text")
            if self.tokenizer is None:
                raise InputError(f"model '{self.name}' has no tokenizer: pass token ids instead of text")
            ids = self.tokenizer(prompt, return_tensors="pt")["input_ids"][0]  # type: ignore[operator]
        else:
            ids = torch.as_tensor(prompt, dtype=torch.long).reshape(-1)
        if ids.numel() == 0:
            raise InputError("the prompt is empty: give at least one token")
        vocab = self.anatomy.W_E.shape[0]
        if int(ids.max()) >= vocab or int(ids.min()) < 0:
            raise InputError(f"token ids must lie in 0..{vocab - 1} for model '{self.name}'")
        return ids.to(self.device)

    def str_tokens(self, ids: Tensor) -> tuple[str, ...]:
        if self.tokenizer is None:
            return tuple(f"<{int(i)}>" for i in ids)
        return tuple(self.tokenizer.decode([int(i)]) for i in ids)  # type: ignore[attr-defined]

    def token_id(self, text: str) -> int:
        """The single token a string encodes to (e.g. ' Sally'), or InputError."""
        if self.tokenizer is None:
            raise InputError(f"model '{self.name}' has no tokenizer: name tokens by id")
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
        if len(ids) != 1:
            raise InputError(f"'{text}' is {len(ids)} tokens for this tokenizer; name a single token")
        return int(ids[0])

    # -- one forward -------------------------------------------------------------------------------
    def forward(self, ids: Tensor) -> Tensor:
        """Plain logits [pos, vocab] for token ids [pos]; hooks active around the call apply."""
        with torch.no_grad():
            return self.hf(input_ids=ids.reshape(1, -1), use_cache=False).logits[0]

    def run(self, prompt: str | Sequence[int] | Tensor) -> Trace:
        """One forward pass with hooks on the real HF modules, returning every cache qktrace uses."""
        ids = self.tokenize(prompt)
        rec = Recorder()
        m = self._modules
        L = self.n_layers
        an = self.anatomy

        def pre_block(i: int):  # type: ignore[no-untyped-def]
            return lambda mod, args, kwargs: rec.resid.__setitem__(i, first_tensor(args, kwargs)[0].detach())

        def post_last(mod, args, kwargs, out):  # type: ignore[no-untyped-def]
            rec.resid[L] = output_tensor(out)[0].detach()

        def norm_in(key: str, i: int):  # type: ignore[no-untyped-def]
            return lambda mod, args, kwargs, out: rec.norm_in.__setitem__(
                (key, i), first_tensor(args, kwargs)[0].detach()
            )

        def attn_out(i: int):  # type: ignore[no-untyped-def]
            return lambda mod, args, kwargs, out: rec.attn_out.__setitem__(i, output_tensor(out)[0].detach())

        def mlp_io(i: int):  # type: ignore[no-untyped-def]
            def hook(mod, args, kwargs, out):  # type: ignore[no-untyped-def]
                rec.mlp_in[i] = first_tensor(args, kwargs)[0].detach()
                rec.mlp_out[i] = output_tensor(out)[0].detach()

            return hook

        def seam_inputs(i: int, q: Tensor, k: Tensor, v: Tensor) -> None:
            rec.q[i], rec.k[i], rec.v[i] = q.detach(), k.detach(), v.detach()
            return None

        def seam_pattern(i: int, scores: Tensor, probs: Tensor) -> None:
            masked = scores <= torch.finfo(scores.dtype).min / 2
            rec.scores[i] = scores.detach().masked_fill(masked, float("-inf"))
            rec.patterns[i] = probs.detach().to(scores.dtype)
            return None

        pre = [(b, pre_block(i)) for i, b in enumerate(m["blocks"])]  # type: ignore[arg-type]
        post = [(m["blocks"][-1], post_last)]  # type: ignore[index]
        post += [(mod, norm_in("ln_attn", i)) for i, mod in enumerate(m["ln_attn"])]  # type: ignore[arg-type]
        post += [(mod, norm_in("ln_mlp", i)) for i, mod in enumerate(m["ln_mlp"])]  # type: ignore[arg-type]
        for key in ("post_attn", "post_mlp"):
            if m[key] is not None:
                post += [(mod, norm_in(key, i)) for i, mod in enumerate(m[key])]  # type: ignore[arg-type]
        post += [(m["final_norm"], norm_in("final", 0))]
        post += [(mod, attn_out(i)) for i, mod in enumerate(m["attn"])]  # type: ignore[arg-type]
        post += [(mod, mlp_io(i)) for i, mod in enumerate(m["mlp"])]  # type: ignore[arg-type]
        qk_norm = an.layers[0].q_norm is not None
        if qk_norm:
            for i, a in enumerate(m["attn"]):  # type: ignore[arg-type]
                post += [(a.q_norm, norm_in("q_norm", i)), (a.k_norm, norm_in("k_norm", i))]

        with (
            forward_hooks(pre, pre=True),
            forward_hooks(post),
            attention_seam(self.attn_modules, SeamHooks(inputs=seam_inputs, pattern=seam_pattern)),
        ):
            logits = self.forward(ids)

        def stack(d: dict[int, Tensor]) -> Tensor:
            return torch.stack([d[i] for i in range(L)])

        def scales(key: str) -> Tensor:
            norms: dict[str, list[Any]] = {
                "ln_attn": [ly.ln_attn for ly in an.layers],
                "ln_mlp": [ly.ln_mlp for ly in an.layers],
                "post_attn": [ly.post_attn for ly in an.layers],
                "post_mlp": [ly.post_mlp for ly in an.layers],
            }
            return torch.stack([norms[key][i].scale(rec.norm_in[(key, i)]) for i in range(L)])

        def qk_scales(key: str) -> Tensor:
            # norm input [pos, head, d_head] -> [head, pos]
            norm = [ly.q_norm if key == "q_norm" else ly.k_norm for ly in an.layers]
            return torch.stack([norm[i].scale(rec.norm_in[(key, i)]).T for i in range(L)])  # type: ignore[union-attr]

        return Trace(
            tokens=ids,
            str_tokens=self.str_tokens(ids),
            resid=torch.stack([rec.resid[c] for c in range(L + 1)]),
            attn_out=stack(rec.attn_out),
            mlp_in=stack(rec.mlp_in),
            mlp_out=stack(rec.mlp_out),
            scale_ln_attn=scales("ln_attn"),
            scale_ln_mlp=scales("ln_mlp"),
            scale_post_attn=scales("post_attn") if m["post_attn"] is not None else None,
            scale_post_mlp=scales("post_mlp") if m["post_mlp"] is not None else None,
            scale_final=an.final_norm.scale(rec.norm_in[("final", 0)]),
            scale_q_norm=qk_scales("q_norm") if qk_norm else None,
            scale_k_norm=qk_scales("k_norm") if qk_norm else None,
            q=stack(rec.q),
            k=stack(rec.k),
            v=stack(rec.v),
            scores=stack(rec.scores),
            patterns=stack(rec.patterns),
            logits=logits.detach(),
        )


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return 1 <= len(parts) <= 2 and all(p and not p.startswith(".") for p in parts) and not name.endswith(".json")


def _load_tokenizer(source: str):  # type: ignore[no-untyped-def]
    """AutoTokenizer, except that a generic tokenizers-backed file is loaded as saved (v5's AutoTokenizer
    would otherwise rebuild it as the family's own tokenizer class, e.g. Qwen2's)."""
    import json

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    cfg = Path(source) / "tokenizer_config.json"
    if cfg.is_file():
        cls = json.loads(cfg.read_text()).get("tokenizer_class")
        if cls in ("TokenizersBackend", "PreTrainedTokenizerFast"):
            return PreTrainedTokenizerFast.from_pretrained(source)
    return AutoTokenizer.from_pretrained(source)


def load_model(
    name_or_path: str | os.PathLike[str],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Model:
    """Load an HF causal LM (eager attention, so patterns are exposed) and its tokenizer.

    `name_or_path`: a `save_pretrained` directory, a hub id, or "demo" for the embedded demo model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    name = str(name_or_path)
    path = Path(name).expanduser()
    if name == DEMO_NAME or path.resolve() == DEMO_MODEL.resolve():  # the embedded demo model
        name, path = DEMO_NAME, DEMO_MODEL
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"'{name}' has no config.json: point at a save_pretrained directory")
        source = str(path)
    elif name.startswith((".", "/", "~")) or not _looks_like_hub_id(name):
        raise ModelLoadError(f"model path '{name}' does not exist: give a local directory or a hub id like 'gpt2'")
    else:
        source = name
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(
            f"could not load model '{name}': {first} Check the name, or give a local save_pretrained directory"
        ) from e
    family_for(config.model_type)  # fail fast on unsupported families, before loading weights
    try:
        hf: Any = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation="eager")
    except (OSError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"could not load weights of '{name}': {first}") from e
    hf.to(device)
    try:
        tokenizer = _load_tokenizer(source)
    except (OSError, ValueError, TypeError) as e:
        log.warning("no tokenizer for %s (%s); prompts must be token ids", name, e)
        tokenizer = None
    try:
        return Model(hf, tokenizer, name=name)
    except QKTraceError:
        raise
    except (AttributeError, KeyError) as e:
        raise ModelLoadError(f"model '{name}' does not have the layout of its family: {e}") from e
