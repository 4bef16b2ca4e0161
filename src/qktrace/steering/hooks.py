"""The hooks that run a plan of interventions (`qktrace.steering.interventions`): residual, MLP and attention
output adds, recomputed scores of steered heads, frozen / patched / scaled patterns, and the recorders.

Every hook is an ordinary torch hook installed by a context manager (`applied`) that always removes it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..models.anatomy import Layer
from ..models.capture import SeamHooks, attention_seam, first_tensor, forward_hooks, output_tensor
from ..models.model import Model
from ..models.trace import Trace


@dataclass
class Plan:
    """The explicit numbers of a list of interventions for one sequence (scratch, built per run)."""

    resid_add: dict[int, Tensor] = field(default_factory=dict)  # checkpoint -> [pos, d_model]
    mlp_add: dict[int, Tensor] = field(default_factory=dict)  # layer -> [pos, d_model] added to the MLP's output
    attn_add: dict[int, Tensor] = field(default_factory=dict)  # layer -> added to the attention module's output
    post_attn_add: dict[int, Tensor] = field(default_factory=dict)  # layer -> added after the post-attention norm
    q_delta: dict[int, Tensor] = field(default_factory=dict)  # layer -> [head, pos, d_head]
    k_delta: dict[int, Tensor] = field(default_factory=dict)  # layer -> [head, pos, d_head] per query head
    recompute: dict[int, set[int]] = field(default_factory=dict)  # layer -> heads whose scores change
    frozen: set[tuple[int, int]] = field(default_factory=set)
    head_scale: dict[tuple[int, int], float] = field(default_factory=dict)
    patched: dict[tuple[int, int], Trace] = field(default_factory=dict)  # (layer, head) -> the trace it reads


@dataclass
class Record:
    resid: dict[int, Tensor] = field(default_factory=dict)
    scores: dict[int, Tensor] = field(default_factory=dict)
    patterns: dict[int, Tensor] = field(default_factory=dict)


def recomputed(
    ly: Layer, plan: Plan, layer: int, q: Tensor, k: Tensor, x: Tensor, probs: Tensor, masked: Tensor
) -> tuple[Tensor, Tensor]:
    """(scores, pattern) of `layer` with the plan's heads recomputed from their steered queries and keys."""
    kv = ly.kv_head
    x, new = x.clone(), probs.clone()
    for h in sorted(plan.recompute[layer]):
        qh, kh = q[h], k[kv[h]]  # [pos, d_head]
        if layer in plan.q_delta:
            qh = qh + plan.q_delta[layer][h].to(qh.dtype)
        if layer in plan.k_delta:
            kh = kh + plan.k_delta[layer][h].to(kh.dtype)
        s = torch.matmul(qh, kh.T) * ly.scale  # [q_pos, k_pos]
        if ly.softcap is not None:
            s = ly.softcap * torch.tanh(s / ly.softcap)
        x[h] = torch.where(masked[h], x[h], s)
        new[h] = torch.softmax(x[h].float(), dim=-1).to(probs.dtype)
    return x, new


def replaced(plan: Plan, clean: Trace | None, layer: int, new: Tensor, probs: Tensor) -> Tensor:
    """The pattern with the plan's frozen, patched and scaled heads of `layer` put in."""
    heads = [h for (ly_, h) in plan.frozen if ly_ == layer]
    scaled = [(h, s) for (ly_, h), s in plan.head_scale.items() if ly_ == layer]
    patched = [(h, src) for (ly_, h), src in plan.patched.items() if ly_ == layer]
    if not (heads or scaled or patched):
        return new
    new = new.clone() if new is probs else new
    if heads:
        assert clean is not None
        new[heads] = clean.pattern(layer, heads=heads).to(device=new.device, dtype=new.dtype)
    for h, src in patched:
        new[h] = src.pattern(layer, heads=[h])[0].to(device=new.device, dtype=new.dtype)
    for h, factor in scaled:
        new[h] = new[h] * factor
    return new


@contextlib.contextmanager
def applied(model: Model, plan: Plan, clean: Trace | None, record: set[int]) -> Iterator[Record]:
    """Install the plan's hooks plus recorders (attention of the layers in `record`); every hook is
    removed on exit, even on error."""
    an, L = model.anatomy, model.n_layers
    blocks: list[torch.nn.Module] = list(model.blocks)
    rec = Record()
    seen: dict[int, tuple[Tensor, Tensor]] = {}

    def steer_in(add: Tensor) -> Callable[..., Any]:
        def hook(mod: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            x = first_tensor(args, kwargs)
            x = x + add.to(x.dtype)[None]
            if args and isinstance(args[0], Tensor):
                return (x, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": x}

        return hook

    def steer_out(add: Tensor) -> Callable[..., Any]:
        def hook(mod: Any, args: Any, kwargs: Any, out: Any) -> Any:
            x = output_tensor(out)
            x = x + add.to(x.dtype)[None]
            return x if isinstance(out, Tensor) else (x, *out[1:])

        return hook

    def record_in(c: int) -> Callable[..., Any]:
        return lambda mod, args, kwargs: rec.resid.__setitem__(c, first_tensor(args, kwargs)[0].detach())

    def record_out(mod: Any, args: Any, kwargs: Any, out: Any) -> None:
        rec.resid[L] = output_tensor(out)[0].detach()

    def on_inputs(layer: int, q: Tensor, k: Tensor, v: Tensor) -> None:
        if layer in plan.recompute:
            seen[layer] = (q, k)
        return None

    def on_pattern(layer: int, x: Tensor, probs: Tensor) -> Tensor | None:
        masked = x <= torch.finfo(x.dtype).min / 2
        new = probs
        if layer in plan.recompute:
            x, new = recomputed(an.layers[layer], plan, layer, *seen.pop(layer), x, probs, masked)
        new = replaced(plan, clean, layer, new, probs)
        if layer in record:
            rec.scores[layer] = x.detach().float().masked_fill(masked, float("-inf"))
            rec.patterns[layer] = new.detach().float()
        return None if new is probs else new

    steer_pre = [(blocks[c], steer_in(add)) for c, add in plan.resid_add.items() if c < L]
    steer_post = [(blocks[-1], steer_out(plan.resid_add[L]))] if L in plan.resid_add else []
    steer_post += [(model.modules.mlp[j], steer_out(add)) for j, add in plan.mlp_add.items()]
    steer_post += [(model.modules.attn[j], steer_out(add)) for j, add in plan.attn_add.items()]
    if plan.post_attn_add:
        assert model.modules.post_attn is not None
        steer_post += [(model.modules.post_attn[j], steer_out(add)) for j, add in plan.post_attn_add.items()]
    with (
        attention_seam(model.attn_modules, SeamHooks(inputs=on_inputs, pattern=on_pattern)),  # first: it locks
        forward_hooks(steer_pre, pre=True),
        forward_hooks(steer_post),
        forward_hooks([(b, record_in(c)) for c, b in enumerate(blocks)], pre=True),
        forward_hooks([(blocks[-1], record_out)]),
    ):
        yield rec
