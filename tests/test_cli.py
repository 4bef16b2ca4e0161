"""The CLI: real output on tiny models, and one clear line (exit 2, no traceback) for bad input."""

from __future__ import annotations

import json

import pytest
import torch

from qktrace.cli import main
from qktrace.saes import SAE, save_sae_lens


@pytest.fixture(scope="module")
def saes_dir(tiny_models, tmp_path_factory):
    model = tiny_models["llama"]
    root = tmp_path_factory.mktemp("saes")
    g = torch.Generator().manual_seed(0)
    for c in range(model.n_layers + 1):
        sae = SAE(
            checkpoint=c,
            architecture="topk",
            W_enc=torch.randn(model.d_model, 40, generator=g),
            b_enc=torch.zeros(40),
            W_dec=torch.randn(40, model.d_model, generator=g) * 0.3,
            b_dec=torch.zeros(model.d_model),
            k=5,
        )
        save_sae_lens(sae, root / f"blocks.{c}.hook_resid_pre")
    return root


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_info_prints_anatomy_and_saes(capsys, tiny_paths, saes_dir):
    code, out, _ = run(capsys, "info", str(tiny_paths["llama"]), "--saes", str(saes_dir))
    assert code == 0
    assert "kv_heads" in out and "blocks.2.hook_resid_pre" in out


def test_qk_json_sums_to_score(capsys, tiny_paths, saes_dir):
    argv = ["qk", str(tiny_paths["llama"]), "--saes", str(saes_dir), "--prompt", "Aunt Sally w1 w2 . Aunt"]
    code, out, _ = run(capsys, *argv, "--layer", "1", "--head", "3", "--json", "--top", "1000")
    assert code == 0
    obj = json.loads(out)
    for key in ("score", "sum_of_terms", "terms", "query_marginals", "key_marginals"):
        assert key in obj
    assert abs(obj["capped_sum"][-1] - obj["score"][-1]) < 1e-4 * max(1.0, abs(obj["score"][-1]))
    assert len(obj["terms"]) >= 10 and {"query", "key", "value"} <= set(obj["terms"][0])


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["info", "/nonexistent/model"], "does not exist"),
        (["info", "no-such-org/no-such-model-xyz"], "could not load model"),
        (["info", "@M", "--saes", "saelens:gpt2-small-res-jb"], "sae"),
        (["qk", "@M", "--saes", "@S", "--prompt", " ", "--layer", "0", "--head", "0"], "empty"),
        (["qk", "@M", "--saes", "@S", "--prompt", "w1 w2", "--layer", "7", "--head", "0"], "layer 7 is out of range"),
        (["qk", "@M", "--saes", "@S", "--prompt", "w1 w2", "--layer", "0", "--head", "9"], "head"),
        (["qk", "@M", "--saes", "@S", "--prompt", "w1", "--layer", "0", "--head", "0", "--query-pos", "5"], "position"),
        (["qk", "@M", "--prompt", "w1 w2", "--layer", "0", "--head", "0"], "has no SAE"),
        (["info", "@M", "--saes", "@W"], "d_in"),
        (["info", "@M", "--saes", "/nonexistent/saes"], "does not exist"),
    ],
)
def test_bad_input_is_one_line_exit_2(capsys, tiny_paths, saes_dir, tmp_path, args, needle):
    wide = SAE(0, "standard", torch.randn(24, 8), torch.zeros(8), torch.randn(8, 24), torch.zeros(24))
    save_sae_lens(wide, tmp_path / "blocks.0.hook_resid_pre")
    subst = {"@M": str(tiny_paths["llama"]), "@S": str(saes_dir), "@W": str(tmp_path)}
    code, out, err = run(capsys, *[subst.get(a, a) for a in args])
    assert code == 2
    assert needle in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_corrupt_sae_file_is_one_line(capsys, tiny_paths, saes_dir, tmp_path):
    bad = tmp_path / "blocks.0.hook_resid_pre"
    bad.mkdir()
    (bad / "cfg.json").write_text((saes_dir / "blocks.0.hook_resid_pre" / "cfg.json").read_text())
    (bad / "sae_weights.safetensors").write_bytes(b"\x00\x01garbage")
    code, _, err = run(capsys, "info", str(tiny_paths["llama"]), "--saes", str(tmp_path))
    assert code == 2 and len(err.strip().splitlines()) == 1
