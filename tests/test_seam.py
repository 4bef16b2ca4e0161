"""The attention seam belongs to the model it is attached to: two models traced and steered in two threads at
once give exactly what they give one after the other, a plain HF model beside them is untouched, and nothing
process-wide (softmax, a modeling file's eager attention) is patched."""

from __future__ import annotations

import copy
import importlib
import sys
import threading

import torch
import transformers as T

from qktrace.models.capture import SEAM_IMPLEMENTATION, SeamHooks, attention_seam
from qktrace.server.compute import Engine
from qktrace.steering.interventions import ScaleHead, SteerQK, run_with
from qktrace.testing import TINY_FAMILIES, random_prompt, random_saes, randomize, tiny_config
from qktrace.tracer import Tracer

FAMILIES = ("llama", "gemma2")  # GQA + rotary; soft-capping + sliding window
PROMPT = random_prompt(12, seed=7)


def work(model, saes) -> list[torch.Tensor]:
    """A trace and a steered run (query-side QK steer + a scaled head), as the numbers they give."""
    trace = model.run(PROMPT)
    p = trace.n_pos - 1
    f = int(saes[1].encode(trace.resid[1])[p].argmax())
    ivs = [SteerQK(1, 1, "query", f, p, scale=-2.0), ScaleHead(0, 2, 0.5)]
    res = run_with(model, saes, PROMPT, ivs, clean=trace, record_attention=True)
    return [trace.q[1], trace.k[1], trace.pattern(1), trace.last_logits, res.logits, res.patterns[1], res.scores[1]]


def modeling_modules():
    return [importlib.import_module(f"transformers.models.{f}.modeling_{f}") for f in TINY_FAMILIES]


def test_two_models_in_two_threads_at_once_equal_one_after_the_other(tiny_models):
    models = [tiny_models[f] for f in FAMILIES]
    saes = [random_saes(m, "standard", d_sae=24, seed=i, b_enc=torch.ones(24)) for i, m in enumerate(models)]
    alone = [work(m, s) for m, s in zip(models, saes)]
    # both threads must be inside their model's seam (its lock held, its hooks installed) at the same moment:
    # a lock shared by the two models would leave one thread waiting here until the barrier breaks
    both_hooked: list[bool] = []  # checked while both threads wait at the barrier
    barrier = threading.Barrier(
        2, action=lambda: both_hooked.append(all(m.seam.hooks is not None for m in models)), timeout=30
    )

    def meet(module, args, kwargs):
        barrier.wait()

    handles = [m.attn_modules[1].register_forward_pre_hook(meet, with_kwargs=True) for m in models]
    results: dict[int, list[list[torch.Tensor]]] = {0: [], 1: []}
    errors: list[BaseException] = []

    def thread(i: int) -> None:
        try:
            results[i].append(work(models[i], saes[i]))  # meets the other thread in its trace and steered run
            handles[i].remove()
            for _ in range(4):
                results[i].append(work(models[i], saes[i]))
        except BaseException as e:  # re-raised in the main thread
            errors.append(e)

    threads = [threading.Thread(target=thread, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for h in handles:
        h.remove()
    assert not errors, errors
    assert both_hooked == [True, True]  # met in the trace and in the steered run of their first round
    for i in range(2):
        assert len(results[i]) == 5
        for got in results[i]:
            assert all(torch.equal(a, b) for a, b in zip(got, alone[i], strict=True))


def test_each_model_has_its_own_seam_and_lock(tiny_models):
    a, b = tiny_models["llama"], tiny_models["qwen3"]
    assert a.seam is not b.seam and a.seam.lock is not b.seam.lock
    assert all(m.config._attn_implementation == SEAM_IMPLEMENTATION for m in (a.hf, b.hf))
    # the server holds the model's own lock, so servers of two models never wait for each other
    ea, eb = Engine(Tracer(a)), Engine(Tracer(b))
    assert ea.lock is a.seam.lock and eb.lock is b.seam.lock
    # a copy of a wrapped model gets a seam of its own
    twin = copy.deepcopy(a.hf)
    seams = {id(twin.model.layers[i].self_attn.qktrace_seam) for i in range(a.n_layers)}
    assert len(seams) == 1 and id(a.seam) not in seams


def plain_hf(family: str):
    hf = T.AutoModelForCausalLM.from_config(tiny_config(family, 100), attn_implementation="eager").eval()
    randomize(hf, seed=3)
    return hf


def plain_forward(hf, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    with torch.no_grad():
        out = hf(input_ids=ids, output_attentions=True, use_cache=False)
    return out.logits, list(out.attentions)


def test_a_plain_hf_model_beside_a_traced_one_is_untouched(tiny_models):
    model = tiny_models["llama"]
    other = plain_hf("llama")  # same family: same modeling file, same eager_attention_forward
    ids = torch.randint(0, 100, (1, 10), generator=torch.Generator().manual_seed(0))
    before = plain_forward(other, ids)
    during: list[tuple[torch.Tensor, list[torch.Tensor]]] = []

    def inputs(layer, q, k, v):  # the traced model's hooks are installed: run the plain model now
        if layer == 1:
            during.append(plain_forward(other, ids))

    with attention_seam(model.attn_modules, SeamHooks(inputs=inputs, pattern=lambda *a: None)):
        model.forward(model.tokenize(PROMPT))
    model.run(PROMPT)
    run_with(model, {}, PROMPT, [ScaleHead(1, 0, 0.0)])
    after = plain_forward(other, ids)
    assert other.config._attn_implementation == "eager"
    assert not any(hasattr(m.self_attn, "qktrace_seam") for m in other.model.layers)
    for got in (during[0], after):
        assert torch.equal(got[0], before[0])
        assert all(torch.equal(x, y) for x, y in zip(got[1], before[1], strict=True))


def test_nothing_process_wide_is_patched(tiny_models):
    softmax = torch.nn.functional.softmax
    eager = {mod: mod.eager_attention_forward for mod in modeling_modules()}
    seen: list[bool] = []

    def same_globals() -> bool:
        return torch.nn.functional.softmax is softmax and all(
            mod.eager_attention_forward is fn and fn.__module__ == mod.__name__ for mod, fn in eager.items()
        )

    def pattern(layer, scores, probs):  # called inside the seam's eager attention call
        seen.append(same_globals())
        return probs * 0.5 if layer == 0 else None

    for family in TINY_FAMILIES:
        model = tiny_models[family]
        assert sys.modules[type(model.attn_modules[0]).__module__] in eager  # its modeling file is checked
        ids = model.tokenize(PROMPT)
        with attention_seam(model.attn_modules, SeamHooks(pattern=pattern)):
            halved = model.forward(ids)
        assert not torch.allclose(halved, model.forward(ids))  # the replaced pattern was used
        model.run(PROMPT)
        run_with(model, {}, PROMPT, [ScaleHead(1, 0, 0.0)], record_attention=True)
        assert model.seam.hooks is None
    assert len(seen) == 2 * len(TINY_FAMILIES) and all(seen)
    assert same_globals()
