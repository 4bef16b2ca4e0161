"""One source of defaults, shared by the Python API, the CLI and the server."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEMO_ASSETS = Path(__file__).parent / "demo" / "assets"
DEMO_MODEL = DEMO_ASSETS / "model"
DEMO_SAES = DEMO_ASSETS / "saes"
DEMO_NAME = "demo"  # what users type for the embedded model and SAEs


@dataclass(frozen=True)
class GraphDefaults:
    node_threshold: float = 0.8
    edge_threshold: float = 0.98
    max_logits: int = 10
    logit_probability: float = 0.95
    readout: str = "decoder"
    # features kept after pruning: graphs past a few thousand edges are unreadable in a browser and
    # take minutes to write (a random GPT-2-small keeps 14k nodes / 2M edges at the thresholds alone)
    max_nodes: int | None = 600


@dataclass(frozen=True)
class QKDefaults:
    top: int = 20


GRAPH = GraphDefaults()
QK = QKDefaults()


def resolve_model(name: str) -> str:
    """'demo' names the embedded demo model; anything else is a path or hub id."""
    return str(DEMO_MODEL) if name == DEMO_NAME else name


def resolve_saes(model: str | None, saes: str | None) -> str | None:
    """'demo' names the embedded demo SAEs, which are also the default for the demo model."""
    if saes == DEMO_NAME or (saes is None and model is not None and str(model) in (DEMO_NAME, str(DEMO_MODEL))):
        return str(DEMO_SAES)
    return saes
