"""Devices and dtypes: every tensor the library makes says where it lives; half-precision models decompose
exactly in float32 within the stated tolerance; the same exactness checks on CUDA (marked `cuda`,
skipped where no GPU is visible: `pytest -m cuda` on a GPU machine)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import qktrace
from qktrace import Tracer
from qktrace.config import TOLERANCE, tolerance
from qktrace.graph.build import attribute
from qktrace.models import load_model
from qktrace.models.replay import frozen_layer
from qktrace.saes import SAESet
from qktrace.steering.interventions import FreezeAttention, ScaleHead, SteerFeature, SteerQK, run_with
from qktrace.testing import TINY_FAMILIES, hf_attention, random_prompt, random_saes

SRC = Path(qktrace.__file__).parent
FACTORIES = {"tensor", "zeros", "ones", "full", "arange", "empty", "randn", "rand", "randint", "as_tensor", "eye",
             "linspace", "randperm"}  # fmt: skip
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible: run pytest -m cuda on a GPU")


def test_every_tensor_factory_names_its_device():
    """STYLE 12: a tensor created without device= lands on the CPU and breaks the first GPU run."""
    missing = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"
                and node.func.attr in FACTORIES
                and not any(k.arg == "device" for k in node.keywords)
            ):
                missing.append(f"{path.relative_to(SRC)}:{node.lineno} torch.{node.func.attr}")
    assert not missing, "tensor factories without device=: " + ", ".join(missing)


# -- the checks, for any device and dtype ------------------------------------------------------------------


def setup(path: Path, device: str, dtype: str) -> Tracer:
    model = load_model(path, dtype=dtype, device=device)
    saes = random_saes(model, "topk", seed=5)
    return Tracer(model, SAESet({c: s.to(device=model.device, dtype=model.anatomy.dtype) for c, s in saes.items()}))


def check_qk_sums_to_hf_scores(tracer: Tracer) -> float:
    """Every head's whole row at the last query; returns the worst relative error."""
    traced = tracer.run(random_prompt(12, 7))
    hf = hf_attention(tracer.model, traced.trace.tokens)
    worst = 0.0
    for layer in range(tracer.model.n_layers):
        for head in range(tracer.model.n_heads):
            att = traced.qk(layer, head, -1)
            assert att.terms.device == traced.trace.q[layer].device and att.terms.dtype == torch.float32
            ref = hf.scores[layer][head, -1, list(att.key_positions)].to(att.capped_sum)
            scale = max(float(att.terms.abs().max()), float(ref.abs().max()))
            worst = max(worst, float((att.capped_sum - ref).abs().max()) / scale)
            # the recomputed score is HF's (one row's matmul may round differently from HF's whole one)
            ulp = 1e-6 if tracer.model.anatomy.dtype == torch.float32 else 8e-3
            assert float((att.score - ref).abs().max()) <= ulp * scale
    assert worst < tolerance(tracer.model.anatomy.dtype), worst
    return worst


def check_graph_edges(tracer: Tracer) -> None:
    """Edges into a few targets equal autograd through the frozen layer, and every row sums to its readout of
    HF's own residual. In half precision both hold within the dtype's tolerance: the graph works in float32
    at the point HF's rounded arithmetic reached (its MLP input, its attention output in bf16)."""
    traced = tracer.run(random_prompt(7, 3))
    model, trace = tracer.model, traced.trace
    tol = (
        min(1e-4, tolerance(model.anatomy.dtype))
        if model.anatomy.dtype == torch.float32
        else tolerance(model.anatomy.dtype)
    )
    att = attribute(model, tracer.saes, trace)
    for b, info in att.inputs.items():
        block = att.blocks[b]
        n_src = len(info.sources)
        for row in range(0, len(info.targets), max(1, len(info.targets) // 3)):
            r, p = info.targets.vec[row], int(info.targets.pos[row])
            x = trace.resid[info.layer].clone().requires_grad_(True)
            y = frozen_layer(model.anatomy, trace, info.layer, x)
            (grad,) = torch.autograd.grad((y[p] * r).sum(), x)
            ref = (grad[info.sources.pos] * info.sources.vec).sum(-1)
            got = block.weight[row, :n_src]
            assert float((got - ref).abs().max()) <= tol * float(ref.abs().max()) + 1e-6
            whole = float(r @ trace.resid[info.layer + 1][p])
            assert abs(float(block.weight[row].sum()) - whole) <= tol * float(block.weight[row].abs().sum())


def check_scale_one_is_clean(tracer: Tracer) -> None:
    model, saes = tracer.model, tracer.saes
    prompt = random_prompt(9, 4)
    clean = model.run(prompt)
    f = int(saes[1].encode(clean.resid[1])[-1].argmax())
    ivs = [SteerFeature(1, f, -1, scale=1.0), SteerQK(1, (0, 2), "key", f, slice(2, 6), scale=1.0),
           FreezeAttention(), ScaleHead(0, 3, 1.0)]  # fmt: skip
    assert torch.equal(run_with(model, saes, prompt, ivs).logits, model.forward(clean.tokens).float())


# -- half precision on the CPU ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_half_precision_qk_within_tolerance(tiny_paths, family, dtype):
    tracer = setup(tiny_paths[family], "cpu", dtype)
    assert tracer.model.anatomy.layers[0].W_Q.dtype == torch.float32  # the anatomy accumulates in float32
    check_qk_sums_to_hf_scores(tracer)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_half_precision_graph_and_interventions(tiny_paths, family):
    tracer = setup(tiny_paths[family], "cpu", "bfloat16")
    check_graph_edges(tracer)
    check_scale_one_is_clean(tracer)


def test_tolerances_are_stated_per_dtype():
    assert TOLERANCE["float32"] <= 1e-4 < TOLERANCE["float16"] < TOLERANCE["bfloat16"] <= 2e-2


def test_device_map_path_on_the_cpu(tiny_paths):
    """load_model(..., device_map=) goes through accelerate; every layer reports its own device."""
    pytest.importorskip("accelerate")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu", "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "cpu"}  # fmt: skip
    tracer = Tracer.load(tiny_paths["llama"], device_map=device_map)
    assert [ly.device.type for ly in tracer.model.anatomy.layers] == ["cpu", "cpu"]
    saes = random_saes(tracer.model, "topk", seed=5)
    check_qk_sums_to_hf_scores(Tracer(tracer.model, saes))


# -- CUDA ---------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_cuda_qk_sums_to_hf_scores(tiny_paths, family, dtype):
    tracer = setup(tiny_paths[family], "cuda", dtype)
    assert tracer.model.device.type == "cuda"
    check_qk_sums_to_hf_scores(tracer)


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen3", "gemma2"])
def test_cuda_graph_edges_and_interventions(tiny_paths, family, dtype):
    tracer = setup(tiny_paths[family], "cuda", dtype)
    check_graph_edges(tracer)
    check_scale_one_is_clean(tracer)
    graph = tracer.run(random_prompt(10, 1)).graph(progress=False)  # the whole path, QK terms included
    assert graph.n_edges > 0 and graph.top_heads()


@pytest.mark.cuda
@CUDA
def test_cuda_device_map_splits_layers_between_cpu_and_gpu(tiny_paths):
    """A model too large for one device: layer 0 on the CPU, the rest on the GPU (accelerate)."""
    pytest.importorskip("accelerate")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": 0, "model.norm": 0,
                  "model.rotary_emb": 0, "lm_head": 0}  # fmt: skip
    tracer = Tracer.load(tiny_paths["llama"], device_map=device_map)
    assert tracer.model.anatomy.layers[0].device.type == "cpu"
    assert tracer.model.anatomy.layers[1].device.type == "cuda"
    saes = random_saes(tracer.model, "topk", seed=5)
    tracer = Tracer(tracer.model, SAESet({c: s.to(tracer.model.checkpoint_device(c)) for c, s in saes.items()}))
    check_qk_sums_to_hf_scores(tracer)
    check_graph_edges(tracer)
