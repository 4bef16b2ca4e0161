"""`qktrace.jobs.dashboards` in one process: every number against a brute-force second path, exact merges,
resuming, the corpus formats, the file contracts (the web UI's and circuit-tracer's), bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pydantic import BaseModel

import qktrace
from qktrace.errors import InputError
from qktrace.jobs.corpus import count_documents, iter_documents
from qktrace.jobs.dashboards import HIST_EDGES, DashboardOptions, Partial, auto_label, build_dashboards, merge
from qktrace.models import load_model
from qktrace.saes import load_saes
from qktrace.server.schemas import Dashboard
from qktrace.testing import JOB_SAES as SAES
from qktrace.testing import JobSetup as Setup
from qktrace.testing import make_job_setup, tree, write_corpus

OPTS = DashboardOptions(seq_len=24, docs_per_shard=4, batch_tokens=24, n_contexts=3, label_pool=5, before=3, after=2)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    return make_job_setup(tmp_path_factory.mktemp("dash"))


@pytest.fixture(scope="module")
def reference(setup: Setup, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ref")
    build_dashboards(setup.model, setup.saes, setup.corpus, out, options=OPTS, device="cpu", circuit_tracer=True)
    return out


def _brute_force(setup: Setup, c: int) -> dict[str, Any]:
    """Per feature: (act, doc, offset, window ids) of every firing, counts, histograms, from `Model.run` (the
    one-prompt capture, a second code path) on each chunk, encoded as tracing encodes."""
    model = load_model(setup.model)
    sae = load_saes(setup.saes, model)[c]
    body = OPTS.seq_len - 1  # the word tokenizer puts BOS first; every chunk gets one
    docs = list(iter_documents(setup.corpus))
    fired: dict[int, list[tuple[float, int, int, list[int]]]] = {}
    n_tokens = 0
    for d, text in enumerate(docs):
        toks = model.tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(toks), body):
            ids = [model.tokenizer.bos_token_id] + toks[start : start + body]
            resid = model.run(torch.tensor(ids)).resid[c][1:]  # BOS is not counted
            acts = sae.encode(resid)
            n_tokens += len(resid)
            for p, f in zip(*torch.nonzero(acts > 0, as_tuple=True)):
                pos = int(p) + 1
                window = [ids[q] if 0 <= q < len(ids) else -1 for q in range(pos - OPTS.before, pos + OPTS.after + 1)]
                fired.setdefault(int(f), []).append((float(acts[p, f]), d, start + int(p), window))
    return {"fired": fired, "n_tokens": n_tokens, "d_sae": sae.d_sae}


@pytest.mark.parametrize("c", sorted(SAES))
def test_every_number_matches_a_brute_force_pass(setup: Setup, reference: Path, c: int) -> None:
    bf = _brute_force(setup, c)
    model = load_model(setup.model)
    vocab = [model.tokenizer.decode([i]) for i in range(len(model.tokenizer))]
    dash = json.loads((reference / SAES[c][0] / "dashboards.json").read_text())
    labels = json.loads((reference / SAES[c][0] / "labels.json").read_text())
    assert dash["version"] == 1 and dash["checkpoint"] == c and dash["n_tokens"] == bf["n_tokens"]
    assert set(dash["features"]) == {str(f) for f in bf["fired"]}
    assert {f for f, lab in labels.items() if lab == "dead"} == {str(f) for f in range(bf["d_sae"])} - set(
        dash["features"]
    )
    for f, rows in bf["fired"].items():
        d = dash["features"][str(f)]
        rows.sort(key=lambda r: (-r[0], r[1], r[2]))  # the total order: activation, then document, then offset
        assert d["freq"] == round(len(rows) / bf["n_tokens"], 5)
        assert d["max_act"] == round(rows[0][0], 3)
        for ctx, (act, _, _, window) in zip(d["contexts"], rows, strict=False):
            kept = [t for t in window if t >= 0]
            assert ctx["tokens"] == [vocab[t] for t in kept] and ctx["act"] == round(act, 3)
            assert ctx["tokens"][ctx["i"]] == vocab[window[OPTS.before]]
        assert len(d["contexts"]) == min(OPTS.n_contexts, len(rows))
        bins = [max(0, min(len(HIST_EDGES) - 2, int((np.float32(a) >= HIST_EDGES).sum()) - 1)) for a, *_ in rows]
        want = np.bincount(bins, minlength=len(HIST_EDGES) - 1)
        got = np.zeros_like(want)
        got[d["hist"]["lo"] : d["hist"]["lo"] + len(d["hist"]["counts"])] = d["hist"]["counts"]
        assert got.tolist() == want.tolist()
        assert labels[str(f)] == d["label"]
        Dashboard.model_validate(d)  # the web UI's contract


def test_top_outputs_through_hf_final_norm_and_unembedding(setup: Setup, reference: Path) -> None:
    model = load_model(setup.model)
    hf, saes = model.hf, load_saes(setup.saes, model)
    vocab = [model.tokenizer.decode([i]) for i in range(hf.config.vocab_size)]
    for c, (hook, _) in SAES.items():
        dash = json.loads((reference / hook / "dashboards.json").read_text())
        with torch.no_grad():  # RMSNorm at unit scale is its gain; HF's own modules' weights
            logits = (saes[c].W_dec * hf.model.norm.weight) @ hf.lm_head.weight.T
        for f, d in dash["features"].items():
            assert d["top_out"] == [vocab[int(t)] for t in logits[int(f)].topk(OPTS.n_out).indices]
            assert d["bottom_out"] == [vocab[int(t)] for t in (-logits[int(f)]).topk(OPTS.n_out).indices]


def _random_partial(rng: np.random.Generator, d_sae: int, n: int, docs: range) -> Partial:
    feature = rng.integers(0, d_sae, n)
    act = rng.choice(np.float32([0.5, 1.0, 1.5, 2.0]), n)  # many exact ties
    doc = rng.integers(docs.start, docs.stop, n)
    offset = rng.permutation(n).astype(np.int64)  # one firing per (feature, token): offsets unique here
    window = rng.integers(0, 50, (n, 4))
    hist = rng.integers(0, 3, (d_sae, 90))
    return Partial(n, np.bincount(feature, minlength=d_sae), hist, feature, act, doc, offset, window)


def test_merge_is_exact_in_any_grouping() -> None:
    rng = np.random.default_rng(0)
    parts = [_random_partial(rng, 7, 60, range(10 * i, 10 * i + 10)) for i in range(5)]
    one = merge(parts, keep=4)
    for grouping in ([[0, 1], [2, 3, 4]], [[4], [2, 0], [3, 1]]):
        merged = merge([merge([parts[i] for i in g], keep=4) for g in grouping], keep=4)
        for name in ("count", "hist", "feature", "act", "doc", "offset", "window"):
            assert np.array_equal(getattr(merged, name), getattr(one, name)), name
    # the top 4 per feature of the union, by (-act, doc, offset), built by hand
    rows = [(int(f), -float(a), int(d), int(o)) for p in parts for f, a, d, o in zip(p.feature, p.act, p.doc, p.offset)]
    want = [r for f in range(7) for r in sorted(x for x in rows if x[0] == f)[:4]]
    got = list(zip(one.feature.tolist(), (-one.act).tolist(), one.doc.tolist(), one.offset.tolist()))
    assert got == want and one.n_tokens == 300


class _Stop(Exception):
    pass


def test_interrupted_job_resumes_to_the_same_files(setup: Setup, reference: Path, tmp_path: Path) -> None:
    def stop_after_two(p: Any) -> None:
        if p.done >= 2:
            raise _Stop

    with pytest.raises(_Stop):
        build_dashboards(
            setup.model, setup.saes, setup.corpus, tmp_path, options=OPTS, device="cpu", progress=stop_after_two
        )
    assert len(list((tmp_path / "shards").glob("*.npz"))) == 2 and not (tmp_path / "index.json").exists()
    seen: list[Any] = []
    result = build_dashboards(
        setup.model,
        setup.saes,
        setup.corpus,
        tmp_path,
        options=OPTS,
        device="cpu",
        circuit_tracer=True,
        progress=seen.append,
    )
    assert result.resumed == 2 and seen[0].done == 2 and seen[-1].done == result.shards == 8
    assert tree(tmp_path) == tree(reference)


def test_a_folder_holding_another_job_is_refused(setup: Setup, reference: Path, tmp_path: Path) -> None:
    other = write_corpus(tmp_path / "other.jsonl", n_docs=5, seed=9)
    before = tree(reference)
    with pytest.raises(InputError, match="holds another job") as e:
        build_dashboards(setup.model, setup.saes, other, reference, options=OPTS, device="cpu")
    assert "\n" not in str(e.value) and tree(reference) == before


def test_corpus_formats_read_the_same_documents(setup: Setup, tmp_path: Path) -> None:
    docs = list(iter_documents(setup.corpus))
    (tmp_path / "a.txt").write_text("\n".join(docs[:10]) + "\n\n")
    sub = tmp_path / "b"
    sub.mkdir()
    (sub / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[10:]))
    assert list(iter_documents(tmp_path)) == docs and count_documents(tmp_path) == len(docs)
    datasets = pytest.importorskip("datasets", reason="datasets is not installed (pip install 'qktrace[scale]')")
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "ds"))
    assert list(iter_documents(tmp_path / "ds")) == docs and count_documents(tmp_path / "ds") == len(docs)


def test_bad_input_is_one_line_before_any_work(setup: Setup, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    cases: list[tuple[Any, str, dict[str, Any]]] = [
        (tmp_path / "missing.jsonl", "does not exist", {}),
        (bad, "line 2 is not JSON", {}),
        (setup.corpus, "workers=0", {"workers": 0}),
        (
            setup.corpus,
            r"no SAE at checkpoint 5 \(loaded: .*\): load an SAE",
            {"options": DashboardOptions(checkpoints=(0, 5))},
        ),
    ]
    bad.write_text('{"text": "w1 w2"}\nnot json\n')
    for corpus, message, kw in cases:
        out = tmp_path / f"out{len(message)}"
        with pytest.raises(InputError, match=message) as e:
            build_dashboards(setup.model, setup.saes, corpus, out, device="cpu", **kw)
        assert "\n" not in str(e.value)
    with pytest.raises(InputError, match="max_docs=0") as e:  # the options check themselves, before any work
        build_dashboards(
            setup.model, setup.saes, setup.corpus, tmp_path / "o0", device="cpu", options=DashboardOptions(max_docs=0)
        )
    assert "\n" not in str(e.value)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(InputError, match="no documents"):
        build_dashboards(setup.model, setup.saes, tmp_path / "empty.jsonl", tmp_path / "o", device="cpu")
    tracer = qktrace.Tracer.load(setup.model, setup.saes)
    limit = tracer.model.max_positions
    assert limit is not None
    with pytest.raises(InputError, match=f"seq_len {limit + 1} is more than the {limit} positions"):
        build_dashboards(tracer, None, setup.corpus, tmp_path / "o", options=DashboardOptions(seq_len=limit + 1))
    with pytest.raises(InputError, match=r"nothing answers at Ray address 127.0.0.1:1 \(.*at most 10 s"):
        build_dashboards(setup.model, setup.saes, setup.corpus, tmp_path / "o", ray_address="127.0.0.1:1")
    with pytest.raises(InputError, match="Ray workers load their own replica"):
        build_dashboards(tracer, None, setup.corpus, tmp_path / "o", workers=2)
    assert not (tmp_path / "o").exists()


def test_progress_bar_draws_shards_and_tokens_per_second() -> None:
    from rich.console import Console

    from qktrace.jobs.pool import Progress, progress_bar

    console = Console(record=True, width=120, force_terminal=False)
    with progress_bar("dashboards", console=console) as update:
        update(Progress(0, 4, 1, 0, 0.0))
        update(Progress(3, 4, 1, 2000, 2.0))
    text = console.export_text()
    assert "3/4" in text and "1,000 tokens/s" in text


def test_labels() -> None:
    assert auto_label([" Paris"] * 5, [" in"] * 5) == "in Paris"
    assert auto_label([" Paris"] * 4 + [" Rome"], ["a", "b", "c", "d", "e"]) == "' Paris'".replace(" ", "", 1)
    assert auto_label(["7", "12", "3", "5", "9"], ["a", "b", "c", "d", "e"]) == "number"
    assert auto_label(["a", "b", "a", "c", "d"], ["x", "y", "z", "u", "v"], [" Paris", " Rome"]) == "a/b → 'Paris'"
    assert auto_label(["a", "b", "a", "c", "d"], ["x", "y", "z", "u", "v"], ["1", "2", "3", "x", "4"]) == "a/b → number"
    assert auto_label(["a", "b", "a", "c", "d"], ["x", "y", "z", "u", "v"], ["b", "q"]) == "a/b"  # writes what it reads
    assert auto_label([], []) == "dead"
    assert auto_label([" x"] * 5, ["\n"] * 5) == "⏎ x"  # whitespace visible, never a literal "\n" or a repr
    assert auto_label([" "] * 5, ["a", "b", "c", "d", "e"]) == "'␣'"


class _CTExample(BaseModel):  # circuit-tracer's frontend feature file (feature_models.py), field by field
    tokens_acts_list: list[float]
    train_token_ind: int
    is_repeated_datapoint: bool
    tokens: list[str]


class _CTQuantile(BaseModel):
    quantile_name: str
    examples: list[_CTExample]


class _CTFeature(BaseModel):
    transcoder_id: str
    index: int
    examples_quantiles: list[_CTQuantile]
    top_logits: list[str]
    bottom_logits: list[str]
    act_min: float
    act_max: float
    quantile_values: list[float]
    histogram: list[float]
    activation_frequency: float


def test_circuit_tracer_feature_files(reference: Path) -> None:
    index = json.loads((reference / "index.json").read_text())
    folder = reference / index["circuit_tracer_features"]
    for c, (hook, _) in SAES.items():
        dash = json.loads((reference / hook / "dashboards.json").read_text())
        for f, d in list(dash["features"].items())[:5]:
            node = (c + int(f)) * (c + int(f) + 1) // 2 + int(f)  # the graph JSON's feature id for (c, f)
            ct = _CTFeature.model_validate_json((folder / f"{node}.json").read_text())
            ex = ct.examples_quantiles[0].examples[0]
            assert (
                ct.index == int(f)
                and ct.act_max == d["max_act"]
                and ex.tokens_acts_list[ex.train_token_ind] == d["max_act"]
            )
