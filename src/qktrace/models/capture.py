"""Hooks on the real HF modules: capture one forward pass, or intervene inside attention.

Two mechanisms, both inside context managers that always remove themselves:

1. Ordinary torch forward hooks on the blocks, norms, attention and MLP modules (residual stream,
   frozen norm scales, MLP input/output, attention output).
2. `attention_seam`: the seam between (query, key) and scores. HF computes rotary/QK-norm inside the
   attention module and then calls its modeling file's `eager_attention_forward(module, query, key,
   value, mask, ...)`; we wrap that function for the duration, so we see q and k after rotary and
   QK-norm, the exact softmax input HF computed (soft-capped, masked), and its pattern -- and an
   intervention can replace q, k or the pattern there without touching anything else.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class SeamHooks:
    """Callbacks at the attention seam of chosen layers; each may return a replacement or None.

    inputs(layer, query [head, pos, d_head], key [kv_head, pos, d_head], value) -> (query, key, value) | None
    pattern(layer, scores [head, q_pos, k_pos], pattern [head, q_pos, k_pos]) -> pattern | None
    """

    inputs: Callable[[int, Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor] | None] | None = None
    pattern: Callable[[int, Tensor, Tensor], Tensor | None] | None = None


@contextlib.contextmanager
def attention_seam(attn_modules: list[nn.Module], hooks: SeamHooks) -> Iterator[None]:
    """Wrap each attention module's modeling-file `eager_attention_forward` while the block runs.

    Batch size must be 1 (qktrace traces one prompt at a time); tensors given to hooks drop it.
    """
    layer_of = {id(m): i for i, m in enumerate(attn_modules)}
    modules = {sys.modules[type(m).__module__] for m in attn_modules}
    originals = {mod: mod.eager_attention_forward for mod in modules}

    def make(orig: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(module, query, key, value, attention_mask, *args, **kwargs):  # type: ignore[no-untyped-def]
            layer = layer_of.get(id(module))
            if layer is None:
                return orig(module, query, key, value, attention_mask, *args, **kwargs)
            if hooks.inputs is not None:
                new = hooks.inputs(layer, query[0], key[0], value[0])
                if new is not None:
                    query, key, value = (t.unsqueeze(0) for t in new)
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


@dataclass
class Recorder:
    """Mutable scratch space the capture hooks write into; turned into a frozen Trace afterwards."""

    resid: dict[int, Tensor] = field(default_factory=dict)
    attn_out: dict[int, Tensor] = field(default_factory=dict)
    mlp_in: dict[int, Tensor] = field(default_factory=dict)
    mlp_out: dict[int, Tensor] = field(default_factory=dict)
    norm_in: dict[tuple[str, int], Tensor] = field(default_factory=dict)
    q: dict[int, Tensor] = field(default_factory=dict)
    k: dict[int, Tensor] = field(default_factory=dict)
    v: dict[int, Tensor] = field(default_factory=dict)
    scores: dict[int, Tensor] = field(default_factory=dict)
    patterns: dict[int, Tensor] = field(default_factory=dict)
