"""Files name the model, never the machine: graph, mechanism and comparison JSON carry a model's hub id
or its folder's name (the embedded one: "demo"), unless the user asks for the full path
(`ModelOptions.full_path`, `--full-path`). A graph's slug hashes that name, so copies of one model in two
folders give one slug."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import qktrace
from qktrace.analyses.explain import explain
from qktrace.config import DEMO_MODEL, DEMO_SAES
from qktrace.errors import InputError
from qktrace.models import public_name
from qktrace.options import ModelOptions
from qktrace.testing import make_job_setup

PROMPT, OTHER = "the cat sat on the mat and the cat", "the dog sat on the mat and the cat"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return make_job_setup(tmp_path_factory.mktemp("names"))


def written(tracer: qktrace.Tracer, out: Path) -> dict[str, str]:
    """Every file a graph, an explanation and a comparison write, as text."""
    out.mkdir()
    a, b = tracer.run(PROMPT), tracer.run(OTHER)
    graph = a.graph(progress=False)
    graph.save(out / "g.graph.json")
    explain(tracer, PROMPT, " sat", graph=graph).save_json(out / "g.mechanism.json")
    (out / "c.compare.json").write_text(json.dumps(a.compare(b).to_json(top=5)))
    return {p.name: p.read_text() for p in out.iterdir()}


def test_files_carry_the_folder_name_not_the_path(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    tracer = qktrace.Tracer.load(setup.model, setup.saes)
    files = written(tracer, tmp_path / "out")
    root = str(setup.model.parent)
    assert root.startswith("/") and len(files) == 3
    for name, text in files.items():
        assert root not in text, name  # neither the model's nor the SAEs' folder
    meta = json.loads(files["g.graph.json"])["metadata"]
    assert meta["qktrace"]["model"] == setup.model.name == "model" and meta["scan"] == "model"


def test_full_path_when_asked(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    tracer = qktrace.Tracer.load(setup.model, setup.saes, full_path=True)
    graph = tracer.run(PROMPT).graph(progress=False)
    assert json.loads(graph.save(tmp_path / "g.json").read_text())["metadata"]["qktrace"]["model"] == str(
        setup.model.resolve()
    )
    with pytest.raises(InputError, match="full_path"):
        ModelOptions(full_path="yes")  # type: ignore[arg-type]


def test_one_slug_wherever_the_model_lies(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    copy = shutil.copytree(setup.model, tmp_path / "elsewhere" / "model")
    slugs = [qktrace.Tracer.load(m, setup.saes).run(PROMPT).graph(progress=False).to_json()["metadata"]["slug"]
             for m in (setup.model, copy)]  # fmt: skip
    assert slugs[0] == slugs[1]
    named = qktrace.Tracer.load(setup.model, setup.saes, full_path=True).run(PROMPT).graph(progress=False)
    assert named.to_json()["metadata"]["slug"] != slugs[0]  # the slug hashes the name the file carries


def test_public_name(tmp_path: Path) -> None:
    assert public_name("gpt2") == "gpt2" and public_name("google/gemma-2-2b") == "google/gemma-2-2b"
    assert public_name(DEMO_MODEL) == public_name(DEMO_SAES) == "demo"
    folder = tmp_path / "my-finetune"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_name_or_path": "Qwen/Qwen3-0.6B"}))
    assert public_name(folder) == "Qwen/Qwen3-0.6B"  # the hub id its config records
    (folder / "config.json").write_text(json.dumps({"_name_or_path": str(tmp_path / "checkpoints" / "x")}))
    assert public_name(folder) == "my-finetune"  # a recorded path is no better than ours
    (folder / "config.json").write_text(json.dumps({"_name_or_path": str(tmp_path)}))
    assert public_name(folder) == "my-finetune"  # an existing folder is not a hub id
    assert public_name(folder, full_path=True) == str(folder.resolve())
