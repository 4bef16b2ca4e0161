"""Hooks on the real HF modules: capture one forward pass, or intervene inside attention.

Two mechanisms, both inside context managers that always remove themselves:

1. Ordinary torch forward hooks on the blocks, norms, attention and MLP modules (residual stream,
   frozen norm scales, MLP input/output).
2. `attention_seam`: the seam between (query, key) and scores. HF computes rotary/QK-norm inside the
   attention module and then calls its modeling file's `eager_attention_forward(module, query, key,
   value, mask, ...)`; we wrap that function for the duration, so we see q and k after rotary and
   QK-norm and the mask HF applies -- and an intervention can replace q, k or the pattern there
   without touching anything else.

Threads: `eager_attention_forward` is a module global of the modeling file, and a pattern hook
replaces `torch.nn.functional.softmax` for the call, so a seam is process-wide. `attention_seam`
therefore holds one process-wide re-entrant lock (`SEAM_LOCK`) while it is installed: two threads that
trace or intervene at once are serialised, never interleaved (the server relies on this).
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

SEAM_LOCK = threading.RLock()


@dataclass
class SeamHooks:
    """Callbacks at the attention seam of chosen layers; each may return a replacement or None.

    inputs(layer, query [head, pos, d_head], key [kv_head, pos, d_head], value) -> (query, key, value) | None
    mask(layer, mask [*, q_pos, k_pos] additive or None) -> None
    pattern(layer, scores [head, q_pos, k_pos], pattern [head, q_pos, k_pos]) -> pattern | None
    """

    inputs: Callable[[int, Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor] | None] | None = None
    mask: Callable[[int, Tensor | None], None] | None = None
    pattern: Callable[[int, Tensor, Tensor], Tensor | None] | None = None


@contextlib.contextmanager
def attention_seam(attn_modules: tuple[nn.Module, ...] | list[nn.Module], hooks: SeamHooks) -> Iterator[None]:
    """Wrap each attention module's modeling-file `eager_attention_forward` while the block runs.

    Batch size must be 1 (qktrace traces one prompt at a time); tensors given to hooks drop it.
    """
    layer_of = {id(m): i for i, m in enumerate(attn_modules)}
    modules = {sys.modules[type(m).__module__] for m in attn_modules}

    def make(orig: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(module, query, key, value, attention_mask, *args, **kwargs):  # type: ignore[no-untyped-def]
            layer = layer_of.get(id(module))
            if layer is None:
                return orig(module, query, key, value, attention_mask, *args, **kwargs)
            if hooks.inputs is not None:
                new = hooks.inputs(layer, query[0], key[0], value[0])
                if new is not None:
                    query, key, value = (t.unsqueeze(0) for t in new)
            if hooks.mask is not None:
                hooks.mask(layer, None if attention_mask is None else attention_mask[0])
            if hooks.pattern is None:
                return orig(module, query, key, value, attention_mask, *args, **kwargs)
            real_softmax = torch.nn.functional.softmax

            def spy(x: Tensor, *a: Any, **k: Any) -> Tensor:
                probs = real_softmax(x, *a, **k)
                assert hooks.pattern is not None
                new_p = hooks.pattern(layer, x[0], probs[0])
                return probs if new_p is None else new_p.unsqueeze(0).to(probs.dtype)

            torch.nn.functional.softmax = spy  # type: ignore[assignment]
            try:
                return orig(module, query, key, value, attention_mask, *args, **kwargs)
            finally:
                torch.nn.functional.softmax = real_softmax

        return wrapped

    with SEAM_LOCK:
        originals = {mod: mod.eager_attention_forward for mod in modules}
        for mod, orig in originals.items():
            mod.eager_attention_forward = make(orig)  # type: ignore[attr-defined]
        try:
            yield
        finally:
            for mod, orig in originals.items():
                mod.eager_attention_forward = orig  # type: ignore[attr-defined]


@contextlib.contextmanager
def forward_hooks(pairs: list[tuple[nn.Module, Callable[..., Any]]], *, pre: bool = False) -> Iterator[None]:
    """Register forward (or forward-pre, with kwargs) hooks and always remove them."""
    handles = []
    try:
        for module, fn in pairs:
            if pre:
                handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(fn, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


def first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any], name: str = "hidden_states") -> Tensor:
    if args and isinstance(args[0], Tensor):
        return args[0]
    return kwargs[name]


def output_tensor(out: Any) -> Tensor:
    return out if isinstance(out, Tensor) else out[0]


def key_range(mask: Tensor | None, n_q: int, n_k: int, device: torch.device) -> Tensor:
    """[2, q_pos] (first, last) key each query may attend to, read off HF's additive mask [*, q, k].

    Causal masks and sliding windows allow one contiguous run of keys per query; anything else is
    refused, since scores are recomputed from that range. No mask: every key.
    """
    if mask is None:
        lo = torch.zeros(n_q, dtype=torch.long, device=device)
        return torch.stack([lo, torch.full_like(lo, n_k - 1)])
    m = mask[0] if mask.dim() == 3 else mask  # the mask is shared by heads
    allowed = m > torch.finfo(m.dtype).min / 2 if m.is_floating_point() else m.bool()
    count = allowed.sum(-1)
    lo = allowed.int().argmax(-1)
    hi = lo + count - 1
    idx = torch.arange(n_k, device=allowed.device)
    run = (idx[None, :] >= lo[:, None]) & (idx[None, :] <= hi[:, None])
    if bool((count == 0).any()) or not torch.equal(run, allowed):
        raise NotImplementedError("this model's attention mask is not one run of keys per query (padding?)")
    return torch.stack([lo, hi]).to(device)
