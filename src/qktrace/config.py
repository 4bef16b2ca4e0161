"""One source of defaults, shared by the Python API, the CLI and the server."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

VERSION = "0.1.0"  # qktrace.__version__, written into the files it makes
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


DTYPES = ("float32", "bfloat16", "float16")
DEVICES_HELP = "cpu, cuda, cuda:N or auto"


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """'float32' | 'bfloat16' | 'float16' (or a torch.dtype among them) -> torch.dtype; InputError otherwise."""
    import torch

    from .errors import InputError

    if dtype == torch.float64:  # the Python API also takes float64 (exactness checks), the CLI does not
        return torch.float64
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


@dataclass(frozen=True)
class Limits:
    """Bounds on the work one command or request may ask for, shared by the CLI and the server.

    Each is checked before any model work starts, and refused with one line naming the value and the bound.
    """

    max_scales: int = 64  # steering scales in one sweep: one forward pass each
    max_abs_scale: float = 1e4  # |scale| (or |value|) a steered activation may be given
    max_heads: int = 256  # (layer, head) pairs in one steering request (no repeats, each a real head)
    max_positions: int = 4096  # explicit positions in one request (a slice is resolved against the prompt)
    max_watch_tokens: int = 20  # watched next tokens in a sweep
    max_watch_attention: int = 20  # watched attention weights in a sweep
    max_top: int = 1000  # QK terms listed (--top, "top")
    max_graph_nodes: int = 100_000  # --max-nodes / "max_nodes"
    server_max_tokens: int = 1024  # tokens of one prompt the server traces (qktrace serve --max-tokens)
    max_prompt_chars: int = 100_000  # characters of prompt text the server tokenizes
    max_request_bytes: int = 1 << 20  # body of one API request
    max_queued_jobs: int = 8  # graph jobs queued or running; one more is answered 429 with Retry-After
    retry_after_s: int = 10  # the Retry-After of that 429 (and of a 503)
    model_wait_s: float = 120.0  # how long a QK or sweep request waits for the model (a graph build) before a 503
    max_finished_jobs: int = 256  # finished jobs remembered (the oldest finished are forgotten first)
    trace_cache_bytes: int = 1 << 30  # traced prompts the server keeps for further questions
    max_graph_file_bytes: int = 256 << 20  # a graph file the server reads (bigger ones are listed as invalid)
    max_layers: int = 1024  # n_layers and layer indices read from a graph file
    max_heads_per_layer: int = 1024  # head indices and settings.top_heads read from a graph file
    max_memory_bytes: int = 1 << 50  # the largest --max-memory understood (1 PiB)


LIMITS = Limits()

_BYTE_UNITS = {"": 1, "B": 1, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4}


def parse_bytes(spec: str | int) -> int:
    """'8GB' | '512MB' | '8GiB' | '1.5G' | '1000000' -> bytes (KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB
    of 1024); InputError for anything else, zero, negative, non-finite or past `LIMITS.max_memory_bytes`."""
    import math
    import re

    from .errors import InputError

    usage = "give a byte count such as 8GB, 512MB or 16GiB"
    if isinstance(spec, bool) or not isinstance(spec, str | int):
        raise InputError(f"memory budget {spec!r} is not understood: {usage}")
    text = str(spec).strip()
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMgGtT]?)(i?)[bB]?", text[:64])
    if m is None or len(text) > 64:
        raise InputError(f"memory budget '{text[:64]}' is not understood: {usage}")
    number, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    if binary and not unit:
        raise InputError(f"memory budget '{text}' is not understood: {usage}")
    factor = 1024 ** ("KMGT".index(unit) + 1) if binary else _BYTE_UNITS[unit]
    value = number * factor
    if not math.isfinite(value) or value < 1 or value > LIMITS.max_memory_bytes:
        raise InputError(f"memory budget '{text}' is out of range: give 1 byte to 1PiB, such as 8GB")
    return int(value)
