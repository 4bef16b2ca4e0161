"""Tokens owned by the model: the one single-token resolver, the one decoder, the one position resolver,
the (answer, rival) record, and the one error for a checkpoint without an SAE."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qktrace import Tracer, explain
from qktrace.errors import InputError, MissingSAEError, OutOfRangeError, QKTraceError
from qktrace.graph import build_graph
from qktrace.models import Contrast, Model, resolve_positions
from qktrace.saes import SAESet
from qktrace.steering.interventions import SteerFeature, run_with
from qktrace.steering.requests import SteerRequest, build_steering
from qktrace.testing import TINY_FAMILIES, WORDS, random_prompt, random_saes


def one_line(e: pytest.ExceptionInfo[BaseException]) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_single_token_on_every_family(tiny_models, family) -> None:
    model = tiny_models[family]
    tok = model.tokenizer
    vocab = model.anatomy.W_U.shape[1]
    assert vocab == model.anatomy.W_E.shape[0] == len(WORDS) + 2
    sally = tok.convert_tokens_to_ids("Sally")  # the tokenizer's own table, not its encoder
    assert model.to_single_token(" Sally") == model.to_single_token("Sally") == sally == WORDS.index("Sally") + 2
    assert model.token_id(" Sally") == sally  # the older name, the same resolver
    assert model.to_single_token(sally) == sally and model.to_single_token(np.int64(7)) == 7
    assert model.to_single_token(torch.tensor(vocab - 1)) == vocab - 1
    for bad in (vocab, -1, 10**9):
        with pytest.raises(OutOfRangeError) as e:
            model.to_single_token(bad, "answer")
        assert f"answer id {bad} is out of range: valid ids are 0..{vocab - 1}" in one_line(e)
    with pytest.raises(InputError) as e:
        model.to_single_token(" Aunt Sally", "rival")
    msg = one_line(e)
    assert "rival ' Aunt Sally' is 2 tokens" in msg and "['Aunt', 'Sally']" in msg
    assert "name a single token, e.g. its first piece 'Aunt'" in msg
    with pytest.raises(InputError, match=r"answer '' is empty: name a single token"):
        model.to_single_token("", "answer")
    for bad in (True, 2.0, None, [3]):
        with pytest.raises(InputError, match="neither a token string nor a token id"):
            model.to_single_token(bad)  # type: ignore[arg-type]


def test_single_token_without_tokenizer(tiny_models) -> None:
    bare = Model(tiny_models["gpt2"].hf, None, name="bare")
    assert bare.to_single_token(5) == 5
    with pytest.raises(InputError, match="model 'bare' has no tokenizer: give the answer as a token id"):
        bare.to_single_token(" Sally", "answer")
    assert bare.to_string([3, 4], special_tokens=False) == "<3> <4>" and bare.str_tokens([3, 4]) == ("<3>", "<4>")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_decoder_matches_the_tokenizer(tiny_models, family) -> None:
    model = tiny_models[family]
    tok = model.tokenizer
    ids = model.tokenize("Aunt Sally is the opposite of Uncle Bob")
    assert int(ids[0]) == tok.bos_token_id  # the tokenizer puts BOS first: the two rules differ
    raw = ids.tolist()
    kept = model.to_string(ids, special_tokens=True)
    assert kept == tok.decode(raw) and kept.startswith("<bos>")
    typed = model.to_string(raw, special_tokens=False)
    assert typed == tok.decode(raw, skip_special_tokens=True) == "Aunt Sally is the opposite of Uncle Bob"
    assert model.str_tokens(ids) == tuple(tok.decode([i]) for i in raw) == tuple(tok.convert_ids_to_tokens(raw))
    assert model.tokenize(typed).tolist() == raw  # round trip through the typed text


def test_contrast_against_independent_logits(tiny_models) -> None:
    model = tiny_models["llama"]
    prompt = "Aunt Sally is the opposite of Uncle Bob . Aunt"
    trace = model.run(prompt)
    ids = model.tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = model.hf(input_ids=ids).logits[0, -1].double()  # HF's own forward, no qktrace hooks
    top2 = ref.topk(2).indices.tolist()
    pair = Contrast.resolve(model, top2[0], None, trace.last_logits)
    assert (pair.answer_id, pair.rival_id, pair.rival_given) == (top2[0], top2[1], False)  # default: runner-up
    assert pair.answer == model.tokenizer.decode([top2[0]])
    assert pair.metric(trace.last_logits) == pytest.approx(float(ref[top2[0]] - ref[top2[1]]), abs=1e-4)
    bob = model.tokenizer.convert_tokens_to_ids("Bob")
    given = Contrast.resolve(model, " Sally", bob, trace.last_logits)
    sally = model.tokenizer.convert_tokens_to_ids("Sally")
    assert (given.answer_id, given.rival_id, given.rival, given.rival_given) == (sally, bob, "Bob", True)
    assert given.metric(trace.last_logits) == pytest.approx(float(ref[sally] - ref[bob]), abs=1e-4)
    assert given.metric(trace.last_logits) == -Contrast.resolve(model, bob, sally, trace.last_logits).metric(
        trace.last_logits
    )
    for rival in (" Sally", sally):
        with pytest.raises(InputError) as e:
            Contrast.tokens(model, "Sally", rival)
        assert f"the rival {rival!r} is the answer itself" in one_line(e)


def test_one_position_resolver() -> None:
    assert resolve_positions([3, -1, 3], 6) == [3, 5]  # merge: a set, sorted
    assert resolve_positions([4, 1], 6, repeats="refuse") == [4, 1]  # refuse: the order given
    assert resolve_positions(range(2, 4), 6) == [2, 3] and resolve_positions(slice(-2, None), 6) == [4, 5]
    with pytest.raises(InputError, match=r"position 2 is given twice \(negative positions count from the end\)"):
        resolve_positions([2, -4], 6, repeats="refuse")
    with pytest.raises(OutOfRangeError, match=r"key position 6 is out of range: valid values are -6..5"):
        resolve_positions([6], 6, what="key position")
    with pytest.raises(InputError, match="select nothing in a prompt of 6 tokens"):
        resolve_positions(slice(4, 2), 6)


def test_qk_refuses_a_repeated_key(tiny_models) -> None:
    model = tiny_models["llama"]
    traced = Tracer(model, random_saes(model, "topk")).run(random_prompt(6, 0))
    assert traced.qk(1, 0, -1, [2, 0]).key_positions == (2, 0)
    with pytest.raises(InputError, match="key position 2 is given twice"):
        traced.qk(1, 0, -1, [2, 2 - traced.trace.n_pos])


def test_missing_sae_is_one_error_from_every_entry_point(tiny_models) -> None:
    model = tiny_models["llama"]
    saes = random_saes(model, "topk")
    partial = SAESet({c: saes[c] for c in (0, 2)})  # checkpoint 1 (layer 1's input) has none
    traced = Tracer(model, partial).run("Aunt Sally is the opposite of Uncle Bob . Aunt")
    want = "no SAE at checkpoint 1 (loaded: 0, 2)"
    calls = {
        "SAESet[c]": lambda: partial[1],
        "Traced.sae": lambda: traced.sae(1),
        "Traced.qk": lambda: traced.qk(1, 0, -1),
        "graph build": lambda: build_graph(model, partial, traced.trace, progress=False),
        "Traced.graph": lambda: traced.graph(progress=False),
        "steering request": lambda: build_steering(traced, SteerRequest(feature=0, positions=1, heads=[(1, 0)])),
        "run_with": lambda: run_with(model, partial, traced.trace.tokens, [SteerFeature(1, 0, 1, scale=0.0)]),
        "explain": lambda: explain(Tracer(model, partial), "Aunt Sally is the opposite of Uncle Bob . Aunt", "Sally"),
    }
    for where, call in calls.items():
        with pytest.raises(QKTraceError) as e:
            call()
        assert type(e.value) is MissingSAEError, where
        msg = one_line(e)
        assert want in msg and "hook_name blocks.1.hook_resid_pre" in msg and "(saes=DIR)" in msg, (where, msg)
        assert "(--saes DIR)" in e.value.line("cli"), where
        assert "`qktrace serve --model MODEL --saes DIR`" in e.value.line("http"), where
    # the handlers written for the types these checks raised before still catch it
    assert issubclass(MissingSAEError, InputError) and issubclass(MissingSAEError, OutOfRangeError)
