"""`qktrace.models.residuals`: batched residuals equal HF's own hidden states and the one-prompt trace."""

from __future__ import annotations

import pytest
import torch

from qktrace.errors import InputError, OutOfRangeError
from qktrace.models import residuals
from qktrace.testing import random_prompt


def _batch(model, n: int = 3, length: int = 9) -> torch.Tensor:
    rows = [model.tokenize(random_prompt(length - 1, seed=s)) for s in range(n)]
    return torch.stack([r[:length] for r in rows])


def test_every_checkpoint_equals_hf_hidden_states_and_the_trace(tiny_models, family) -> None:
    model = tiny_models[family]
    ids = _batch(model)
    got = residuals(model, ids)
    assert sorted(got) == list(range(model.n_layers + 1))
    with torch.no_grad():  # HF's hidden_states[c] is the input of block c for c < n_layers
        hidden = model.hf(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    for c in range(model.n_layers):
        assert got[c].shape == ids.shape + (model.d_model,)
        torch.testing.assert_close(got[c], hidden[c], rtol=0, atol=0)
    for b in range(len(ids)):  # the final checkpoint, against the one-prompt capture of Model.run
        want = model.run(ids[b]).resid[model.n_layers]  # float32 rounding of a batch of 1 vs 3
        torch.testing.assert_close(got[model.n_layers][b].float(), want, rtol=0, atol=1e-5 * float(want.abs().max()))


def test_subset_stops_early_and_right_padding_leaves_real_positions(tiny_models) -> None:
    model = tiny_models["llama"]
    ids = _batch(model, n=2, length=8)
    full = residuals(model, ids)
    calls: list[int] = []
    handle = model.hf.get_output_embeddings().register_forward_hook(lambda *a: calls.append(1))
    try:
        early = residuals(model, ids, [1, 0])
    finally:
        handle.remove()
    assert sorted(early) == [0, 1] and calls == []  # the unembedding never ran
    torch.testing.assert_close(early[1], full[1], rtol=0, atol=0)
    padded = torch.cat([ids, torch.zeros(2, 3, dtype=ids.dtype)], dim=1)
    got = residuals(model, padded, [2])[2]
    torch.testing.assert_close(got[:, :8], full[2], rtol=1e-6, atol=1e-6)


def test_bad_input(tiny_models) -> None:
    model = tiny_models["gpt2"]
    with pytest.raises(InputError, match=r"\[batch, pos\]"):
        residuals(model, torch.tensor([1, 2, 3]))
    with pytest.raises(OutOfRangeError, match="checkpoint 9"):
        residuals(model, torch.tensor([[1, 2, 3]]), [9])
