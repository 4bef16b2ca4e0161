"""Test fixtures in one place: tiny random models, random SAEs, HF's own attention numbers, setups on disk.

Nothing here downloads anything: each model is built from a small config, given large random
weights (so every term of every decomposition matters), saved with `save_pretrained` and loaded
back through `load_model`, the path users take. `random_sae` is the one builder of random SAEs
(every architecture in `qktrace.saes.ARCHITECTURES`); `hf_attention` reads Hugging Face's softmax
input with its own spy, independent of qktrace's capture code, as the reference exactness tests
compare against. tests/conftest.py turns these into pytest fixtures.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .saes import SAE, SAESet, hook_checkpoint, save_sae_lens

if TYPE_CHECKING:
    from .tracer import Tracer

WORDS = [f"w{i}" for i in range(90)] + ["Aunt", "Sally", "Uncle", "Bob", ".", ",", "the", "is", "of", "opposite"]


def tiny_config(family: str, vocab: int, **overrides: object):
    import transformers as T

    cfg: Any
    common: dict[str, Any] = dict(
        vocab_size=vocab, hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=48
    )
    if family == "gpt2":
        cfg = T.GPT2Config(vocab_size=vocab, n_embd=32, n_head=4, n_layer=2, n_positions=128, n_inner=48)
    elif family == "gpt_neox":
        rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
        cfg = T.GPTNeoXConfig(**common, rope_parameters=rope, use_parallel_residual=True, attention_bias=True)
    elif family == "llama":
        cfg = T.LlamaConfig(**common, num_key_value_heads=2, attention_bias=True, mlp_bias=False)
    elif family == "mistral":
        cfg = T.MistralConfig(**common, num_key_value_heads=2, sliding_window=5)
    elif family == "qwen2":
        cfg = T.Qwen2Config(**common, num_key_value_heads=2)
    elif family == "qwen3":
        cfg = T.Qwen3Config(**common, num_key_value_heads=2, head_dim=12)
    elif family == "gemma2":
        cfg = T.Gemma2Config(
            **common,
            num_key_value_heads=2,
            head_dim=12,
            query_pre_attn_scalar=20,
            attn_logit_softcapping=3.0,
            final_logit_softcapping=20.0,
            sliding_window=5,
        )
    else:
        raise ValueError(family)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


TINY_FAMILIES = ("gpt2", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "gemma2")


def randomize(model: Any, seed: int = 0, std: float = 0.35) -> None:
    """Large random weights: matrices N(0, std), norm gains 1 + N(0, 0.2), biases N(0, 0.2)."""
    g = torch.Generator().manual_seed(seed)
    gemma = model.config.model_type == "gemma2"
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, device="cpu")
            if "norm" in name or name.split(".")[-2].startswith("ln"):
                p.copy_((0.0 if gemma and name.endswith("weight") else 1.0) * (name.endswith("weight")) + 0.2 * noise)
            elif p.ndim == 1:
                p.copy_(0.2 * noise)
            else:
                p.copy_(std * noise)


def word_tokenizer(path: Path):
    """A word-level tokenizer over WORDS with a BOS token, saved next to the model."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<bos>": 0, "<unk>": 1}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", unk_token="<unk>")
    fast.save_pretrained(path)
    return fast


def make_tiny_model(family: str, path: Path, seed: int = 0, **overrides: object) -> Path:
    """Build, randomise and save a tiny model of `family` with a word-level tokenizer; return its path."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    vocab = len(WORDS) + 2
    hf = AutoModelForCausalLM.from_config(tiny_config(family, vocab, **overrides), attn_implementation="eager")
    randomize(hf, seed)
    path.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(path)
    word_tokenizer(path)
    return path


def random_prompt(n: int, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(WORDS), (n,), generator=g, device="cpu")
    return " ".join(WORDS[int(i)] for i in idx)


# -- random SAEs ------------------------------------------------------------------------------------------

SAE_STD = (0.3, 0.1, 0.3, 0.2)  # standard deviations of W_enc, b_enc, W_dec, b_dec


def random_sae(
    architecture: str,
    d_model: int,
    d_sae: int,
    *,
    seed: int | torch.Generator = 0,
    checkpoint: int | None = None,
    std: tuple[float, float, float, float] = SAE_STD,
    tied: bool = False,
    k: int = 6,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    **fields: Any,
) -> SAE:
    """One random SAE of `architecture` ("standard", "jumprelu" or "topk"), reading the raw residual.

    W_enc [d_model, d_sae], b_enc [d_sae], W_dec [d_sae, d_model] and b_dec [d_model] are normal with the
    standard deviations `std`, in that order (a zero std gives zeros and draws nothing); `tied` makes W_dec
    W_enc's transpose at its own scale (each feature writes the direction it reads). A jumprelu's threshold
    is uniform in [0, 1); a topk keeps `k`. Draws come in a fixed order (W_enc, b_enc, W_dec, b_dec,
    threshold) from `seed`, an int or a generator shared by several calls. The checkpoint defaults to
    `hook_name`'s, else 0. `fields` set any other SAE field (hook_name, labels, apply_b_dec_to_input, which
    defaults to False here) or replace a drawn tensor (b_enc=...).
    """
    g = seed if isinstance(seed, torch.Generator) else torch.Generator(device="cpu").manual_seed(seed)

    def normal(s: float, *shape: int) -> Tensor:  # a zero std draws nothing: zeros, the generator untouched
        return s * torch.randn(*shape, generator=g, device="cpu") if s else torch.zeros(*shape, device="cpu")

    W_enc = normal(std[0], d_model, d_sae)
    b_enc = normal(std[1], d_sae)
    W_dec = std[2] / std[0] * W_enc.T.contiguous() if tied else normal(std[2], d_sae, d_model)
    b_dec = normal(std[3], d_model)
    threshold = torch.rand(d_sae, generator=g, device="cpu") if architecture == "jumprelu" else None
    drawn = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec, "threshold": threshold}
    drawn = {name: None if t is None else t.to(device=device, dtype=dtype) for name, t in drawn.items()}
    hook = fields.get("hook_name", "")
    return SAE(
        **{
            "checkpoint": (hook_checkpoint(hook) if hook else 0) if checkpoint is None else checkpoint,
            "architecture": architecture,
            "k": k if architecture == "topk" else None,
            "apply_b_dec_to_input": False,
            **drawn,
            **fields,
        }
    )


def random_saes(
    model: Any, architecture: str, *, d_sae: int = 48, seed: int = 0, checkpoints: Iterable[int] | None = None,
    **kw: Any,
) -> SAESet:  # fmt: skip
    """`random_sae`s of `architecture` at `checkpoints` (default 0..n_layers) of `model` (anything with d_model
    and n_layers), drawn one after another from one generator, in the model's dtype and on its device."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    anatomy = getattr(model, "anatomy", None)
    kw.setdefault("dtype", getattr(anatomy, "dtype", torch.float32))
    kw.setdefault("device", getattr(model, "device", "cpu"))
    cs = range(model.n_layers + 1) if checkpoints is None else checkpoints
    return SAESet({c: random_sae(architecture, model.d_model, d_sae, seed=g, checkpoint=c, **kw) for c in cs})


# -- Hugging Face's own numbers, the reference of the exactness tests ----------------------------------------


@dataclass
class HFAttention:
    scores: list[Tensor]  # per layer [head, q_pos, k_pos], soft-capped, -inf where masked
    patterns: list[Tensor]  # per layer [head, q_pos, k_pos]
    attn_out: list[Tensor]  # per layer [pos, d_model] (the attention module's output, before post-norms)
    logits: Tensor  # [pos, vocab]


def hf_attention(model: Any, ids: Tensor) -> HFAttention:
    """One plain forward of the HF model with a softmax spy and output_attentions.

    Independent of qktrace's capture code on purpose (it reads only `model.hf` and `model.attn_modules`
    with plain torch hooks): tests compare qktrace's recomputations with what HF itself computed."""
    seen: list[Tensor] = []
    real = torch.nn.functional.softmax

    def spy(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if x.dim() == 4 and x.shape[-1] == x.shape[-2] == ids.numel():
            seen.append(x.detach()[0])
        return real(x, *args, **kwargs)

    outs: list[Tensor] = []
    handles = [
        m.register_forward_hook(lambda mod, args, out: outs.append((out[0] if isinstance(out, tuple) else out)[0]))
        for m in model.attn_modules
    ]
    torch.nn.functional.softmax = spy  # type: ignore[assignment]  # the spy forwards every argument
    try:
        with torch.no_grad():
            out = model.hf(input_ids=ids.reshape(1, -1), output_attentions=True, use_cache=False)
    finally:
        torch.nn.functional.softmax = real
        for h in handles:
            h.remove()
    assert len(seen) == model.n_layers, f"saw {len(seen)} softmax calls for {model.n_layers} layers"
    scores = [s.masked_fill(s <= torch.finfo(s.dtype).min / 2, float("-inf")) for s in seen]
    return HFAttention(scores, [a[0] for a in out.attentions], outs, out.logits[0])


# -- circuit-tracer transcoder sets on disk ---------------------------------------------------------------------

CT_INPUT_HOOK = {"resid_mid": "hook_resid_mid", "mlp_in": "mlp.hook_in", "normalized": "ln2.hook_normalized"}


def write_transcoder_set(
    folder: Path, d_model: int, n_layers: int, input_site: str = "mlp_in", output_hook: str = "hook_mlp_out",
    skip: bool = False, d_sae: int = 48,
) -> Path:  # fmt: skip
    """A circuit-tracer ReLU transcoder set (config.yaml + layer_L.safetensors) with a negative encoder bias,
    so a few features are active per token; `input_site` names the site, `output_hook` circuit-tracer's hook."""
    from safetensors.torch import save_file

    def rand(*shape: int, seed: int, scale: float = 1.0) -> Tensor:
        return (
            torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64, device="cpu")
            * scale
        )

    folder.mkdir(parents=True)
    folder.joinpath("config.yaml").write_text(
        f'model_kind: "transcoder_set"\nfeature_input_hook: "{CT_INPUT_HOOK[input_site]}"\n'
        f'feature_output_hook: "{output_hook}"\n'
    )
    d = d_model
    for i in range(n_layers):
        w = {
            "W_enc": rand(d_sae, d, seed=10 * i + 1, scale=1.0 / d**0.5),
            "W_dec": rand(d_sae, d, seed=10 * i + 2, scale=0.3),
            "b_enc": rand(d_sae, seed=10 * i + 3, scale=0.2) - 0.4,
            "b_dec": rand(d, seed=10 * i + 4, scale=0.2),
        }
        if skip:
            w["W_skip"] = rand(d, d, seed=10 * i + 6, scale=0.1)
        save_file({k: v.float() for k, v in w.items()}, str(folder / f"layer_{i}.safetensors"))
    return folder


def random_attention_saes(model: Any, sites: Iterable[str], d_sae: int = 40, seed: int = 50, **kw: Any) -> Any:
    """An `AttentionSAESet`: per layer a random standard SAE at `sites[layer]` ("z" or "attn_out", seed + layer,
    a negative encoder bias), in the model's dtype unless `dtype` is given; `write_attention_saes` saves them."""
    from .saes.attention import AttentionSAE, AttentionSAESet

    kw.setdefault("dtype", model.anatomy.dtype)
    saes = {}
    for layer, site in enumerate(sites):
        ly = model.anatomy.layers[layer]
        hook = f"blocks.{layer}.attn.hook_z" if site == "z" else f"blocks.{layer}.hook_attn_out"
        d_in = ly.n_heads * ly.d_head if site == "z" else model.d_model
        std = (0.4, 0.3, 0.3, 0.2)
        coder = random_sae("standard", d_in, d_sae, seed=seed + layer, checkpoint=layer, std=std, hook_name=hook, **kw)
        saes[layer] = AttentionSAE(layer, site, coder, *((ly.n_heads, ly.d_head) if site == "z" else (None, None)))
    return AttentionSAESet(saes)


def write_attention_saes(folder: Path, saes: Any) -> Path:
    """An `AttentionSAESet` as SAELens folders under `folder` (one per hook), as `load_attention_saes` reads."""
    for sae in saes.values():
        save_sae_lens(sae.coder, folder / sae.hook_name)
    return folder


# -- setups on disk: the jobs' (a model, SAEs of every architecture, a corpus) and the server's ----------------

# checkpoint -> (hook, architecture): the tiny llama has 2 layers, so checkpoints 0, 1 and 2 (= resid_post of 1)
JOB_SAES = {
    0: ("blocks.0.hook_resid_pre", "topk"),
    1: ("blocks.1.hook_resid_pre", "standard"),
    2: ("blocks.1.hook_resid_post", "jumprelu"),
}


@dataclass(frozen=True)
class JobSetup:
    model: Path
    saes: Path
    corpus: Path


def write_job_saes(root: Path, d_model: int = 32, d_sae: int = 48, seed: int = 0) -> Path:
    """JOB_SAES as SAELens folders: tied random SAEs, the standard one subtracting b_dec from its input."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    for c, (hook, arch) in JOB_SAES.items():
        sae = random_sae(
            arch, d_model, d_sae, seed=g, checkpoint=c, hook_name=hook, std=(1.0, 0.3, 0.3, 0.1), tied=True,
            apply_b_dec_to_input=arch == "standard",
        )  # fmt: skip
        save_sae_lens(sae, root / hook)
    return root


def write_corpus(path: Path, n_docs: int = 30, seed: int = 0) -> Path:
    """Documents of 3..40 words (some longer than one chunk in the tests), as JSONL."""
    lines = [json.dumps({"text": random_prompt(3 + (7 * i + seed) % 38, seed=seed + i)}) for i in range(n_docs)]
    path.write_text("\n".join(lines) + "\n")
    return path


def make_job_setup(root: Path) -> JobSetup:
    """A tiny llama, JOB_SAES and a corpus under `root`, for the dashboards and batch jobs."""
    return JobSetup(
        model=make_tiny_model("llama", root / "model", seed=3),
        saes=write_job_saes(root / "saes"),
        corpus=write_corpus(root / "corpus.jsonl"),
    )


def tree(root: Path) -> dict[str, bytes]:
    """Every file under `root` (relative path -> bytes)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


GRAPH_NAME = "tiny.json"


@dataclass
class ServerSetup:
    root: Path
    data: Path  # the server's data directory, holding GRAPH_NAME
    saes: Path
    tracer: Tracer
    tokens: list[int]
    graph: dict[str, Any]  # GRAPH_NAME's JSON


def make_server_setup(root: Path, n_words: int = 6) -> ServerSetup:
    """A tiny llama, labelled random topk SAEs saved as SAELens folders (one with a dashboards.json), one graph."""
    from .tracer import Tracer

    model_dir = make_tiny_model("llama", root / "model")
    plain = Tracer.load(model_dir)
    sae_dir = root / "saes"
    for c, sae in random_saes(plain.model, "topk", d_sae=24, k=5).items():
        labels = {f: f"c{c} feature {f}" for f in range(0, sae.d_sae, 2)}
        save_sae_lens(dataclasses.replace(sae, labels=labels), sae_dir / f"blocks.{c}.hook_resid_pre")
    dash = {
        "checkpoint": 1,
        "features": {
            "3": {
                "label": "dash label",
                "freq": 0.012,
                "max_act": 2.5,
                "top_out": ["Sally", "Bob"],
                "contexts": [{"tokens": ["Aunt", "Sally", "is"], "i": 1, "act": 2.5}],
            }
        },
    }
    (sae_dir / "blocks.1.hook_resid_pre" / "dashboards.json").write_text(json.dumps(dash))
    tracer = Tracer.load(model_dir, sae_dir)
    traced = tracer.run(random_prompt(n_words, seed=1))
    data = root / "graphs"
    data.mkdir()
    traced.graph(progress=False).save(data / GRAPH_NAME)
    tokens = traced.trace.tokens.tolist()
    return ServerSetup(root, data, sae_dir, tracer, tokens, json.loads((data / GRAPH_NAME).read_text()))


# -- a tiny model whose answer is built into one head's QK circuit -------------------------------------------


@dataclass(frozen=True)
class QKCircuit:
    """`make_qk_circuit`'s model and SAEs, and where the answer was built in."""

    tracer: Tracer
    prompt: str
    answer: str
    layer: int
    head: int
    key_pos: int  # the key the head attends to from the last position
    feature: int  # the SAE feature (at `layer`, last position) that carries the whole query


def make_qk_circuit(path: Path, seed: int = 0, answer: str = "Sally") -> QKCircuit:
    """A tiny GPT-2 whose layer-1 head 0 answers `answer` because of one SAE feature, by construction.

    The SAE at checkpoint 1 (standard, random but for feature 0) has feature 0 read and write the last
    position's residual r_Q exactly (activation 1 there). The head's W_Q and W_K are rank one: the query
    is (x · x̂_Q) e0 and each key (x_p · x̂_k) e0, where x = ln_1(r) (its bias zeroed, so feature 0 is the
    whole query) and x̂ is a unit vector: the head attends from the last position to key k. Its W_V reads
    (x_p · x̂_k) and its W_O writes that times 40 times the answer's embedding, so that what it finds at k
    becomes the answer. Removing feature 0 from the head's query removes all of its attention to k.
    """
    from transformers import AutoModelForCausalLM

    from .models import load_model
    from .tracer import Tracer

    make_tiny_model("gpt2", path, seed=seed)
    hf: Any = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    tok = word_tokenizer(path)
    prompt, key_pos, layer, head, d_head = "w5 w6 Bob w7 w8 w9 Uncle w10 is", 3, 1, 0, 8
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    block = hf.transformer.h[layer]
    with torch.no_grad():
        block.ln_1.bias.zero_()
        r = hf(ids, output_hidden_states=True).hidden_states[layer][0]  # [pos, d_model], the input of `layer`
        x = block.ln_1(r)
        xq, xk = x[-1] / x[-1].norm(), x[key_pos] / x[key_pos].norm()
        d = hf.config.n_embd
        W, b = block.attn.c_attn.weight, block.attn.c_attn.bias  # [d_model, 3 d_model]: q | k | v
        for part, direction in ((0, xq), (1, xk), (2, xk)):
            cols = slice(part * d + head * d_head, part * d + (head + 1) * d_head)
            W[:, cols] = 0.0
            b[cols] = 0.0
            W[:, cols.start] = direction * (1.5 if part < 2 else 1.0)
        u = hf.transformer.wte.weight[tok.convert_tokens_to_ids(answer)]
        rows = slice(head * d_head, (head + 1) * d_head)
        block.attn.c_proj.weight[rows] = 0.0
        block.attn.c_proj.weight[rows.start] = 40.0 * (u - u.mean()) / u.norm()
    hf.save_pretrained(path)
    sae = random_sae("standard", d, 48, seed=seed, checkpoint=layer)
    rq = r[-1].detach()
    W_enc, b_enc, W_dec = sae.W_enc.clone(), sae.b_enc.clone(), sae.W_dec.clone()
    W_enc[:, 0], b_enc[0], W_dec[0] = rq / rq.dot(rq), 0.0, rq
    sae = dataclasses.replace(sae, W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, labels={0: "the built-in query"})
    others = {c: random_sae("standard", d, 48, seed=seed + 1 + c, checkpoint=c) for c in (0, 2)}
    tracer = Tracer(load_model(path), SAESet({**others, layer: sae}))
    return QKCircuit(tracer, prompt, answer, layer, head, key_pos, 0)


# -- HF's own forward with frozen norms and patterns: the independent reference of the replacement graphs -------


def norm_gain(module: Any) -> Tensor:
    """A HF norm module's gain (Gemma's RMSNorm multiplies by 1 + w)."""
    return 1.0 + module.weight if "Gemma" in type(module).__name__ else module.weight


def frozen_norm(module: Any, args: Any, kwargs: Any, out: Any) -> Tensor:
    """A forward hook: the norm's own formula with its denominator detached (LayerNorm: centred, with bias)."""
    x = args[0] if args else kwargs["hidden_states"]
    eps = getattr(module, "eps", None) or getattr(module, "variance_epsilon", 1e-6)
    if isinstance(module, torch.nn.LayerNorm):
        xc = x - x.mean(-1, keepdim=True)
        return xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps).detach() * module.weight + module.bias
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps).detach() * norm_gain(module)


@contextlib.contextmanager
def detached_softmax() -> Iterator[None]:
    """Every softmax's output detached while inside (HF's eager attention reaches it through F.softmax)."""
    real = torch.nn.functional.softmax
    torch.nn.functional.softmax = lambda *a, **k: real(*a, **k).detach()
    try:
        yield
    finally:
        torch.nn.functional.softmax = real


def hooked_forward(hf: Any, ids: Tensor, handles: Iterable[Any]) -> None:
    """HF's forward over `ids` with every softmax detached; the hooks in `handles` are removed afterwards."""
    try:
        with detached_softmax():
            hf(ids[None], use_cache=False)
    finally:
        for h in handles:
            h.remove()
