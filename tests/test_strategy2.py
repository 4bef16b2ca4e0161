"""Strategy 2 (transcoders + attention-output SAEs) against an independent autograd through HF's own modules.

The reference replacement model is built here with torch hooks on the HF model, not with qktrace's replay:
every softmax is detached, every norm module is replaced by its own formula with the denominator detached,
each MLP's output is replaced by leaf transcoder features @ W_dec + b_dec + skip + leaf error, and each
attention output by leaf attention-SAE features @ W_dec + b_dec + leaf error: at hook_z, the input of HF's
output projection (o_proj / c_proj), or at the attention output (the attention module's output, Gemma-2's
post-attention norm's). HF's forward is unchanged; each edge is d(target) / d(source multiplier), with
target = a feature's pre-activation or a logit's demeaned unembedding direction after the final norm. A
head's part of an edge into an attention feature is the gradient of that head's own term of the feature's
pre-activation (its z slice through the encoder, or its z_h W_O[h] through the frozen post-norm)."""

from __future__ import annotations

import pytest
import torch

from qktrace.errors import SAEMismatchError
from qktrace.graph.strategy2 import checkpointed_graph, head_loadings
from qktrace.models import load_model
from qktrace.nodes import LEAF_KINDS, TRANSCODER_FEATURE_TYPES, Kind, Node, attn_error, attn_feature
from qktrace.saes import load_transcoders
from qktrace.saes.attention import AttentionSAE, AttentionSAESet
from qktrace.testing import frozen_norm, hooked_forward, make_tiny_model, norm_gain, random_sae, write_transcoder_set

D_SAE = 40
TOL = dict(rtol=1e-5, atol=1e-5)
# HF module names: (layers, pre-MLP norm, attention module, output projection, post-attention norm, final, embed,
# post-MLP norm: where the MLP output site "hook_mlp_out" is)
HF = {
    "gpt2": (lambda hf: hf.transformer.h, "ln_2", "attn", "attn.c_proj", None, "transformer.ln_f", "transformer.wte",
             None),
    "llama": (lambda hf: hf.model.layers, "post_attention_layernorm", "self_attn", "self_attn.o_proj", None,
              "model.norm", "model.embed_tokens", None),
    "qwen3": (lambda hf: hf.model.layers, "post_attention_layernorm", "self_attn", "self_attn.o_proj", None,
              "model.norm", "model.embed_tokens", None),
    "gemma2": (lambda hf: hf.model.layers, "pre_feedforward_layernorm", "self_attn", "self_attn.o_proj",
               "post_attention_layernorm", "model.norm", "model.embed_tokens", "post_feedforward_layernorm"),
}  # fmt: skip
# (family, transcoder input site, skip, attention SAE site per layer)
CASES = [
    ("gpt2", "mlp_in", False, ("z", "attn_out")),
    ("llama", "mlp_in", False, ("attn_out", "z")),
    ("qwen3", "resid_mid", True, ("attn_out", "z")),
    ("gemma2", "mlp_in", True, ("z", "attn_out")),
    ("gemma2", "resid_mid", False, ("attn_out", "z")),
]


def attention_saes(model, sites: tuple[str, ...]) -> AttentionSAESet:  # type: ignore[no-untyped-def]
    """Random standard SAEs on each layer's attention output at `sites[layer]` (a negative encoder bias)."""
    saes = {}
    for layer, site in enumerate(sites):
        ly = model.anatomy.layers[layer]
        d_in = ly.n_heads * ly.d_head if site == "z" else model.d_model
        hook = f"blocks.{layer}.attn.hook_z" if site == "z" else f"blocks.{layer}.hook_attn_out"
        coder = random_sae("standard", d_in, D_SAE, seed=50 + layer, checkpoint=layer, std=(0.4, 0.3, 0.3, 0.2),
                           hook_name=hook, dtype=torch.float64)  # fmt: skip
        heads = (ly.n_heads, ly.d_head) if site == "z" else (None, None)
        saes[layer] = AttentionSAE(layer, site, coder, *heads)
    return AttentionSAESet(saes)


@pytest.fixture(scope="module")
def models64(tmp_path_factory):
    """The tiny models in float64, so the reference autograd and the graph agree to rounding."""
    root = tmp_path_factory.mktemp("s2")
    return {f: load_model(make_tiny_model(f, root / f, seed=i), dtype=torch.float64) for i, f in enumerate(HF)}


def leaf_split(coder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # type: ignore[no-untyped-def]
    """(leaf acts, leaf error, acts @ W_dec + b_dec + error) for a site value x (the last equals x)."""
    acts = coder.encode(x.detach()).detach().requires_grad_(True)
    recon = coder.decode(acts)
    err = (x - recon).detach().requires_grad_(True)
    return acts, err, recon + err


def reference(model, family: str, ts, saes: AttentionSAESet, ids: torch.Tensor) -> dict:  # type: ignore[type-arg]
    """HF's forward with the replacement hooks; returns what was captured (leaves and targets' inputs)."""
    hf = model.hf
    layers_of, ln_mlp, attn, o_proj, post_attn, final, embed, post_mlp = HF[family]
    blocks = list(layers_of(hf))
    got: dict = {k: {} for k in ("mid", "x", "acts", "err", "y", "z", "o", "ax", "aacts", "aerr")}
    handles = []
    norms = [m for m in hf.modules() if "norm" in type(m).__name__.lower() or isinstance(m, torch.nn.LayerNorm)]
    handles += [m.register_forward_hook(frozen_norm, with_kwargs=True) for m in norms]

    def replace_mlp(layer: int):  # type: ignore[no-untyped-def]
        def hook(module, args, out):  # type: ignore[no-untyped-def]
            t = ts[layer]
            x = got["mid"][layer] if ts.input_site == "resid_mid" else got["mlp_in"]
            acts = (x.detach() @ t.W_enc + t.b_enc).relu().detach().requires_grad_(True)
            recon = acts @ t.W_dec + t.b_dec + (x @ t.W_skip if t.W_skip is not None else 0)
            err = (out - recon).detach().requires_grad_(True)
            got["x"][layer], got["acts"][layer], got["err"][layer], got["y"][layer] = x, acts, err, out.detach()
            return recon + err

        return hook

    def replace_z(layer: int):  # type: ignore[no-untyped-def]
        def hook(module, args):  # type: ignore[no-untyped-def]
            got["z"][layer] = args[0]
            if saes[layer].site != "z":
                return None
            got["ax"][layer] = args[0]
            got["aacts"][layer], got["aerr"][layer], new = leaf_split(saes[layer].coder, args[0])
            return (new,)

        return hook

    def replace_out(layer: int):  # type: ignore[no-untyped-def]
        def hook(module, args, out):  # type: ignore[no-untyped-def]
            x = out if isinstance(out, torch.Tensor) else out[0]
            got["ax"][layer] = x
            got["aacts"][layer], got["aerr"][layer], new = leaf_split(saes[layer].coder, x)
            return new if isinstance(out, torch.Tensor) else (new, *out[1:])

        return hook

    for layer, block in enumerate(blocks):
        ln = block.get_submodule(ln_mlp)
        handles.append(ln.register_forward_hook(lambda m, a, o, L=layer: got["mid"].update({L: a[0]})))
        handles.append(ln.register_forward_hook(lambda m, a, o: got.update(mlp_in=o)))
        mlp_site = block.get_submodule(post_mlp) if post_mlp else block.mlp
        handles.append(mlp_site.register_forward_hook(replace_mlp(layer)))
        proj = block.get_submodule(o_proj)
        handles.append(proj.register_forward_pre_hook(replace_z(layer)))
        handles.append(proj.register_forward_hook(lambda m, a, o, L=layer: got["o"].update({L: o.detach()})))
        if saes[layer].site == "attn_out":
            site = block.get_submodule(post_attn or attn)
            handles.append(site.register_forward_hook(replace_out(layer)))
    emb_mod = hf.get_submodule(embed)
    handles.append(emb_mod.register_forward_hook(lambda m, a, o: got.update(emb=o.detach().requires_grad_(True))))
    handles.append(emb_mod.register_forward_hook(lambda m, a, o: got["emb"]))
    handles.append(hf.get_submodule(final).register_forward_hook(lambda m, a, o: got.update(final=o)))
    hooked_forward(hf, ids, handles)
    got["post_attn"] = [None if post_attn is None else b.get_submodule(post_attn) for b in blocks]
    got["o_proj"] = [b.get_submodule(o_proj) for b in blocks]
    return got


def head_terms(got, saes, n_heads: int, layer: int, pos: int, index: int) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    """Each head's own term of attention feature `index`'s pre-activation (they sum to it, less constants)."""
    sae, w = saes[layer], saes[layer].W_enc[:, index]
    zs = got["z"][layer][0, pos].unflatten(-1, (n_heads, -1))  # [head, d_head], HF's o_proj input
    if sae.site == "z":
        return [zs[h] @ sae.heads(w)[h] for h in range(n_heads)]
    proj, post = got["o_proj"][layer], got["post_attn"][layer]
    W = proj.weight if isinstance(proj, torch.nn.Linear) else proj.weight.T  # [d_model, head * d_head]
    out = []
    for h, W_h in enumerate(W.unflatten(1, (n_heads, -1)).unbind(1)):
        write = W_h @ zs[h]
        if post is not None:  # Gemma-2: the post-attention norm at its frozen scale
            o = got["o"][layer][0, pos]
            write = write * torch.rsqrt(o.pow(2).mean() + post.eps) * norm_gain(post)
        out.append(write @ w)
    return out


def edge_row(g, grads: list, n_layers: int, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def,type-arg]
    """Autograd gradients w.r.t. the leaves -> the row of edges (gradient x activation or error)."""
    f, a = g.transcoder_features, g.attention_features
    n_tc, n_pos, n_att = f.layer.numel(), g.tokens.numel(), a.layer.numel()
    a0 = n_tc + n_layers * n_pos
    want = torch.zeros(len(g.nodes), dtype=torch.float64)
    for layer in range(n_layers):
        at, aa = (f.layer == layer).nonzero()[:, 0], (a.layer == layer).nonzero()[:, 0]
        ga, ge, gb, gc = (grads[k * n_layers + layer] for k in range(4))
        if ga is not None:
            want[at] = ga[0, f.pos[at], f.index[at]] * f.act[at]
        if ge is not None:
            want[n_tc + layer * n_pos : n_tc + (layer + 1) * n_pos] = (ge[0] * f.errors[layer]).sum(-1)
        if gb is not None:
            want[a0 + aa] = gb[0, a.pos[aa], a.index[aa]] * a.act[aa]
        if gc is not None:
            col = a0 + n_att + layer * n_pos
            want[col : col + n_pos] = (gc[0] * a.errors[layer]).sum(-1)
    if grads[-1] is not None:
        col = a0 + n_att + n_layers * n_pos
        want[col : col + n_pos] = (grads[-1][0] * emb).sum(-1)
    return want


def check_activations(g, got, ts, saes, n_layers: int) -> None:  # type: ignore[no-untyped-def]
    """Node activations are the coders' encodings of HF's own tensors; features + b_dec + error rebuild them."""
    for layer in range(n_layers):
        for enc, act_key in ((g.transcoder_features, "acts"), (g.attention_features, "aacts")):
            acts = got[act_key][layer][0].detach().clone()
            acts[0] = 0
            at = enc.layer == layer
            torch.testing.assert_close(acts[enc.pos[at], enc.index[at]], enc.act[at], **TOL)
            assert int((acts > 0).sum()) == int(at.sum()) > 0
        a = g.attention_features
        recon = saes[layer].coder.decode(acts) + a.errors[layer]
        torch.testing.assert_close(recon[1:], got["ax"][layer][0, 1:].detach(), **TOL)
        assert float(a.errors[layer][0].abs().max()) == 0.0


@pytest.mark.parametrize("family,input_site,skip,sites", CASES)
def test_every_edge_and_head_loading_is_an_autograd_gradient_through_hf(
    family, input_site, skip, sites, models64, tmp_path
):
    model = models64[family]
    n_layers, n_heads = model.n_layers, model.anatomy.layers[0].n_heads
    write_transcoder_set(tmp_path / "ct", model.d_model, n_layers, input_site, skip=skip, d_sae=D_SAE)
    ts = load_transcoders(tmp_path / "ct", model, dtype=torch.float64)
    saes = attention_saes(model, sites)
    prompt = "Aunt Sally is the opposite of Uncle Bob ."
    g = checkpointed_graph(model, ts, saes, prompt, desired_logit_prob=0.5, max_n_logits=3, batch_size=9)
    got = reference(model, family, ts, saes, g.tokens)
    check_activations(g, got, ts, saes, n_layers)
    f, a = g.transcoder_features, g.attention_features
    leaves = [got[k][layer] for k in ("acts", "err", "aacts", "aerr") for layer in range(n_layers)] + [got["emb"]]
    emb = got["emb"][0].detach()
    a0 = f.layer.numel() + n_layers * g.tokens.numel()
    targets = [(r, got["x"][int(f.layer[r])][0, int(f.pos[r])] @ ts[int(f.layer[r])].W_enc[:, int(f.index[r])])
               for r in range(f.layer.numel())]  # fmt: skip
    for r in range(a.layer.numel()):
        layer, pos, index = int(a.layer[r]), int(a.pos[r]), int(a.index[r])
        targets.append((a0 + r, sum(head_terms(got, saes, n_heads, layer, pos, index))))
    W_U = model.anatomy.W_U
    for k, tok in enumerate(g.logit_tokens.tolist()):
        targets.append((len(g.nodes) - len(g.logit_tokens) + k, got["final"][0, -1] @ (W_U[:, tok] - W_U.mean(-1))))
    checked = 0
    for row, target in targets:
        grads = torch.autograd.grad(target, leaves, retain_graph=True, allow_unused=True)
        want = edge_row(g, list(grads), n_layers, emb)
        torch.testing.assert_close(g.adjacency[row], want, **TOL)
        checked += int((want != 0).sum())
    assert checked > 200
    # head loadings: each head's part is the gradient of that head's own term; the parts sum to the edge
    hl = g.head_loadings
    assert hl is not None
    assert hl.parts.shape[1] == n_heads and len(hl.target) > 50
    torch.testing.assert_close(hl.parts.sum(-1), g.adjacency[hl.target, hl.source], rtol=1e-10, atol=1e-12)
    nonzero_rows = (g.adjacency[a0 : a0 + a.layer.numel()] != 0).sum()
    assert len(hl.target) == int(nonzero_rows)
    for r in range(0, a.layer.numel(), 3):
        layer, pos, index = int(a.layer[r]), int(a.pos[r]), int(a.index[r])
        mine = hl.target == a0 + r
        for h, term in enumerate(head_terms(got, saes, n_heads, layer, pos, index)):
            want = edge_row(g, list(torch.autograd.grad(term, leaves, retain_graph=True, allow_unused=True)),
                            n_layers, emb)  # fmt: skip
            have = torch.zeros_like(want)
            have[hl.source[mine]] = hl.parts[mine, h]
            torch.testing.assert_close(have, want, **TOL)
    # node kinds in order; attention features cross one attention layer, so layer-0 ones read only embeddings
    kinds = [n.kind for n in g.nodes]
    n_pos, n_att = g.tokens.numel(), a.layer.numel()
    assert kinds == (
        [Kind.TRANSCODER] * f.layer.numel() + [Kind.MLP_ERROR] * (n_layers * n_pos) + [Kind.ATTN_FEATURE] * n_att
        + [Kind.ATTN_ERROR] * (n_layers * n_pos) + [Kind.TOKEN] * n_pos + [Kind.LOGIT] * len(g.logit_tokens)
    )  # fmt: skip
    # without the head axis: the same adjacency; loadings on demand equal the stored ones
    summed = checkpointed_graph(model, ts, saes, prompt, desired_logit_prob=0.5, max_n_logits=3, by_head=False)
    assert summed.head_loadings is None
    torch.testing.assert_close(summed.adjacency, g.adjacency, rtol=1e-10, atol=1e-12)
    some = torch.arange(1, a.layer.numel(), 2)
    later = head_loadings(summed.checkpoints, some, batch_size=5)
    stored = torch.isin(hl.target, some + a0)
    assert torch.equal(later.target, hl.target[stored]) and torch.equal(later.source, hl.source[stored])
    torch.testing.assert_close(later.parts, hl.parts[stored], rtol=1e-10, atol=1e-12)
    first = (a.layer == 0).nonzero()[:, 0] + a0
    assert bool((g.adjacency[first, : a0 + n_att + n_layers * n_pos] == 0).all())
    assert g.nodes[a0].id.startswith(f"attn/l{int(a.layer[0])}/p")


def test_node_ids_and_coverage(models64, tmp_path):
    assert attn_feature(2, 5, 12).id == "attn/l2/p5/f12" and Node.parse("attn/l2/p5/f12") == attn_feature(2, 5, 12)
    assert attn_error(1, 3).id == "attn_error/l1/p3" and Node.parse("attn_error/l1/p3") == attn_error(1, 3)
    assert attn_feature(2, 5, 12).positionless == "attn/l2/f12" and attn_feature(2, 5, 12).layer == 2
    assert TRANSCODER_FEATURE_TYPES[Kind.ATTN_FEATURE] == "lorsa" and Kind.ATTN_ERROR in LEAF_KINDS
    model = models64["llama"]
    write_transcoder_set(tmp_path / "ct", model.d_model, model.n_layers, d_sae=D_SAE)
    ts = load_transcoders(tmp_path / "ct", model, dtype=torch.float64)
    one = AttentionSAESet({0: attention_saes(model, ("z", "z"))[0]})
    with pytest.raises(SAEMismatchError, match=r"attention SAEs cover layers \(0,\) of 2: load one per layer") as err:
        checkpointed_graph(model, ts, one, "Aunt Sally")
    assert "\n" not in str(err.value)
