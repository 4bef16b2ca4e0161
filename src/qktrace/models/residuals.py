"""The residual stream of a batch of token sequences at chosen checkpoints, read off the real HF modules.

`residuals(model, ids, checkpoints)` runs `ids [batch, pos]` through the Hugging Face model once, with
forward-pre hooks on `model.blocks` (block c's input is checkpoint c) and a forward hook on the last
block (checkpoint n_layers, before the final norm). The pass stops as soon as the last checkpoint asked
for is recorded, so reading early layers never pays for the rest of the model, its final norm or its
unembedding. Nothing is recomputed: every tensor is what HF's own block received, in the model's dtype,
on the device of the layer that read it.

This is the batched, corpus-scale sibling of `Model.run` (one prompt, every cache qktrace uses): SAE
training and feature dashboards call it on thousands of sequences.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..errors import InputError, check_index
from .capture import first_tensor, forward_hooks, output_tensor

if TYPE_CHECKING:
    from .model import Model


class _Enough(Exception):
    """Raised inside a hook once every asked-for checkpoint is recorded: the rest of the pass is skipped."""


def residuals(
    model: Model,
    ids: Tensor,
    checkpoints: Iterable[int] | None = None,
    *,
    attention_mask: Tensor | None = None,
) -> dict[int, Tensor]:
    """Residuals {checkpoint: [batch, pos, d_model]} of token ids `ids [batch, pos]` (default: every checkpoint).

    Checkpoint c < n_layers is the input of block c; checkpoint n_layers is the last block's output.
    `attention_mask [batch, pos]` is passed to HF as is (None: every position attends causally; right
    padding then leaves the real positions untouched). Tensors are detached, in the model's dtype.
    """
    n = model.n_layers
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise InputError(f"ids must have shape [batch, pos] with pos >= 1, got {list(ids.shape)}: batch the sequences")
    wanted = sorted(
        {check_index(int(c), n + 1, "checkpoint") for c in (range(n + 1) if checkpoints is None else checkpoints)}
    )
    if not wanted:
        return {}
    last = wanted[-1]
    store: dict[int, Tensor] = {}

    def pre(c: int) -> Any:
        def hook(mod: Any, args: Any, kwargs: Any) -> None:
            store[c] = first_tensor(args, kwargs).detach()
            if c == last:
                raise _Enough

        return hook

    def post(mod: Any, args: Any, kwargs: Any, out: Any) -> None:
        store[n] = output_tensor(out).detach()
        raise _Enough

    blocks = model.blocks
    pre_hooks = [(blocks[c], pre(c)) for c in wanted if c < n]
    post_hooks = [(blocks[n - 1], post)] if last == n else []
    kwargs: dict[str, Any] = {"use_cache": False}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask.to(model.device)
    hooks = (forward_hooks(pre_hooks, pre=True), forward_hooks(post_hooks))
    with torch.no_grad(), hooks[0], hooks[1], contextlib.suppress(_Enough):
        model.hf(input_ids=ids.to(model.device), **kwargs)
    missing = [c for c in wanted if c not in store]
    if missing:
        raise RuntimeError(f"no residual was recorded at checkpoints {missing}: the model skipped those blocks")
    return {c: store[c] for c in wanted}
