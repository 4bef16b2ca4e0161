"""One source of defaults, shared by the Python API, the CLI and the server."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

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


@dataclass(frozen=True)
class MemoryDefaults:
    # whole-layer scores/patterns a Trace keeps for reuse (a layer of a 1k-token, 12-head prompt is 48 MB)
    pattern_cache_bytes: int = 256 << 20
    # full-mode graphs: the share of the device's free memory (RAM on CPU) a build may use by default
    budget_fraction: float = 0.5


# How far a decomposition may sit from the model's own number, relative to the larger of |score| and the
# largest |term|, per model dtype. Terms accumulate in float32; half-precision models round their own
# q, k and scores (measured on the tiny random models of every family: bfloat16 <= 4.4e-3, float16 <= 6e-4).
TOLERANCE = {"float64": 1e-10, "float32": 1e-4, "bfloat16": 2e-2, "float16": 3e-3}


def tolerance(dtype: torch.dtype) -> float:
    return TOLERANCE[str(dtype).removeprefix("torch.")]


GRAPH = GraphDefaults()
QK = QKDefaults()
MEMORY = MemoryDefaults()


def resolve_model(name: str) -> str:
    """'demo' names the embedded demo model; anything else is a path or hub id."""
    return str(DEMO_MODEL) if name == DEMO_NAME else name


def resolve_saes(model: str | None, saes: str | None) -> str | None:
    """'demo' names the embedded demo SAEs, which are also the default for the demo model."""
    if saes == DEMO_NAME or (saes is None and model is not None and str(model) in (DEMO_NAME, str(DEMO_MODEL))):
        return str(DEMO_SAES)
    return saes


DTYPES = ("float32", "bfloat16", "float16", "float64")  # float64: for exactness checks
DEVICES_HELP = "cpu, cuda, cuda:N or auto"


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """'float32' | 'bfloat16' | 'float16' (or a torch.dtype among them) -> torch.dtype; InputError otherwise."""
    import torch

    from .errors import InputError

    if isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
    else:
        name = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}.get(dtype, dtype)
    if name not in DTYPES:
        raise InputError(f"dtype '{dtype}' is not supported: use one of {', '.join(DTYPES)}")
    return getattr(torch, name)  # type: ignore[no-any-return]


def parse_device(device: str | torch.device) -> torch.device:
    """'cpu' | 'cuda' | 'cuda:N' | 'auto' (CUDA when visible, else CPU) -> torch.device; InputError when the
    device is unknown or not visible on this machine."""
    import torch

    from .errors import InputError

    if isinstance(device, torch.device):
        name = str(device)
    else:
        name = device.strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise InputError(f"device '{device}' is not understood: use {DEVICES_HELP}") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise InputError(f"device '{device}' is not supported: use {DEVICES_HELP}")
    if not torch.cuda.is_available():
        raise InputError(f"device '{device}' was asked for but no CUDA GPU is visible: use --device cpu (or auto)")
    n = torch.cuda.device_count()
    if dev.index is not None and dev.index >= n:
        raise InputError(f"device '{device}' does not exist: this machine has cuda:0..cuda:{n - 1}")
    return dev
