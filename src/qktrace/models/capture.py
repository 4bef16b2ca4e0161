"""Hooks on the real HF modules: capture one forward pass, or intervene inside attention.

Two mechanisms, both inside context managers that always remove themselves:

1. Ordinary torch forward hooks on the blocks, norms, attention and MLP modules (residual stream,
   frozen norm scales, MLP input/output).
2. The attention seam: the seam between (query, key) and scores. HF computes rotary/QK-norm inside the
   attention module and then calls the attention function its config names, `fn(module, query, key,
   value, mask, ...)`. `attach_seam` registers one function, `qktrace_eager`, through transformers'
   own `AttentionInterface` and sets it on the model it is given (`set_attn_implementation`); other
   models in the process keep theirs. It calls the module's own modeling-file `eager_attention_forward`
   (bitwise HF's eager attention), and while `attention_seam` has hooks installed on that model it
   shows them q and k after rotary and QK-norm and the mask HF applies -- and an intervention can
   replace q, k or the pattern there without touching anything else. The pattern is reached by a
   torch function mode around that one call (modes are per thread), never by patching softmax.

Threads: the hooks live on the model (`Seam`, an attribute of each of its attention modules), never in
the process. Each model has its own re-entrant lock, held while its hooks are installed: two threads
on one model are serialised (its torch hooks would see each other's forward passes), two models run
at once.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..errors import UnsupportedModelError

SEAM_IMPLEMENTATION = "qktrace_eager"  # the name the seam's attention function is registered under
_SEAM = "qktrace_seam"  # attribute of each attention module: its model's Seam
_LAYER = "qktrace_layer"  # attribute of each attention module: its layer
_SOFTMAX = torch.nn.functional.softmax  # what eager attention dispatches, even through someone's wrapper of it


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


class Seam:
    """The attention seam of one model: the hooks installed on it now (None: plain eager) and its lock."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.hooks: SeamHooks | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {}  # a copied model gets a seam of its own: no hooks, a fresh lock

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]


class _PatternSpy(TorchFunctionMode):
    """Inside one eager attention call on this thread: hand softmax's input and output to a pattern hook."""

    def __init__(self, layer: int, hook: Callable[[int, Tensor, Tensor], Tensor | None]):
        super().__init__()
        self.layer, self.hook = layer, hook

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func is not _SOFTMAX:
            return out
        new = self.hook(self.layer, args[0][0], out[0])
        return out if new is None else new.unsqueeze(0).to(out.dtype)


def seam_attention(
    module: nn.Module, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, *args: Any, **kwargs: Any
) -> Any:
    """The `qktrace_eager` attention function: the module's own eager attention, through its model's hooks."""
    eager = sys.modules[type(module).__module__].eager_attention_forward
    if getattr(module, "reorder_and_upcast_attn", False):  # GPT-2's eager path when its config asks for it
        eager = lambda m, q, k, v, mask, *a, **kw: m._upcast_and_reordered_attn(q, k, v, mask)  # noqa: E731
    seam: Seam | None = getattr(module, _SEAM, None)
    hooks = None if seam is None else seam.hooks
    if hooks is None:
        return eager(module, query, key, value, mask, *args, **kwargs)
    layer = getattr(module, _LAYER)
    if hooks.inputs is not None:
        new = hooks.inputs(layer, query[0], key[0], value[0])
        if new is not None:
            query, key, value = (t.unsqueeze(0) for t in new)
    if hooks.mask is not None:
        hooks.mask(layer, None if mask is None else mask[0])
    if hooks.pattern is None:
        return eager(module, query, key, value, mask, *args, **kwargs)
    with _PatternSpy(layer, hooks.pattern):
        return eager(module, query, key, value, mask, *args, **kwargs)


def attach_seam(hf: Any, attn_modules: Sequence[nn.Module]) -> Seam:
    """Give the HF model `hf` its attention seam (once; a second call returns the same one): register
    `qktrace_eager` with transformers and set it as this model's attention implementation."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(SEAM_IMPLEMENTATION, seam_attention)
    AttentionMaskInterface.register(SEAM_IMPLEMENTATION, eager_mask)
    seam = getattr(attn_modules[0], _SEAM, None) or Seam()
    for i, module in enumerate(attn_modules):
        setattr(module, _SEAM, seam)
        setattr(module, _LAYER, i)
    hf.set_attn_implementation(SEAM_IMPLEMENTATION)
    if hf.config._attn_implementation != SEAM_IMPLEMENTATION:
        raise UnsupportedModelError(
            f"{type(hf).__name__} cannot switch its attention implementation: qktrace needs a model whose "
            "attention goes through transformers' AttentionInterface"
        )
    return seam


def seam_of(attn_modules: Sequence[nn.Module]) -> Seam:
    """The seam `attach_seam` gave these modules' model."""
    seam = getattr(attn_modules[0], _SEAM, None)
    if seam is None:
        raise UnsupportedModelError("this HF model has no qktrace attention seam: wrap it in qktrace.Model first")
    return seam


@contextlib.contextmanager
def attention_seam(attn_modules: Sequence[nn.Module], hooks: SeamHooks) -> Iterator[Seam]:
    """Install `hooks` at the seam of the model these attention modules belong to, holding that model's
    lock; always removed. Enter it before any other hook of the same forward pass, so that those too are
    installed under the lock.

    Batch size must be 1 (qktrace traces one prompt at a time); tensors given to hooks drop it.
    """
    seam = seam_of(attn_modules)
    with seam.lock:
        if seam.hooks is not None:
            raise RuntimeError("the attention seam of this model already has hooks: do not nest traces")
        seam.hooks = hooks
        try:
            yield seam
        finally:
            seam.hooks = None


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
