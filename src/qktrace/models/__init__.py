"""Model anatomy over Hugging Face models: `load_model`, `Model`, `Trace`, the family table."""

from .anatomy import Anatomy, Layer, Norm, Rotary
from .families import FAMILIES, SUPPORTED, ModuleHandles, family_for
from .model import Model, load_model
from .residuals import residuals
from .trace import PerLayer, Trace

__all__ = [
    "FAMILIES",
    "SUPPORTED",
    "Anatomy",
    "Layer",
    "Model",
    "ModuleHandles",
    "Norm",
    "PerLayer",
    "Rotary",
    "Trace",
    "family_for",
    "load_model",
    "residuals",
]
