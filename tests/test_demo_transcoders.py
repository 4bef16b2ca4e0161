"""The demo's transcoders and attention-output SAEs (recipes/demo/train_transcoders.py): the shipped files
load through the library's loaders, and reconstruct held-out text as well as measured here (not read from
their eval.json)."""

from __future__ import annotations

import pytest
import torch

from qktrace import load_model
from qktrace.config import DEMO_ATTENTION_SAES as ATTENTION_SAES
from qktrace.config import DEMO_MODEL
from qktrace.config import DEMO_TRANSCODERS as TRANSCODERS
from qktrace.saes import load_attention_saes, load_transcoders
from recipes.demo.corpus import training_documents

MIN_VE = {"transcoder": 0.8, "z": 0.8}  # held-out variance explained of the MLP output / of hook_z, every layer
MAX_L0 = 32  # the recipe's TopK k


@pytest.fixture(scope="module")
def model():
    return load_model(DEMO_MODEL)


def test_shipped_files_are_small_and_in_known_formats() -> None:
    files = [p for folder in (TRANSCODERS, ATTENTION_SAES) for p in folder.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 8 * 2**20
    assert (TRANSCODERS / "config.yaml").is_file()  # a circuit-tracer transcoder set
    layers = sorted(p.name for p in TRANSCODERS.glob("layer_*.safetensors"))
    assert layers == [f"layer_{i}.safetensors" for i in range(4)]
    assert sorted(p.name for p in ATTENTION_SAES.iterdir() if p.is_dir()) == [
        f"blocks.{i}.attn.hook_z" for i in range(4)
    ]


@torch.no_grad()
def test_shipped_transcoders_and_attention_saes_reconstruct_held_out_text(model) -> None:
    """Every layer: the transcoder maps the MLP's input (the pre-MLP norm's output, circuit-tracer's
    mlp.hook_in) to its output with VE >= MIN_VE, the hook_z SAE reconstructs the heads' outputs before W_O
    (computed here from the trace's pattern and values), both with L0 <= MAX_L0; BOS excluded."""
    ts, saes = load_transcoders(TRANSCODERS, model), load_attention_saes(ATTENTION_SAES, model)
    assert ts.kind == "per_layer" and ts.layers == tuple(range(model.n_layers))
    assert (ts.input_site, ts.output_site) == ("mlp_in", "mlp_out")
    assert saes.layers == ts.layers and {s.site for s in saes.values()} == {"z"}
    traces = [model.run(d) for d in training_documents(seed=987_654, n=6, min_chars=400)]
    for layer, ly in enumerate(model.anatomy.layers):
        x = torch.cat([t.mlp_in[layer][1:] for t in traces])
        y = torch.cat([t.mlp_out[layer][1:] for t in traces])
        z = torch.cat(
            [torch.einsum("hqk,hke->qhe", t.pattern(layer), t.v[layer][ly.kv_index()])[1:].flatten(-2) for t in traces]
        )  # [tokens, head * d_head], head by head
        for kind, coder, inp, target in (("transcoder", ts[layer], x, y), ("z", saes[layer], z, z)):
            acts = coder.encode(inp)
            ve = 1 - float((target - coder.decode(acts)).pow(2).sum() / (target - target.mean(0)).pow(2).sum())
            l0 = float((acts > 0).sum(-1).float().mean())
            assert ve >= MIN_VE[kind], (kind, layer, ve)
            assert 0 < l0 <= MAX_L0, (kind, layer, l0)


def test_recipe_trains_reproducibly_and_writes_what_the_loaders_read(model, tmp_path) -> None:
    """The recipe's sites are the trace's (the z columns head by head); a transcoder trained twice with one seed
    is the same; written as a circuit-tracer set and a SAELens hook_z folder, both load and compute as the
    trainer does."""
    from qktrace.saes import save_sae_lens
    from recipes.demo.train_saes import corpus_blocks, train_sae
    from recipes.demo.train_transcoders import collect_sites, hook_z_config, save_transcoders, z_hook

    blocks = corpus_blocks(model.tokenizer, seed=7, n_docs=3)
    sites = collect_sites(model, blocks[:2])
    trace = model.run(blocks[1])
    n = blocks.shape[1] - 1
    torch.testing.assert_close(sites["mlp_out"][2][n:], trace.mlp_out[2][1:], rtol=0, atol=0)
    ly = model.anatomy.layers[2]
    z = trace.pattern(2)[3, 1:] @ trace.v[2][ly.kv_head[3]]  # head 3 [pos, d_head]
    torch.testing.assert_close(sites["z"][2][n:, 3 * ly.d_head : 4 * ly.d_head], z, rtol=1e-5, atol=1e-6)
    x, y = sites["mlp_in"][2], sites["mlp_out"][2]
    runs = [train_sae(x, 64, 4, steps=3, seconds=60, seed=1, batch=64, target=y)[0] for _ in range(2)]
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(runs[0], name), getattr(runs[1], name), rtol=0, atol=0)
    trainers = [runs[0]] * model.n_layers
    save_transcoders(trainers, 4, tmp_path / "tc")
    for layer in range(model.n_layers):
        hook_z_config(save_sae_lens(runs[0].to_sae(layer, z_hook(layer)), tmp_path / "att" / z_hook(layer)))
    ts, saes = load_transcoders(tmp_path / "tc", model), load_attention_saes(tmp_path / "att", model)
    with torch.no_grad():
        y_hat = runs[0](x[:20])[0]
    torch.testing.assert_close(ts[2].decode(ts[2].encode(x[:20])), y_hat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(saes[2].decode(saes[2].encode(x[:20])), y_hat, rtol=1e-5, atol=1e-5)


def test_demo_names_its_own_transcoders_and_attention_saes() -> None:
    """`Tracer.load("demo", transcoders="demo")` holds the demo's transcoders and no residual SAEs (its graphs are
    transcoder graphs); with `attention_saes="demo"` too, checkpointed graphs; the demo SAEs stay the default
    without transcoders."""
    from qktrace import Tracer

    plain = Tracer.load("demo", transcoders="demo")
    assert plain.transcoders is not None and len(plain.saes) == 0 and plain.attention_saes is None
    both = Tracer.load("demo", transcoders="demo", attention_saes="demo")
    assert both.attention_saes is not None and sorted(both.attention_saes) == list(range(both.model.n_layers))
    assert len(Tracer.load("demo").saes) > 0
