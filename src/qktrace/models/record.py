"""Capturing one forward pass into a `Trace`: `capture(handles, anatomy, recorder)` installs the hooks,
`assemble(anatomy, recorder, ...)` turns what they recorded into the frozen Trace.

Every hook keeps O(pos) numbers only: a norm's input is reduced to its frozen scale on the spot, the
attention seam keeps q, k, v and the run of keys each query may see (read off HF's mask), never a
[head, q_pos, k_pos] tensor. Each number stays on the device its layer ran on, in float32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from ..config import MEMORY
from .anatomy import Anatomy, Norm
from .capture import SeamHooks, attention_seam, first_tensor, forward_hooks, key_range, output_tensor
from .families import ModuleHandles
from .trace import PatternCache, PerLayer, Trace

Hook = Callable[..., Any]


@dataclass
class Recorder:
    """Mutable scratch space the capture hooks write into; turned into a frozen Trace by `assemble`."""

    resid: dict[int, Tensor] = field(default_factory=dict)
    mlp_in: dict[int, Tensor] = field(default_factory=dict)
    mlp_out: dict[int, Tensor] = field(default_factory=dict)
    scales: dict[tuple[str, int], Tensor] = field(default_factory=dict)
    q: dict[int, Tensor] = field(default_factory=dict)
    k: dict[int, Tensor] = field(default_factory=dict)
    v: dict[int, Tensor] = field(default_factory=dict)
    key_range: dict[int, Tensor] = field(default_factory=dict)


def _hooks(handles: ModuleHandles, anatomy: Anatomy, rec: Recorder) -> tuple[list[Any], list[Any], SeamHooks]:
    """(forward-pre hooks, forward hooks, seam hooks) that fill `rec`."""
    L = len(handles.blocks)
    layers = anatomy.layers
    cdt = anatomy.compute_dtype
    keep = lambda x: x.detach().to(cdt)  # noqa: E731

    def pre_block(i: int) -> Hook:
        # accelerate moves a block's input to the block's device inside its forward, after this hook:
        # keep checkpoint i on layer i's device ourselves
        dev = layers[i].device
        return lambda mod, args, kwargs: rec.resid.__setitem__(i, keep(first_tensor(args, kwargs)[0]).to(dev))

    def post_last(mod: Any, args: Any, kwargs: Any, out: Any) -> None:
        rec.resid[L] = keep(output_tensor(out)[0]).to(layers[-1].device)

    def scale_of(key: str, i: int, norm: Norm, transpose: bool = False) -> Hook:
        def hook(mod: Any, args: Any, kwargs: Any, out: Any) -> None:
            s = norm.scale(keep(first_tensor(args, kwargs)[0]))  # QK-norm input: [pos, head, d_head]
            rec.scales[(key, i)] = s.T.contiguous() if transpose else s

        return hook

    def mlp_io(i: int) -> Hook:
        def hook(mod: Any, args: Any, kwargs: Any, out: Any) -> None:
            rec.mlp_in[i] = keep(first_tensor(args, kwargs)[0])
            rec.mlp_out[i] = keep(output_tensor(out)[0])

        return hook

    def seam_inputs(i: int, q: Tensor, k: Tensor, v: Tensor) -> None:
        rec.q[i], rec.k[i], rec.v[i] = keep(q), keep(k), keep(v)
        return None

    def seam_mask(i: int, mask: Tensor | None) -> None:
        q = rec.q[i]
        rec.key_range[i] = key_range(mask, q.shape[1], rec.k[i].shape[1], q.device)

    pre: list[Any] = [(b, pre_block(i)) for i, b in enumerate(handles.blocks)]
    post: list[Any] = [(handles.blocks[-1], post_last)]
    for key, mods, norms in (
        ("ln_attn", handles.ln_attn, [ly.ln_attn for ly in layers]),
        ("ln_mlp", handles.ln_mlp, [ly.ln_mlp for ly in layers]),
        ("post_attn", handles.post_attn, [ly.post_attn for ly in layers]),
        ("post_mlp", handles.post_mlp, [ly.post_mlp for ly in layers]),
        ("q_norm", handles.q_norm, [ly.q_norm for ly in layers]),
        ("k_norm", handles.k_norm, [ly.k_norm for ly in layers]),
    ):
        if mods is not None:
            post += [(m, scale_of(key, i, n, key in ("q_norm", "k_norm"))) for i, (m, n) in enumerate(zip(mods, norms))]  # type: ignore[arg-type]
    post.append((handles.final_norm, scale_of("final", 0, anatomy.final_norm)))
    post += [(m, mlp_io(i)) for i, m in enumerate(handles.mlp)]
    return pre, post, SeamHooks(inputs=seam_inputs, mask=seam_mask)


@contextlib.contextmanager
def capture(handles: ModuleHandles, anatomy: Anatomy, rec: Recorder) -> Iterator[None]:
    """Hooks on the real HF modules that record one forward pass into `rec`, under the model's lock; always
    removed."""
    pre, post, seam = _hooks(handles, anatomy, rec)
    with attention_seam(handles.attn, seam), forward_hooks(pre, pre=True), forward_hooks(post):  # the seam locks
        yield


def assemble(anatomy: Anatomy, rec: Recorder, tokens: Tensor, str_tokens: tuple[str, ...], logits: Tensor) -> Trace:
    """The frozen Trace of what `rec` captured (per-layer tensors stay on their layers' devices)."""
    L = anatomy.n_layers

    def per_layer(d: dict[int, Tensor], n: int = L) -> PerLayer:
        return PerLayer(d[i] for i in range(n))

    def scales(key: str) -> PerLayer | None:
        if (key, 0) not in rec.scales:
            return None
        return PerLayer(rec.scales[(key, i)] for i in range(L))

    missing = [i for i in range(L) if i not in rec.q or i not in rec.key_range]
    if missing:
        raise RuntimeError(f"the attention seam saw no call for layers {missing}: is the model in eager attention?")
    return Trace(
        anatomy=anatomy,
        tokens=tokens,
        str_tokens=str_tokens,
        resid=per_layer(rec.resid, L + 1),
        mlp_in=per_layer(rec.mlp_in),
        mlp_out=per_layer(rec.mlp_out),
        scale_ln_attn=scales("ln_attn"),  # type: ignore[arg-type]
        scale_ln_mlp=scales("ln_mlp"),  # type: ignore[arg-type]
        scale_post_attn=scales("post_attn"),
        scale_post_mlp=scales("post_mlp"),
        scale_final=rec.scales[("final", 0)],
        scale_q_norm=scales("q_norm"),
        scale_k_norm=scales("k_norm"),
        q=per_layer(rec.q),
        k=per_layer(rec.k),
        v=per_layer(rec.v),
        key_range=per_layer(rec.key_range),
        last_logits=logits.detach().to(anatomy.compute_dtype),
        cache=PatternCache(MEMORY.pattern_cache_bytes),
    )
