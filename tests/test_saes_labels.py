"""Neuronpedia explanation exports (JSON from the API, JSONL.gz batches from its datasets) as feature labels."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from qktrace.errors import SAELoadError
from qktrace.saes import SAE, SAESet, load_saes, neuronpedia_labels, read_neuronpedia_labels, save_sae_lens
from qktrace.testing import random_sae

D, D_SAE = 8, 40


def sae(hook: str, checkpoint: int, neuronpedia_id: str = "", labels: dict | None = None) -> SAE:
    return random_sae(
        "standard", D, D_SAE, seed=checkpoint, checkpoint=checkpoint, std=(1.0, 0.0, 1.0, 0.0), hook_name=hook,
        apply_b_dec_to_input=True, neuronpedia_id=neuronpedia_id, labels=labels or {},
    )  # fmt: skip


def record(model: str, layer: str, index, text: str, **extra) -> dict:
    """One explanation as Neuronpedia exports it."""
    return {"modelId": model, "layer": layer, "index": index, "description": text,
            "explanationModelName": "gpt-4o-mini", "typeName": "oai_token-act-pair", **extra}  # fmt: skip


JB = SAESet(
    {
        0: sae("blocks.0.hook_resid_pre", 0, "gpt2-small/0-res-jb"),
        1: sae("blocks.1.hook_resid_pre", 1, "gpt2-small/1-res-jb", labels={5: "old five", 6: "old six"}),
        12: sae("blocks.11.hook_resid_post", 12, "gpt2-small/12-res-jb"),  # Neuronpedia numbers jb by checkpoint
    }
)


def test_api_export_json_by_neuronpedia_id(tmp_path: Path) -> None:
    export = tmp_path / "gpt2-small_1-res-jb.json"
    export.write_text(
        json.dumps(
            [
                record("gpt2-small", "1-res-jb", "5", " numbers in lists"),
                record("gpt2-small", "1-res-jb", "5", "a second explanation of 5"),  # the first one wins
                record("gpt2-small", "1-res-jb", 7, "  closing\n brackets "),
                record("gpt2-small", "1-res-jb", "8", "   "),  # empty: skipped
                record("gpt2-small", "12-res-jb", "39", "end of sentence"),
            ]
        )
    )
    labelled = read_neuronpedia_labels(export, JB)
    assert isinstance(labelled, SAESet) and labelled.checkpoints == JB.checkpoints
    assert dict(labelled[1].labels) == {5: "numbers in lists", 6: "old six", 7: "closing brackets"}
    assert dict(labelled[12].labels) == {39: "end of sentence"} and dict(labelled[0].labels) == {}
    assert labelled[1].label(7) == "closing brackets" and labelled[1].label(9) == "c1/f9"
    assert dict(JB[1].labels) == {5: "old five", 6: "old six"}  # the input set is unchanged
    assert torch.equal(labelled[1].W_enc, JB[1].W_enc)


def test_dataset_jsonl_gz_batches_by_layer_number(tmp_path: Path) -> None:
    """Gemma Scope's Neuronpedia number is the hook's layer: 1-gemmascope-res-16k is blocks.1.hook_resid_post."""
    saes = SAESet({2: sae("blocks.1.hook_resid_post", 2), 4: sae("blocks.3.hook_resid_post", 4)})
    folder = tmp_path / "v1" / "gemma-2-2b" / "1-gemmascope-res-16k" / "explanations"
    folder.mkdir(parents=True)
    for batch, rows in enumerate([[("1", 3, "cats")], [("1", "4", "dogs"), ("3", "0", "verbs")]]):
        lines = [json.dumps(record("gemma-2-2b", f"{n}-gemmascope-res-16k", i, t, id=f"x{i}")) for n, i, t in rows]
        (folder / f"batch-{batch}.jsonl.gz").write_bytes(gzip.compress(("\n".join(lines) + "\n\n").encode()))
    got = neuronpedia_labels(tmp_path / "v1", saes)
    assert got == {2: {3: "cats", 4: "dogs"}, 4: {0: "verbs"}}


def test_unknown_and_ambiguous_layers_are_one_line(tmp_path: Path) -> None:
    export = tmp_path / "e.jsonl"
    export.write_text(
        "\n".join(json.dumps(record("gpt2-small", layer, "1", "x")) for layer in ("1-res-jb", "7-res-jb", "7-res-jb"))
    )
    with pytest.raises(SAELoadError) as e:
        read_neuronpedia_labels(export, JB)
    msg = str(e.value)
    assert "\n" not in msg and "gpt2-small/7-res-jb" in msg and "gpt2-small/1-res-jb" in msg.split("(loaded")[1]
    assert "layers=" in msg
    both = SAESet({1: sae("blocks.1.hook_resid_pre", 1), 2: sae("blocks.1.hook_resid_post", 2)})
    one = tmp_path / "one.json"
    one.write_text(json.dumps([record("m", "1-res-x", "2", "two")]))
    with pytest.raises(SAELoadError, match="1-res-x"):  # layer 1 is both checkpoint 1 and 2 here
        neuronpedia_labels(one, both)
    assert neuronpedia_labels(one, both, layers={"1-res-x": 2}) == {2: {2: "two"}}
    with pytest.raises(SAELoadError, match="checkpoint 3"):
        neuronpedia_labels(one, both, layers={"1-res-x": 3})


def test_bad_records_and_files(tmp_path: Path) -> None:
    cases = {
        "range.json": json.dumps([record("gpt2-small", "0-res-jb", str(D_SAE), "too far")]),
        "index.json": json.dumps([record("gpt2-small", "0-res-jb", "abc", "not a number")]),
        "layer.json": json.dumps([record("gpt2-small", 0, "1", "layer is not a string")]),
        "broken.jsonl": '{"modelId": "gpt2-small", "layer": ',
        "deep.json": "[" * 50_000 + "]" * 50_000,
    }
    needles = {"range.json": f"d_sae={D_SAE}", "index.json": "'abc'", "layer.json": "layer is 0",
               "broken.jsonl": "JSONL", "deep.json": "RecursionError"}  # fmt: skip
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(SAELoadError) as e:
            neuronpedia_labels(tmp_path / name, JB)
        assert "\n" not in str(e.value) and str(tmp_path / name) in str(e.value) and needles[name] in str(e.value)
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(b'{"a": 1}\n')[:-6])
    with pytest.raises(SAELoadError, match="cut.jsonl.gz"):
        neuronpedia_labels(tmp_path / "cut.jsonl.gz", JB)
    with pytest.raises(SAELoadError, match="does not exist"):
        neuronpedia_labels(tmp_path / "missing.json", JB)


def test_load_saes_labels_argument(tmp_path: Path) -> None:
    root = tmp_path / "saes"
    save_sae_lens(sae("blocks.2.hook_resid_pre", 2, "tiny/2-res-t"), root / "blocks.2.hook_resid_pre")
    export = tmp_path / "export.json"
    export.write_text(json.dumps({"explanations": [record("tiny", "2-res-t", "11", "eleven")]}))
    model = SimpleNamespace(d_model=D, n_layers=3, name="tiny")
    saes = load_saes(root, model, labels=export)
    assert saes[2].neuronpedia_id == "tiny/2-res-t" and saes[2].label(11) == "eleven"
