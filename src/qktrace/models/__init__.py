"""Model anatomy over Hugging Face models: `load_model`, `Model`, `Trace`, the family table, and what the
model owns about tokens (`Contrast`, `resolve_positions`)."""

from .anatomy import Anatomy, Layer, Norm, Rotary
from .families import FAMILIES, SUPPORTED, ModuleHandles, family_for
from .model import Model, load_model, public_name
from .residuals import residuals
from .tokens import Contrast, Positions, resolve_positions
from .trace import PerLayer, Trace

__all__ = [
    "FAMILIES",
    "SUPPORTED",
    "Anatomy",
    "Contrast",
    "Layer",
    "Model",
    "ModuleHandles",
    "Norm",
    "PerLayer",
    "Positions",
    "Rotary",
    "Trace",
    "family_for",
    "load_model",
    "public_name",
    "residuals",
    "resolve_positions",
]
