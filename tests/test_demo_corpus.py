"""The demo recipe (`recipes/demo`, beside the package): corpus generator, tokenizer, SAE training path."""

from __future__ import annotations

import re

import pytest

from recipes.demo.corpus import (
    EVAL_FAMILIES,
    FINALS_HELDOUT,
    INTROS_HELDOUT,
    PAPER_PROMPTS,
    SUM_A,
    SUM_B,
    eval_items,
    required_tokens,
    sum_heldout,
    training_documents,
)
from recipes.demo.world import ALL_NAMES, HELDOUT_NAMES, TITLES, TRAIN_NAMES


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return training_documents(seed=7, n=300)


def test_deterministic() -> None:
    assert training_documents(3, 5) == training_documents(3, 5)
    assert training_documents(3, 5) != training_documents(4, 5)
    assert eval_items(11, 5) == eval_items(11, 5)


def test_name_split() -> None:
    assert len(TRAIN_NAMES) >= 300 and len(HELDOUT_NAMES) >= 30
    assert not set(TRAIN_NAMES) & set(HELDOUT_NAMES)
    assert set(TRAIN_NAMES) | set(HELDOUT_NAMES) == set(ALL_NAMES)


def test_heldout_names_only_in_prose(docs: list[str]) -> None:
    """Held-out names are met in filler prose (trained embeddings) but never after a title, i.e. never
    in an induction pattern: that is what the "unseen names" eval asks the model to generalise to."""
    names = "|".join(HELDOUT_NAMES)
    titles = "|".join(re.escape(t) for t in TITLES)
    in_prose = [m.group(0) for d in docs for m in re.finditer(rf"\b({names})\b", d)]
    after_title = [m.group(0) for d in docs for m in re.finditer(rf"\b({titles}) ({names})\b", d)]
    assert len(in_prose) > 20 and after_title == []


def test_heldout_templates_and_sums_never_in_training(docs: list[str]) -> None:
    text = "\n".join(docs)
    for t in INTROS_HELDOUT + FINALS_HELDOUT:
        assert t.split("{")[0].strip() not in text
    held = {(a, b) for a in SUM_A for b in SUM_B if sum_heldout(a, b)}
    assert 0.1 < len(held) / (len(SUM_A) * len(SUM_B)) < 0.2
    seen = {(int(a), int(b)) for a, b in re.findall(r"\b(\d+)\+(\d+)=", text)}
    assert seen and not seen & held


def test_eval_items_shape() -> None:
    items = eval_items(seed=5, n_per_family=20)
    assert {it.family for it in items} == set(EVAL_FAMILIES)
    for it in items:
        assert it.answer and not it.prompt.endswith(" ")
    fams = {it.family: it for it in items}
    assert fams["induction_heldout_names"].answer.strip() in HELDOUT_NAMES
    mc = [it for it in items if it.family == "multiple_choice"]
    assert len({it.answer for it in mc}) >= 3  # the correct option is in varied positions
    yn = [it.answer for it in items if it.family.startswith("yes_no")]
    assert set(yn) == {" Yes", " No"}


def test_answers_are_single_tokens(docs: list[str]) -> None:
    from recipes.demo.tokenizer import single_token_id, train_tokenizer

    tok = train_tokenizer(docs[:200], required_tokens(), vocab_size=3072)
    items = eval_items(seed=5, n_per_family=50) + list(PAPER_PROMPTS)
    assert all(single_token_id(tok, it.answer) is not None for it in items)
    # Prompt + answer tokenizes as prompt tokens + the answer token (no merge across the boundary).
    for it in items[::7]:
        full = tok(it.prompt + it.answer)["input_ids"]
        assert full[:-1] == tok(it.prompt)["input_ids"]
        assert full[-1] == single_token_id(tok, it.answer)
        assert full[0] == tok.bos_token_id
    names = [n for n in ALL_NAMES if single_token_id(tok, " " + n) is not None]
    assert len(names) == len(ALL_NAMES)


def test_sae_training_path_uses_the_library(tmp_path) -> None:
    """The recipe's residuals are HF's own hidden states (BOS dropped); a trained SAE, frozen into the
    library's `SAE` and written by `save_sae_lens`, loads back and encodes as the trainer computes."""
    import torch

    from qktrace.config import DEMO_MODEL
    from qktrace.models import load_model
    from qktrace.saes import load_saes, save_sae_lens
    from recipes.demo.train_saes import collect, corpus_blocks, hook_name, train_sae

    model = load_model(DEMO_MODEL)
    blocks = corpus_blocks(model.tokenizer, seed=5, n_docs=3)
    acts = collect(model, blocks, batch=2)  # [checkpoint, n_tokens, d_model]
    with torch.no_grad():
        hidden = model.hf(input_ids=blocks[:2], output_hidden_states=True, use_cache=False).hidden_states
    n_first = 2 * (blocks.shape[1] - 1)
    for c in range(model.n_layers):  # hidden_states[c] is the input of layer c (the last one is post-norm)
        torch.testing.assert_close(acts[c, :n_first], hidden[c][:, 1:].flatten(0, 1), rtol=0, atol=0)
    trainer, steps = train_sae(acts[1], d_sae=64, k=4, steps=3, seconds=60, seed=0, batch=64)
    assert steps == 3
    saved = save_sae_lens(trainer.to_sae(1, hook_name(1, model.n_layers)), tmp_path / "blocks.1.hook_resid_pre")
    sae = load_saes(saved, model)[1]
    x = acts[1, :50]
    with torch.no_grad():
        x_hat, idx, val, _ = trainer(x)
        dense = torch.zeros(50, 64).scatter(-1, idx, val)
    torch.testing.assert_close(sae.encode(x), dense, rtol=0, atol=0)
    torch.testing.assert_close(sae.decode(sae.encode(x)), x_hat, rtol=1e-5, atol=1e-5)
