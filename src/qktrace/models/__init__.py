"""Model anatomy over Hugging Face models: `load_model`, `Model`, `Trace`, the family table."""

from .anatomy import Anatomy, Layer, Norm, Rotary
from .families import FAMILIES, SUPPORTED, family_for
from .model import Model, Trace, load_model

__all__ = ["FAMILIES", "SUPPORTED", "Anatomy", "Layer", "Model", "Norm", "Rotary", "Trace", "family_for", "load_model"]
