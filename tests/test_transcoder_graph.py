"""The plain transcoder graph against an independent autograd through HF's own modules.

The reference replacement model is built here with torch hooks on the HF model, not with qktrace's replay:
every softmax (eager attention's pattern) is detached, every norm module is replaced by its own formula
with the denominator detached, and each MLP's output (at the transcoder set's output site) is replaced by
leaf features @ W_dec + b_dec + skip(x) + leaf error, so HF's forward is unchanged while each edge is a
gradient: d(target) / d(source multiplier), with target = a feature's pre-activation or a logit's
demeaned unembedding direction read after the final norm."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qktrace.graph.replacement import transcoder_graph
from qktrace.models import load_model
from qktrace.nodes import Kind
from qktrace.saes import load_transcoders
from qktrace.testing import frozen_norm, hooked_forward, make_tiny_model, write_transcoder_set

FAMILIES = ("gpt2", "llama", "gemma2", "qwen3")
D_SAE = 48
# HF module names, written out here: (layers, pre-MLP norm, post-MLP norm, final norm, embedding)
HF = {
    "gpt2": (lambda hf: hf.transformer.h, "ln_2", None, lambda hf: hf.transformer.ln_f, lambda hf: hf.transformer.wte),
    "llama": (lambda hf: hf.model.layers, "post_attention_layernorm", None, lambda hf: hf.model.norm, None),
    "qwen3": (lambda hf: hf.model.layers, "post_attention_layernorm", None, lambda hf: hf.model.norm, None),
    "gemma2": (
        lambda hf: hf.model.layers,
        "pre_feedforward_layernorm",
        "post_feedforward_layernorm",
        lambda hf: hf.model.norm,
        None,
    ),
}
# HF (and so qktrace's trace) computes RMSNorm scales in float32 even in a float64 model; the reference in float64
TOL = dict(rtol=1e-5, atol=1e-5)


def write_set(folder: Path, d: int, n: int, input_site: str, output_hook: str, skip: bool) -> None:
    write_transcoder_set(folder, d, n, input_site, output_hook, skip, d_sae=D_SAE)


@pytest.fixture(scope="module")
def models64(tmp_path_factory):
    """The tiny models in float64, so the reference autograd and the graph agree to rounding."""
    root = tmp_path_factory.mktemp("tc64")
    return {f: load_model(make_tiny_model(f, root / f, seed=i), dtype=torch.float64) for i, f in enumerate(FAMILIES)}


def reference(model, family: str, ts, ids: torch.Tensor):  # type: ignore[no-untyped-def]
    """HF's forward with the replacement hooks: returns (leaves, captured) for gradients."""
    hf = model.hf
    layers_of, ln_mlp, post_mlp, final, embed = HF[family]
    blocks = list(layers_of(hf))
    got: dict = {"mid": {}, "x": {}, "acts": {}, "err": {}, "y": {}}
    handles = []
    norms = [m for m in hf.modules() if "norm" in type(m).__name__.lower() or isinstance(m, torch.nn.LayerNorm)]
    handles += [m.register_forward_hook(frozen_norm, with_kwargs=True) for m in norms]

    def site_x(layer: int, mid: torch.Tensor, mlp_in: torch.Tensor) -> torch.Tensor:
        if ts.input_site == "resid_mid":
            return mid
        if ts.input_site == "mlp_in":
            return mlp_in
        norm = blocks[layer].get_submodule(ln_mlp)
        xc = mid - mid.mean(-1, keepdim=True) if isinstance(norm, torch.nn.LayerNorm) else mid
        eps = getattr(norm, "eps", None) or getattr(norm, "variance_epsilon", 1e-6)
        return xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps).detach()

    def replace(layer: int):  # type: ignore[no-untyped-def]
        def hook(module, args, out):  # type: ignore[no-untyped-def]
            t = ts[layer]
            x = site_x(layer, got["mid"][layer], got["mlp_in"])
            acts = (x.detach() @ t.W_enc + t.b_enc).relu().detach().requires_grad_(True)
            out0 = out if isinstance(out, torch.Tensor) else out[0]
            skip = x @ t.W_skip if t.W_skip is not None else 0
            recon = acts @ t.W_dec + t.b_dec + skip
            err = (out0 - recon).detach().requires_grad_(True)
            got["x"][layer], got["acts"][layer], got["err"][layer], got["y"][layer] = x, acts, err, out0.detach()
            return recon + err

        return hook

    for layer, block in enumerate(blocks):
        ln = block.get_submodule(ln_mlp)
        handles.append(ln.register_forward_hook(lambda m, a, o, L=layer: got["mid"].update({L: a[0]})))
        handles.append(ln.register_forward_hook(lambda m, a, o: got.update(mlp_in=o)))
        site = block.get_submodule(post_mlp) if (ts.output_site == "mlp_out" and post_mlp) else block.mlp
        handles.append(site.register_forward_hook(replace(layer)))
    emb_mod = embed(hf) if embed else hf.model.embed_tokens
    handles.append(emb_mod.register_forward_hook(lambda m, a, o: got.update(emb=o.detach().requires_grad_(True))))
    handles.append(emb_mod.register_forward_hook(lambda m, a, o: got["emb"]))
    handles.append(final(hf).register_forward_hook(lambda m, a, o: got.update(final=o)))
    hooked_forward(hf, ids, handles)
    return got


def reference_row(got, target: torch.Tensor, sources: list) -> list[torch.Tensor]:  # type: ignore[type-arg]
    return list(torch.autograd.grad(target, sources, retain_graph=True, allow_unused=True))


CASES = [(f, "mlp_in", "hook_mlp_out", False) for f in FAMILIES] + [
    ("gpt2", "resid_mid", "hook_mlp_out", True),
    ("gemma2", "normalized", "mlp.hook_out", True),
    ("llama", "normalized", "hook_mlp_out", True),
]


@pytest.mark.parametrize("family,input_site,output_hook,skip", CASES)
def test_every_edge_is_an_autograd_gradient_through_hf(family, input_site, output_hook, skip, models64, tmp_path):
    model = models64[family]
    write_set(tmp_path / "ct", model.d_model, model.n_layers, input_site, output_hook, skip)
    ts = load_transcoders(tmp_path / "ct", model, dtype=torch.float64)
    prompt = "Aunt Sally is the opposite of Uncle Bob ."
    g = transcoder_graph(model, ts, prompt, desired_logit_prob=0.5, max_n_logits=3, batch_size=7)
    ids = g.tokens
    got = reference(model, family, ts, ids)
    n_layers, n_pos, f = model.n_layers, ids.numel(), g.features
    # the graph's activations are the transcoder encodings of HF's own MLP inputs (position 0 zeroed)
    assert g.n_features > 10
    for layer in range(n_layers):
        acts = got["acts"][layer][0].detach().clone()
        acts[0] = 0
        at = f.layer == layer
        torch.testing.assert_close(acts[f.pos[at], f.index[at]], f.act[at], **TOL)
        assert int((acts > 0).sum()) == int(at.sum())
        # errors + features + skip + b_dec == HF's MLP output at the site (positions past the zeroed one)
        t = ts[layer]
        skip = got["x"][layer][0] @ t.W_skip if t.W_skip is not None else 0
        recon = acts @ t.W_dec + t.b_dec + skip + f.errors[layer]
        torch.testing.assert_close(recon[1:], got["y"][layer][0, 1:], **TOL)
        assert float(f.errors[layer][0].abs().max()) == 0.0
    leaves = [got["acts"][layer] for layer in range(n_layers)] + [got["err"][layer] for layer in range(n_layers)]
    leaves.append(got["emb"])
    n_feat = g.n_features
    targets = []
    for r in range(n_feat):
        layer, pos, index = int(f.layer[r]), int(f.pos[r]), int(f.index[r])
        targets.append((r, got["x"][layer][0, pos] @ ts[layer].W_enc[:, index]))  # the feature's pre-activation
    W_U = model.anatomy.W_U
    for k, tok in enumerate(g.logit_tokens.tolist()):
        vec = W_U[:, tok] - W_U.mean(-1)
        targets.append((len(g.nodes) - len(g.logit_tokens) + k, got["final"][0, -1] @ vec))
    checked = 0
    for row, target in targets:
        grads = reference_row(got, target, leaves)
        want = torch.zeros(len(g.nodes), dtype=torch.float64)
        for layer in range(n_layers):
            ga = grads[layer]
            if ga is not None:
                at = (f.layer == layer).nonzero()[:, 0]
                want[at] = ga[0, f.pos[at], f.index[at]] * f.act[at]
            ge = grads[n_layers + layer]
            if ge is not None:
                col = n_feat + layer * n_pos
                want[col : col + n_pos] = (ge[0] * f.errors[layer]).sum(-1)
        if grads[-1] is not None:
            col = n_feat + n_layers * n_pos
            want[col : col + n_pos] = (grads[-1][0] * got["emb"][0].detach()).sum(-1)
        torch.testing.assert_close(g.adjacency[row], want, **TOL)
        checked += int((want != 0).sum())
    assert checked > 100
    # node kinds in circuit-tracer's order
    kinds = [n.kind for n in g.nodes]
    assert kinds == [Kind.TRANSCODER] * n_feat + [Kind.MLP_ERROR] * (n_layers * n_pos) + [Kind.TOKEN] * n_pos + [
        Kind.LOGIT
    ] * len(g.logit_tokens)


# -- the pruned graph: circuit-tracer's prune_graph and compute_graph_scores, written densely here --------------


def ct_normalize(a: torch.Tensor) -> torch.Tensor:
    a = a.abs()
    return a / a.sum(1, keepdim=True).clamp(min=1e-10)


def ct_influence(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """w @ (A + A^2 + ...), by solving (I - A)^T x = w rather than by a sweep."""
    eye = torch.eye(len(a), dtype=a.dtype)
    return torch.linalg.solve((eye - a).T, w) - w


def ct_threshold(scores: torch.Tensor, fraction: float) -> float:
    s = torch.sort(scores.flatten(), descending=True).values
    return float(s[int(torch.searchsorted(torch.cumsum(s, 0) / s.sum(), torch.tensor([fraction], dtype=s.dtype)))])


def ct_prune(tg, node_threshold: float, edge_threshold: float):  # type: ignore[no-untyped-def]
    """circuit-tracer's pruning and scores of an unpruned graph (a plain transcoder graph, or a checkpointed one:
    attention features count as features, attention errors as errors)."""
    adj = tg.adjacency.double()
    n_logit, n_tok = len(tg.logit_tokens), int(tg.tokens.numel())
    kinds = [n.kind for n in tg.nodes]
    feat = torch.tensor([k in (Kind.TRANSCODER, Kind.ATTN_FEATURE) for k in kinds])
    err = torch.tensor([k in (Kind.MLP_ERROR, Kind.ATTN_ERROR) for k in kinds])
    w = torch.zeros(len(adj), dtype=torch.float64)
    w[-n_logit:] = tg.logit_probs.double()
    infl = ct_influence(ct_normalize(adj), w)
    mask = infl >= ct_threshold(infl, node_threshold)
    mask[-n_logit - n_tok :] = True
    pruned = adj.clone()
    pruned[~mask] = 0
    pruned[:, ~mask] = 0
    norm = ct_normalize(pruned)
    scores = norm * (ct_influence(norm, w) + w)[:, None]
    edges = scores >= ct_threshold(scores, edge_threshold)
    while True:
        old = mask.clone()
        mask[: -n_logit - n_tok] &= edges[:, : -n_logit - n_tok].any(0)
        mask[feat] &= edges[feat].any(1)
        edges &= mask[:, None] & mask[None, :]
        if torch.equal(mask, old):
            break
    full = ct_normalize(adj)
    tok_i, err_i = float(infl[-n_logit - n_tok : -n_logit].sum()), float(infl[err].sum())
    completeness = float(((1 - full[:, err].sum(1)) * (infl + w)).sum() / (infl + w).sum())
    return mask, edges, tok_i / (tok_i + err_i), completeness


@pytest.mark.parametrize("family,checkpointed", [("gpt2", False), ("gemma2", False), ("llama", True), ("gemma2", True)])
def test_pruned_graph_is_circuit_tracers_prune_of_the_adjacency(family, checkpointed, models64, tmp_path):
    """Kept nodes and edges, weights and both scores equal circuit-tracer's prune_graph / compute_graph_scores
    on the unpruned adjacency (written densely above); every kept edge is an adjacency entry, unchanged. The
    same for a checkpointed graph (transcoders + attention SAEs, `strategy2_graph`), whose blocks put each
    layer's attention features below its transcoder features."""
    from qktrace.graph.replacement import TranscoderGraph
    from qktrace.graph.replacement_graph import build_transcoder_graph
    from qktrace.graph.strategy2 import CheckpointedGraph, checkpointed_graph
    from qktrace.graph.strategy2_graph import build_checkpointed_graph
    from qktrace.options import GraphOptions
    from qktrace.testing import random_attention_saes

    model = models64[family]
    write_set(tmp_path / "ct", model.d_model, model.n_layers, "mlp_in", "hook_mlp_out", False)
    ts = load_transcoders(tmp_path / "ct", model, dtype=torch.float64)
    trace = model.run("Aunt Sally is the opposite of Uncle Bob .")
    options = GraphOptions(node_threshold=0.9, edge_threshold=0.95, max_nodes=None)
    tg: CheckpointedGraph | TranscoderGraph
    if checkpointed:
        att = random_attention_saes(model, ("z", "attn_out"), D_SAE)
        tg = checkpointed_graph(model, ts, att, trace, by_head=False)
        graph = build_checkpointed_graph(model, ts, att, trace, options)
        assert Kind.ATTN_FEATURE in {n.node.kind for n in graph.nodes}
    else:
        tg = transcoder_graph(model, ts, trace)
        graph = build_transcoder_graph(model, ts, trace, options)
    mask, edges, replacement, completeness = ct_prune(tg, 0.9, 0.95)
    index = {n.id: i for i, n in enumerate(tg.nodes)}
    kept = [index[n.id] for n in graph.nodes]
    assert kept == mask.nonzero().flatten().tolist() and len(kept) < len(tg.nodes)
    got = {(kept[s], kept[t]): float(w) for s, t, w in zip(graph.source, graph.target, graph.weight)}
    want = {(int(s), int(t)): float(tg.adjacency[t, s]) for t, s in edges.nonzero().tolist()}
    assert got.keys() == want.keys() and len(got) > 10
    for key, value in got.items():
        assert value == pytest.approx(want[key], rel=1e-6, abs=1e-12)  # stored as float32
    assert graph.replacement == pytest.approx(replacement, rel=1e-9)
    assert graph.completeness == pytest.approx(completeness, rel=1e-9)
    kinds = {n.node.kind for n in graph.nodes}
    assert {Kind.MLP_ERROR, Kind.TOKEN, Kind.LOGIT} <= kinds
    assert checkpointed or graph.heads.shape == (graph.n_edges, 0)
    assert Kind.TRANSCODER in kinds, [(n.id, n.influence) for n in graph.nodes]
    # the Graph saves and reads back like any other, node kinds and scores included
    from qktrace.graph import load_graph

    back = load_graph(graph.save(tmp_path / "g.json"))
    assert [n.id for n in back.nodes] == [n.id for n in graph.nodes]
    assert back.replacement == graph.replacement and torch.equal(back.weight, graph.weight)
