"""`qktrace.jobs.batch` in one process: each prompt's files are what tracing it alone through the public API
gives; the summary's numbers are HF's own; resuming; the optional explain hook; bad prompts files."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch

import qktrace
from qktrace.errors import InputError
from qktrace.jobs.batch import BatchOptions, read_prompts, trace_batch
from qktrace.options import GraphOptions
from qktrace.testing import JobSetup as Setup
from qktrace.testing import make_job_setup, tree

PROMPTS = [
    {"prompt": "Aunt Sally is the w1 . Aunt", "answer": " Sally", "rival": " Bob", "id": "aunt"},
    {"prompt": "w3 w8 w2 of the w9 w4"},
    {"prompt": "Uncle Bob , w5 w6 . Uncle", "answer": " Bob"},
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    return make_job_setup(tmp_path_factory.mktemp("batch"))


@pytest.fixture(scope="module")
def prompts(setup: Setup) -> Path:
    path = setup.corpus.parent / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return path


@pytest.fixture(scope="module")
def reference(setup: Setup, prompts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("batch-ref")
    trace_batch(setup.model, setup.saes, prompts, out, device="cpu")
    return out


def test_each_prompt_as_traced_alone(setup: Setup, prompts: Path, reference: Path, tmp_path: Path) -> None:
    tracer = qktrace.Tracer.load(setup.model, setup.saes)
    ids = ["aunt", "p00001", "p00002"]
    rows = [json.loads(line) for line in (reference / "summary.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ids
    for spec, pid, row in zip(PROMPTS, ids, rows):
        traced = tracer.run(spec["prompt"])
        graph = traced.graph(progress=False)
        assert (reference / "prompts" / pid / "graph.json").read_bytes() == graph.save(tmp_path / "g.json").read_bytes()
        qk = json.loads((reference / "prompts" / pid / "qk.json").read_text())
        heads = graph.top_heads(3)
        assert [(h["layer"], h["head"]) for h in qk["heads"]] == [(h["layer"], h["head"]) for h in heads]
        for h in qk["heads"]:
            want = json.loads(json.dumps(traced.qk(h["layer"], h["head"], -1).to_json(top=20)))
            assert {k: v for k, v in h.items() if k != "influence"} == want
        assert row == json.loads((reference / "prompts" / pid / "summary.json").read_text())
        with torch.no_grad():  # the summary's numbers against HF's own logits
            logits = tracer.model.hf(input_ids=tracer.tokenize(spec["prompt"])[None]).logits[0, -1]
        probs = logits.softmax(-1)
        assert row["top_token"] == tracer.model.tokenizer.decode([int(logits.argmax())])
        assert row["top_prob"] == pytest.approx(float(probs.max()), rel=1e-5)
        if "answer" in spec:
            a = tracer.model.token_id(spec["answer"])
            assert row["answer_prob"] == pytest.approx(float(probs[a]), rel=1e-4, abs=1e-7)
        if "rival" in spec:
            r = tracer.model.token_id(spec["rival"])
            assert row["logit_diff"] == pytest.approx(float(logits[a] - logits[r]), abs=1e-4)
        assert row["n_nodes"] == len(graph.nodes)
        assert row["explained"] is ("answer" in spec)  # qktrace.analyses.explain runs where a prompt names its answer
        if "answer" in spec:
            mech = json.loads((reference / "prompts" / pid / "explain.json").read_text())
            assert mech["answer_id"] == a and mech["rival_given"] is ("rival" in spec)


def test_interrupted_batch_resumes_to_the_same_files(
    setup: Setup, prompts: Path, reference: Path, tmp_path: Path
) -> None:
    class Stop(Exception):
        pass

    def stop(p: Any) -> None:
        if p.done >= 1:
            raise Stop

    with pytest.raises(Stop):
        trace_batch(setup.model, setup.saes, prompts, tmp_path, device="cpu", progress=stop)
    assert sorted(p.parent.name for p in tmp_path.rglob("summary.json")) == ["aunt"]
    result = trace_batch(setup.model, setup.saes, prompts, tmp_path, device="cpu")
    assert result.resumed == 1 and tree(tmp_path) == tree(reference)


@dataclasses.dataclass
class _Mechanism:
    prompt: str
    answer: str
    rival: str | None


def test_explain_when_qktrace_has_it(setup: Setup, prompts: Path, tmp_path: Path, monkeypatch) -> None:
    calls: list[tuple[str, str | None]] = []

    def explain(tracer: Any, prompt: str, answer: str, rival: str | None = None) -> _Mechanism:
        calls.append((answer, rival))
        return _Mechanism(prompt, answer, rival)

    monkeypatch.setattr(qktrace.jobs.batch, "explain", explain)
    trace_batch(
        setup.model,
        setup.saes,
        prompts,
        tmp_path,
        device="cpu",
        options=BatchOptions(graph=GraphOptions(qk_terms=False)),
    )
    assert calls == [(" Sally", " Bob"), (" Bob", None)]
    assert json.loads((tmp_path / "prompts" / "aunt" / "explain.json").read_text())["rival"] == " Bob"
    assert not (tmp_path / "prompts" / "p00001" / "explain.json").exists()
    rows = [json.loads(line) for line in (tmp_path / "summary.jsonl").read_text().splitlines()]
    assert [r["explained"] for r in rows] == [True, False, True]


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"prompt": "w1"}', "nope"], "line 2 is not JSON"),
        (['{"answer": " w1"}'], 'line 1 has no non-empty "prompt"'),
        (['{"prompt": "w1", "rival": " w2"}'], 'names a "rival" but no "answer"'),
        (['{"prompt": "w1", "id": "a/b"}'], "id 'a/b' must be"),
        (['{"prompt": "w1", "id": "x"}', '{"prompt": "w2", "id": "x"}'], "already used on line 1"),
        (['{"prompt": "w1", "answer": " w1 w2"}'], r"line 1 \(p00000\): answer ' w1 w2' is 2 tokens"),
        (['{"prompt": "w1"}', '{"prompt": "w1", "answer": " w2", "rival": " w2"}'], 'line 2: the "rival" is the'),
        (['{"prompt": "w1"}', '{"prompt": "w1", "answer": "' + " w2" * 40_000 + '"}'], r"line 2 \(p00001\)"),
    ],
)
def test_bad_prompts_are_one_line(setup: Setup, tmp_path: Path, lines: list[str], message: str) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=message) as e:
        trace_batch(setup.model, setup.saes, path, tmp_path / "out", device="cpu")
    assert "\n" not in str(e.value) and len(str(e.value)) < 400 and not (tmp_path / "out").exists()


def test_a_corrected_prompts_file_resumes(setup: Setup, prompts: Path, reference: Path, tmp_path: Path) -> None:
    """The job is its options: prompts already traced for the same text are kept, a changed one is traced
    again, and the result equals a fresh run of the corrected file."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(reference, out)
    fixed = [dict(p) for p in PROMPTS]
    fixed[2]["answer"] = " Uncle"
    path = tmp_path / "fixed.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in fixed))
    result = trace_batch(setup.model, setup.saes, path, out, device="cpu")
    assert result.resumed == 2
    fresh = trace_batch(setup.model, setup.saes, path, tmp_path / "fresh", device="cpu")
    assert fresh.resumed == 0 and tree(out) == tree(tmp_path / "fresh")
    assert json.loads((out / "prompts" / "p00002" / "summary.json").read_text())["answer"] == " Uncle"


def test_a_folder_of_the_users_files_is_refused(setup: Setup, prompts: Path, tmp_path: Path) -> None:
    (tmp_path / "summary.jsonl").write_text("mine\n")
    with pytest.raises(InputError, match="no job.json"):
        trace_batch(setup.model, setup.saes, prompts, tmp_path, device="cpu")
    assert [p.name for p in tmp_path.iterdir()] == ["summary.jsonl"]
    assert (tmp_path / "summary.jsonl").read_text() == "mine\n"


def test_default_ids_follow_prompt_order(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "w1"}\n\n{"prompt": "w2", "id": "mine"}\n{"prompt": "w3"}\n')
    assert [(r.id, r.line) for r in read_prompts(path)] == [("p00000", 1), ("mine", 3), ("p00002", 4)]


def test_job_files_name_the_model_not_its_folder(setup: Setup, reference: Path) -> None:
    files = [p for p in reference.rglob("*") if p.is_file()]
    assert len(files) > 5 and str(setup.model).startswith("/")
    for p in files:
        assert str(setup.model.parent).encode() not in p.read_bytes(), p  # neither the model's nor the SAEs' folder
    job = json.loads((reference / "job.json").read_text())
    assert (job["model"], job["saes"]) == ("model", "saes")
