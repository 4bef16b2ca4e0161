"""The shipped demo model and SAEs, through exactly the path users take, and the case-study runner.

`qktrace demo` runs once (module fixture); the tests read what it wrote and check it against direct
computations: the induction mechanism, rebuilt from its JSON and run with `run_with`, hands the answer
to the distractor through the steered heads' attention; the QK decomposition is exact; the
concordance/discordance heads of the yellow/red pair are exactly the heads whose attention to the
object moves that much between the two prompts, read from the traces themselves.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import qktrace
from qktrace import FreezeAttention, SteerQK, run_with
from qktrace.cli import main
from qktrace.config import DEMO_MODEL, DEMO_SAES
from qktrace.demo.both_ways import STRATEGY2
from qktrace.demo.run import BOTH_WAYS, CASES, PAIRS, SHIFT, correctness, report
from recipes.demo.corpus import EVAL_FAMILIES, training_documents


@pytest.fixture(scope="module")
def tracer() -> qktrace.Tracer:
    return qktrace.Tracer.load("demo")  # the name users type; its SAEs come with it


def test_assets_are_small_and_complete() -> None:
    assets = Path(DEMO_MODEL).parent
    size = sum(p.stat().st_size for p in assets.rglob("*") if p.is_file())
    assert size < 40 * 2**20
    ev = json.loads((Path(DEMO_MODEL) / "eval.json").read_text())
    assert set(ev["heldout_accuracy"]) == set(EVAL_FAMILIES)


def test_shipped_saes_reconstruct_held_out_text(tracer: qktrace.Tracer) -> None:
    """Measured here, not read from eval.json: variance explained and L0 of every shipped SAE on
    documents of a seed the SAEs never saw (BOS excluded)."""
    docs = training_documents(seed=987_654, n=6, min_chars=400)
    for c, sae in tracer.saes.items():
        xs = torch.cat([tracer.run(d).trace.resid[c][1:] for d in docs])  # [tokens, d_model]
        acts = sae.encode(xs)
        recon = sae.decode(acts)
        ve = 1 - float((xs - recon).pow(2).sum() / (xs - xs.mean(0)).pow(2).sum())
        l0 = float((acts > 0).sum(-1).float().mean())
        assert ve >= 0.9, (c, ve)
        assert 0 < l0 <= 32, (c, l0)


def test_demo_loads_like_any_checkpoint(tracer: qktrace.Tracer) -> None:
    model, saes = tracer.model, tracer.saes
    assert model.name == "demo"  # 'demo' is resolved once, at the entry point; load_model takes the path
    assert qktrace.load_model(DEMO_MODEL).name == "demo"  # by its path too: files never name the machine
    assert qktrace.load_model(DEMO_MODEL, full_path=True).name == str(DEMO_MODEL.resolve())  # unless asked
    assert len(saes) == len(qktrace.load_saes(DEMO_SAES, model))
    assert model.family == "llama" and model.n_heads == 8 and model.anatomy.layers[0].n_kv_heads == 4
    assert sorted(saes) == list(range(model.n_layers + 1))  # an SAE at every checkpoint
    labels = [saes[c].label(f) for c in saes for f in range(0, 1024, 97)]
    assert sum(lab != "dead" and not lab.startswith("f") for lab in labels) >= 0.9 * len(labels)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--no-serve", "--out", str(out)]) == 0  # `qktrace demo --no-serve`: run_demo via the CLI
    return out


def test_demo_files_name_no_path_and_each_graph_once(demo_dir: Path) -> None:
    """An upload publishes what the files say: the model is "demo", not where the package lies; and
    Neuronpedia refuses a second graph under one slug."""
    files = [p for p in demo_dir.rglob("*") if p.is_file()]
    where = (str(Path(qktrace.__file__).resolve().parent.parent), str(DEMO_MODEL), str(demo_dir))
    assert len(files) > 10 and all(w.startswith("/") for w in where)
    for p in files:
        data = p.read_bytes()
        assert not any(w.encode() in data for w in where), p
    graphs = [json.loads(p.read_text()) for p in demo_dir.glob("*.graph.json")]
    assert {g["metadata"]["qktrace"]["model"] for g in graphs} == {"demo"}
    slugs = [g["metadata"]["slug"] for g in graphs]
    assert len(slugs) == len(set(slugs)) >= len(CASES)
    assert "Model: `demo`" in (demo_dir / "report.md").read_text()


def test_run_demo_writes_everything(demo_dir: Path) -> None:
    md = (demo_dir / "report.md").read_text()
    for case in CASES:
        assert case.title in md
        assert (demo_dir / f"{case.slug}.mechanism.png").read_bytes()[:4] == b"\x89PNG"
        graph = json.loads((demo_dir / f"{case.slug}.graph.json").read_text())
        assert graph["nodes"] and graph["links"]
        mech = json.loads((demo_dir / f"{case.slug}.mechanism.json").read_text())
        assert mech["answer"] == case.answer and mech["candidates"]
        assert mech["nulls"] and mech["verdict"] in md and mech["goes_to"] in ("rival", "other", "nowhere", "")
        assert mech["nulls"][0]["candidate"] == mech["winner"]  # the winner is tested first
    for pair in PAIRS:
        assert pair.title in md
        for name, prompt in (("true", pair.true), ("false", pair.false)):
            graphed = [c.slug for c in CASES if c.prompt == prompt]  # a case study's graph of the same prompt
            file = f"{graphed[0]}.graph.json" if graphed else f"{pair.slug}.{name}.graph.json"
            assert f"`{file}` ({name})" in md  # the report names the file that holds it
            assert json.loads((demo_dir / file).read_text())["metadata"]["prompt"].endswith(prompt)  # after BOS
        assert json.loads((demo_dir / f"{pair.slug}.last.compare.json").read_text())["differing"]
    assert "concordance" in md and "discordance" in md and "W_QK skew" in md
    assert md.count("patterns patched from B into A") == len(PAIRS)  # both pairs, shown causally


def test_one_case_is_traced_on_transcoders_and_attention_saes_too(tracer: qktrace.Tracer, demo_dir: Path) -> None:
    """The case's plain transcoder graph is its own file (a transcoder graph, its own slug); the strategy-2
    heads are read from head loadings that sum over heads, and its key head's QK terms are this model's."""
    case = next(c for c in CASES if c.slug == BOTH_WAYS)
    md = (demo_dir / "report.md").read_text()
    assert f"## {case.title}: residual SAEs against transcoders" in md
    plain = json.loads((demo_dir / f"{case.slug}.transcoders.graph.json").read_text())
    assert plain["metadata"]["qktrace"]["settings"]["graph"] == "transcoder"
    residual = json.loads((demo_dir / f"{case.slug}.graph.json").read_text())
    assert plain["metadata"]["slug"] != residual["metadata"]["slug"]
    assert any(n["node_id"].startswith("transcoder/") for n in plain["nodes"])
    s2 = json.loads((demo_dir / f"{case.slug}.checkpointed.graph.json").read_text())
    assert s2["metadata"]["qktrace"]["settings"]["graph"] == "checkpointed"
    assert len({plain["metadata"]["slug"], residual["metadata"]["slug"], s2["metadata"]["slug"]}) == 3
    g = qktrace.load_graph(demo_dir / f"{case.slug}.checkpointed.graph.json")
    assert 0 < g.replacement <= 1 and 0 < g.completeness <= 1
    heads = g.top_heads(3)
    assert heads and sum(h["influence"] for h in heads) <= 1 + 1e-6
    row = md[md.index(STRATEGY2) :].split("\n")[0]  # its row of the table: the key head is the top head
    layer, head = heads[0]["layer"], heads[0]["head"]
    assert f"L{layer}H{head} (key position " in row
    key = int(row.split(f"L{layer}H{head} (key position ")[1].split(")")[0])
    assert any(n.node.kind.value == "attn" for n in g.nodes)
    traced = tracer.run(case.prompt)
    assert traced.str_tokens[key] == case.answer  # the strategy-2 key head reads the name it copies


def test_induction_mechanism_hands_the_answer_to_the_distractor(tracer: qktrace.Tracer, demo_dir: Path) -> None:
    case = CASES[0]
    mech = json.loads((demo_dir / "induction.mechanism.json").read_text())
    assert mech["prediction"] == case.answer and mech["p_answer"] > 0.9 and mech["rival"] == case.rival
    assert sum(h["influence"] for h in mech["heads"][:3]) > 0.4  # a few heads carry the cross-position influence
    best = mech["candidates"][mech["best"]]
    flip = next(p for p in best["curve"] if p["top_token"] == case.rival)  # the distractor takes over
    # rebuilt from the JSON and run independently of explain
    ivs: list = [
        SteerQK(part["layer"], tuple(part["heads"]), part["side"], f, part["position"], scale=flip["scale"])
        for part in best["parts"]
        for f in part["features"]
    ]
    layers = sorted({part["layer"] for part in best["parts"]})
    res = run_with(tracer.model, tracer.saes, case.prompt, [*ivs, FreezeAttention()], record_attention=layers)
    probs = torch.softmax(res.logits[-1], -1)
    assert tracer.model.str_tokens(probs.argmax().reshape(1))[0] == case.rival
    assert float(probs[mech["answer_id"]]) < 0.5 * mech["p_answer"]
    # ... through the steered heads' attention to the name, which they attend to in the clean run
    traced = tracer.run(case.prompt)
    q, name = traced.trace.n_pos - 1, traced.str_tokens.index(case.answer)
    part = best["parts"][0]
    assert part["key_pos"] == name
    for h in part["heads"]:
        assert float(traced.pattern(part["layer"], h, q)[name]) > 0.9
        assert float(res.patterns[part["layer"]][h, q, name]) < 0.5
    qk = json.loads((demo_dir / "induction.qk.json").read_text())
    assert qk["max_relative_error"] < 1e-4  # the decomposition sums to the model's own score


def test_correctness_pair_heads_are_read_from_the_traces(tracer: qktrace.Tracer, tmp_path: Path) -> None:
    pair = PAIRS[0]
    r = correctness(tracer, pair, tmp_path)
    yes_true, yes_false = r.answers
    assert yes_true > 0 > yes_false  # the model says Yes to yellow, No to red
    a, b = tracer.run(pair.true), tracer.run(pair.false)
    key = a.str_tokens.index(pair.key)
    model = tracer.model
    for query, pos in (("last", a.trace.n_pos - 1), ("value", a.str_tokens.index(pair.value))):
        want = {}
        for layer in range(model.n_layers):
            for h in range(model.n_heads):
                t, f = float(a.pattern(layer, h, pos)[key]), float(b.pattern(layer, h, pos)[key])
                if abs(t - f) >= SHIFT:
                    want[f"L{layer}H{h}"] = "concordance" if t > f else "discordance"
        got = {h["name"]: h["role"] for h in r.heads if h["query"] == query}
        assert got == want
    assert {h["role"] for h in r.heads} == {"concordance", "discordance"}
    md = report([], [r], tracer, 1.0)
    assert pair.title in md and "mean skew" in md
