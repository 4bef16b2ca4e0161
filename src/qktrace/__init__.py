"""qktrace: why attention heads attend where they do, in terms of SAE features.

The public API is exactly `__all__` (a test holds it there).
"""

from .analyses.compare import Comparison, compare
from .analyses.explain import ExplainSettings, Mechanism, explain
from .config import VERSION
from .errors import QKTraceError
from .graph import Graph, build_graph, load_graph
from .models import Model, Trace, load_model
from .qk import QKAttribution, qk_attribution
from .saes import SAE, SAESet, load_saes
from .steering.interventions import FreezeAttention, ScaleHead, SteerFeature, SteerQK, run_with
from .steering.sweep import sweep
from .tracer import Traced, Tracer

__all__ = [
    "SAE",
    "Comparison",
    "ExplainSettings",
    "FreezeAttention",
    "Graph",
    "Model",
    "Mechanism",
    "QKAttribution",
    "QKTraceError",
    "SAESet",
    "ScaleHead",
    "SteerFeature",
    "SteerQK",
    "Trace",
    "Traced",
    "Tracer",
    "build_graph",
    "compare",
    "explain",
    "load_graph",
    "load_model",
    "load_saes",
    "qk_attribution",
    "run_with",
    "sweep",
]
__version__ = VERSION
