"""Refusals that name the right thing, in the words of the front end that shows them (issue 20, class 4).

- A prompt too long for the model (or the server) is named as its caller names it: "prompt B (--prompt-b)"
  on the command line, "prompt_b" over HTTP; the one length check is the model's (`Model.tokenize`).
- A fix is worded per front end (`errors.Fix`): the command line names its flag (`--transcoders DIR`), an HTTP
  answer the request's field (`feature_layer`) or how the server is started (`qktrace serve ... --transcoders`),
  never a flag the request cannot pass.
- A safetensors header that lies about a shape is named: the tensor, the shape it states, what the file holds.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from qktrace.errors import Fix, InputError, QKTraceError, SAELoadError
from qktrace.testing import make_server_setup, random_prompt, random_sae, write_transcoder_set

A = "Aunt Sally is the opposite of Uncle Bob . Aunt"


# -------------------------------------------------------------------------------------- the mechanism


def test_an_error_with_a_fix_words_it_per_front_end_and_survives_pickling():
    e = InputError("no transcoders are loaded", Fix.loaded("transcoders", "--transcoders"))
    assert str(e) == e.line("api") == "no transcoders are loaded: load them (Tracer.load(..., transcoders=DIR))"
    assert e.line("cli") == "no transcoders are loaded: pass --transcoders DIR"
    assert (
        e.line("http")
        == "no transcoders are loaded: start the server with `qktrace serve --model MODEL --transcoders DIR`"
    )
    back = pickle.loads(pickle.dumps(e))  # Ray hands errors between processes
    assert type(back) is InputError and back.line("cli") == e.line("cli") and str(back) == str(e)
    plain = QKTraceError("a plain line: fix it")
    assert plain.line("cli") == plain.line("http") == "a plain line: fix it"


# ---------------------------------------------------------------------------------- which prompt is long


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    from qktrace.testing import make_tiny_model

    return make_tiny_model("gpt2", tmp_path_factory.mktemp("gpt2") / "m")  # 128 positions


def test_cli_compare_names_the_prompt_that_is_too_long(capsys, gpt2):
    from qktrace.cli import main

    base = ["compare", str(gpt2), "--device", "cpu"]
    assert main([*base, "--prompt-a", random_prompt(5), "--prompt-b", random_prompt(20_000)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "prompt B (--prompt-b) is 20,001 tokens" in err and "takes at most 128 positions: shorten it" in err
    assert main([*base, "--prompt-a", random_prompt(300), "--prompt-b", random_prompt(20_000)]) == 2
    assert "prompt A (--prompt-a) is 301 tokens" in capsys.readouterr().err  # A first, before any forward


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from qktrace.config import LIMITS
    from qktrace.saes import SAESet
    from qktrace.server.app import create_app
    from qktrace.tracer import Tracer

    s = make_server_setup(tmp_path_factory.mktemp("lines"))
    fewer = Tracer(s.tracer.model, SAESet({c: s.tracer.saes[c] for c in (0, 1)}))  # no SAE at checkpoint 2
    small = create_app(s.data, fewer, limits=dataclasses.replace(LIMITS, server_max_tokens=8))
    return s, TestClient(create_app(s.data, s.tracer)), TestClient(small)


def _refused(r, status: int = 400) -> str:
    assert r.status_code == status, r.text
    msg = r.json()["error"]
    assert "\n" not in msg
    return msg


def test_http_compare_names_the_field_that_is_too_long(server):
    _, client, small = server
    body = {"prompt_a": random_prompt(4), "prompt_b": random_prompt(20_000)}
    msg = _refused(client.post("/api/compare", json=body))
    assert msg.startswith("prompt_b is 20,001 tokens but model"), msg  # the model's own limit, 2048 positions
    msg = _refused(small.post("/api/compare", json={"prompt_a": random_prompt(4), "prompt_b": random_prompt(11)}))
    assert msg == "prompt_b is 12 tokens, more than the 8 this server traces: shorten it, or start the server " \
        "with `qktrace serve --max-tokens 12`"  # fmt: skip
    msg = _refused(small.post("/api/compare", json={"tokens_a": list(range(9)), "prompt_b": random_prompt(2)}))
    assert msg.startswith("tokens_a is 9 tokens, more than the 8"), msg
    msg = _refused(client.post("/api/compare", json={"prompt_a": random_prompt(4), "tokens_b": [1, 10**6]}))
    assert msg.endswith("tokens_b holds 1000000"), msg


# ---------------------------------------------------------------------------- fixes worded per front end


def test_http_sweep_of_a_transcoder_feature_names_the_servers_start_option(server):
    s, client, _ = server
    body = {"tokens": s.tokens, "feature": 0, "positions": -1, "checkpoint": 1, "kind": "transcoder"}
    msg = _refused(client.post("/api/sweep", json=body))
    assert msg == (
        "a transcoder feature was asked for but no transcoders are loaded: start the server with "
        "`qktrace serve --model MODEL --transcoders DIR`"
    )
    msg = _refused(client.post("/api/sweep", json=body | {"kind": "attn"}))
    assert msg.endswith("`qktrace serve --model MODEL --transcoders DIR --attention-saes DIR`"), msg
    heads = body | {"heads": [[1, 0]], "checkpoint": None}
    msg = _refused(client.post("/api/sweep", json=heads))
    assert msg == "a transcoder feature steered inside QK circuits needs its layer: give feature_layer"
    msg = _refused(client.post("/api/sweep", json=heads | {"kind": "feature", "feature_layer": 0}))
    assert msg.endswith(": drop feature_layer") and "--" not in msg
    msg = _refused(client.post("/api/sweep", json=body | {"feature_layer": 0}))
    assert msg.endswith(": give heads, or use checkpoint instead") and "--" not in msg


def test_cli_steer_names_the_flags(capsys, tiny_paths, tmp_path):
    from qktrace.cli import main

    base = ["steer", str(tiny_paths["llama"]), "--device", "cpu", "--prompt", A, "--feature", "0", "--positions", "-1"]
    assert main([*base, "--layer", "1", "--kind", "transcoder"]) == 2
    err = capsys.readouterr().err
    assert err.endswith("no transcoders are loaded: pass --transcoders DIR\n") and err.count("\n") == 1, err
    assert main([*base, "--layer", "1", "--kind", "attn"]) == 2
    assert capsys.readouterr().err.endswith("no attention SAEs are loaded: pass --attention-saes DIR\n")
    ct = str(write_transcoder_set(tmp_path / "ct", 32, 2))
    assert main([*base, "--transcoders", ct, "--layer", "1", "--heads", "0"]) == 2
    assert capsys.readouterr().err.endswith("needs its layer: give --feature-layer\n")
    assert main([*base, "--transcoders", ct, "--layer", "1", "--feature-layer", "0"]) == 2
    assert capsys.readouterr().err.endswith(": give --heads, or drop --feature-layer (without heads, --layer is the "
                                            "feature's layer)\n")  # fmt: skip


def test_a_missing_sae_is_loaded_by_flag_on_the_cli_and_by_start_option_over_http(server, capsys, tiny_paths):
    from qktrace.cli import main

    s, _, fewer = server
    body = {"tokens": s.tokens[:8], "feature": 0, "positions": -1, "checkpoint": 2, "kind": "feature"}
    msg = _refused(fewer.post("/api/sweep", json=body))
    assert msg.startswith("no SAE at checkpoint 2 (loaded: 0, 1)") and "`qktrace serve --model MODEL --saes DIR`" in msg
    assert "(--saes DIR)" not in msg
    args = ["steer", str(tiny_paths["llama"]), "--device", "cpu", "--prompt", A, "--feature", "0"]
    assert main([*args, "--positions", "-1", "--layer", "1", "--kind", "feature"]) == 2
    err = capsys.readouterr().err
    assert "no SAE at checkpoint 1 (loaded: none)" in err and "(--saes DIR), or pick a loaded checkpoint" in err, err


# ---------------------------------------------------------------------------- safetensors headers that lie


def _sae_folder(root: Path) -> Path:
    from qktrace.saes.formats import save_sae_lens

    return save_sae_lens(random_sae("standard", 8, 16, seed=0, hook_name="blocks.1.hook_resid_pre"), root / "sae")


def _lying(path: Path, entries: dict, data: bytes) -> None:
    header = json.dumps(entries).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)


@pytest.mark.parametrize(
    ("entries", "data", "named"),
    [
        ({"W_enc": {"dtype": "F32", "shape": [8, 10**12], "data_offsets": [0, 64]}}, 64,
         "tensor 'W_enc' is stated as F32 of shape [8, 1000000000000] (32,000,000,000,000 bytes) but the file "
         "holds 64 bytes for it"),
        ({"W_enc": {"dtype": "F32", "shape": [4, 5], "data_offsets": [0, 64]}}, 64,
         "tensor 'W_enc' is stated as F32 of shape [4, 5] (80 bytes) but the file holds 64 bytes for it"),
        ({"b_dec": {"dtype": "F16", "shape": [8], "data_offsets": [0, 16]}}, 10,
         "tensor 'b_dec' is stated as F16 of shape [8] (16 bytes, at 0..16) but the file holds 10 bytes of data: "
         "it was cut short"),
        ({"W_enc": {"dtype": "F99", "shape": [4], "data_offsets": [0, 16]}}, 16, "tensor 'W_enc' has dtype 'F99'"),
        ({"W_enc": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, 16, "tensor 'W_enc' states shape [-4]"),
        ({"W_enc": {"dtype": "F32", "shape": [4]}}, 16, "tensor 'W_enc' has no dtype, shape and data_offsets"),
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
          "b": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, 16, "invalid offset for tensor"),
    ],
)  # fmt: skip
def test_a_lying_safetensors_header_names_the_tensor_its_shape_and_what_the_file_holds(tmp_path, entries, data, named):
    from qktrace.saes.formats import read_sae_lens_dir

    folder = _sae_folder(tmp_path)
    _lying(folder / "sae_weights.safetensors", entries, b"\0" * data)
    with pytest.raises(SAELoadError) as e:
        read_sae_lens_dir(folder)
    msg = str(e.value)
    assert named in msg and str(folder / "sae_weights.safetensors") in msg and "\n" not in msg, msg


def test_a_header_shape_the_config_does_not_state_names_both(tmp_path):
    from qktrace.saes.formats import read_sae_lens_dir

    folder = _sae_folder(tmp_path)
    w = {"W_enc": torch.zeros(8, 24), "b_enc": torch.zeros(24), "W_dec": torch.zeros(24, 8), "b_dec": torch.zeros(8)}
    save_file(w, str(folder / "sae_weights.safetensors"))  # consistent bytes, a width the config does not say
    with pytest.raises(SAELoadError) as e:
        read_sae_lens_dir(folder)
    msg = str(e.value)
    assert "d_sae is 16" in msg and "W_enc of shape [8, 24]" in msg, msg


def test_a_file_given_as_the_wrong_kind_names_the_flag_it_belongs_to(capsys, tiny_paths, tmp_path):
    from qktrace.cli import main

    sae = _sae_folder(tmp_path)
    ct = str(write_transcoder_set(tmp_path / "ct", 32, 2))
    base = ["qk", str(tiny_paths["llama"]), "--device", "cpu", "--prompt", A, "--layer", "1", "--head", "0"]
    assert main([*base, "--transcoders", str(sae)]) == 2
    err = capsys.readouterr().err
    assert "has architecture 'standard', not a transcoder" in err and err.endswith(
        ": pass it as --saes (an attention-output SAE: --attention-saes)\n"
    ), err
    assert main([*base, "--transcoders", ct, "--attention-saes", ct]) == 2
    assert capsys.readouterr().err.endswith("a transcoder set: pass it as --transcoders\n")
