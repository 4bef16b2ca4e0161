"""Names Neuronpedia files a graph under: its slug and scan (model id), checked and derived.

- slug: [a-zA-Z0-9_.-] (Neuronpedia's rule), by default the prompt's words and a hash of the model, tokens
  and settings. scan: the Neuronpedia model id when the model or its SAEs name one (`NEURONPEDIA_MODELS`),
  else the model's name made safe (the demo model is `qktrace-demo`). Both can be given.
- The SAEs' Neuronpedia source set (`neuronpedia_source_set`): where their features' dashboards live.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from ...config import DEMO_MODEL, DEMO_NAME
from ...errors import InputError
from ...nodes import Kind

if TYPE_CHECKING:
    from ..graph import Graph

SAFE = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")
NEURONPEDIA_MODELS = {  # the last part of a hub id or folder name, lower case -> Neuronpedia model id
    "gpt2": "gpt2-small",
    "gpt2-small": "gpt2-small",
    "gemma-2-2b": "gemma-2-2b",
    "gemma-2-9b": "gemma-2-9b",
    "llama-3.1-8b": "llama3.1-8b",
    "meta-llama-3.1-8b": "llama3.1-8b",
    "llama3.1-8b": "llama3.1-8b",
    "qwen3-4b": "qwen3-4b",
    "qwen3-1.7b": "qwen3-1.7b",
    "pythia-70m-deduped": "pythia-70m-deduped",
}
DEMO_SCAN = "qktrace-demo"  # the embedded demo model is no Neuronpedia model


def check_name(value: str, what: str) -> str:
    """`value` if it is a safe slug or scan ([a-zA-Z0-9_.-], 1-200 characters), else one-line InputError."""
    if not isinstance(value, str) or not SAFE.match(value):
        raise InputError(
            f"{what} {str(value)[:60]!r} may hold only letters, digits, '_', '.' and '-' (Neuronpedia's rule, "
            f"at most 200): e.g. 'aunt-sally-induction'"
        )
    return value


def sanitise(text: str, limit: int = 60) -> str:
    """`text` with every run of other characters replaced by '-', cut to `limit`: a safe name or ''."""
    return re.sub(r"[^A-Za-z0-9_.]+", "-", text).strip("-._")[:limit].strip("-._")


def neuronpedia_scan(model_name: str, neuronpedia_ids: Iterable[str] = ()) -> str:
    """The Neuronpedia model id of a graph: the one its SAEs' Neuronpedia ids name, else the model's name
    looked up in `NEURONPEDIA_MODELS`, else the model's name made safe."""
    models = {i.split("/", 1)[0] for i in neuronpedia_ids if "/" in i}
    if len(models) == 1:
        (only,) = models
        if SAFE.match(only):
            return only
    name = str(model_name).rstrip("/\\")
    if name in (DEMO_NAME, str(DEMO_MODEL)):
        return DEMO_SCAN
    last = re.split(r"[/\\]", name)[-1].lower()
    return NEURONPEDIA_MODELS.get(last) or sanitise(last) or "model"


def graph_slug(
    prompt: str, model_name: str, tokens: Iterable[int], settings: Mapping[str, Any], targets: Iterable[str] = ()
) -> str:
    """The prompt's first words (letters and digits joined by '-') and a short hash of the model, tokens,
    settings and logit targets: 'i-always-loved-visiting-aunt-sally-1f3a9c2e'."""
    key = json.dumps([model_name, list(tokens), dict(settings), sorted(targets)], sort_keys=True, default=str)
    digest = hashlib.sha1(key.encode()).hexdigest()[:8]
    text = re.sub(r"<[^<>\s]{1,40}>", " ", prompt)  # special tokens such as <bos> or <|endoftext|> say nothing
    words = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48].strip("-") or "graph"
    return f"{words}-{digest}"


def default_slug(graph: Graph) -> str:
    """`graph_slug` of a graph: its prompt, model, tokens, settings and logit nodes."""
    logits = [n.id for n in graph.nodes if n.node.kind is Kind.LOGIT]
    return graph_slug(graph.prompt, graph.model_name, graph.tokens, graph.settings, logits)


def neuronpedia_source_set(neuronpedia_ids: Mapping[int, str]) -> tuple[str, int] | None:
    """(source set, layer offset) when every SAE is in one Neuronpedia source set and its layer number is
    the checkpoint plus one offset for all of them ('gpt2-small/8-res-jb' at checkpoint 8: ('res-jb', 0));
    else None."""
    found = set()
    for c, np_id in neuronpedia_ids.items():
        m = re.match(r"^[^/]+/(\d+)-([A-Za-z0-9_.-]+)$", np_id or "")
        if m is None:
            return None
        found.add((m[2], int(m[1]) - c))
    return found.pop() if len(found) == 1 else None
