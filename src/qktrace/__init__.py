"""qktrace: why attention heads attend where they do, in terms of SAE features."""

from .errors import QKTraceError
from .models import Model, Trace, load_model
from .qk import QKAttribution
from .saes import SAE, SAESet, load_saes
from .tracer import Traced, Tracer

__all__ = [
    "SAE",
    "Model",
    "QKAttribution",
    "QKTraceError",
    "SAESet",
    "Trace",
    "Traced",
    "Tracer",
    "load_model",
    "load_saes",
]
__version__ = "0.1.0"
