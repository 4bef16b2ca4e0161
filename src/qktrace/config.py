"""Paths, limits, tolerances and the parsers of what users type (dtype, device, bytes, scales); the settings
of each analysis are declared in `qktrace.options`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

VERSION = "0.1.0"  # qktrace.__version__, written into the files it makes
DEMO_ASSETS = Path(__file__).parent / "demo" / "assets"
DEMO_MODEL = DEMO_ASSETS / "model"
DEMO_SAES = DEMO_ASSETS / "saes"
DEMO_TRANSCODERS = DEMO_ASSETS / "transcoders"  # a circuit-tracer transcoder set (recipes/demo/train_transcoders.py)
DEMO_ATTENTION_SAES = DEMO_ASSETS / "attention_saes"  # SAELens folders on blocks.L.attn.hook_z
DEMO_NAME = "demo"  # what users type for the embedded model and SAEs


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


MEMORY = MemoryDefaults()


def resolve_model(name: str) -> str:
    """'demo' names the embedded demo model; anything else is a path or hub id."""
    return str(DEMO_MODEL) if name == DEMO_NAME else name


def resolve_saes(model: str | None, saes: str | None, transcoders: str | None = None) -> str | None:
    """'demo' names the embedded demo SAEs, which are also the default for the demo model when no transcoders
    are given (with transcoders, its graphs are transcoder graphs: residual SAEs only when asked)."""
    demo_model = model is not None and str(model) in (DEMO_NAME, str(DEMO_MODEL))
    if saes == DEMO_NAME or (saes is None and transcoders is None and demo_model):
        return str(DEMO_SAES)
    return saes


def resolve_coders(transcoders: str | None, attention_saes: str | None) -> tuple[str | None, str | None]:
    """'demo' names the demo's own transcoders and attention-output SAEs; anything else is a path."""
    ts = str(DEMO_TRANSCODERS) if transcoders == DEMO_NAME else transcoders
    return ts, str(DEMO_ATTENTION_SAES) if attention_saes == DEMO_NAME else attention_saes


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
    return getattr(torch, name)


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
    max_steer_parts: int = 16  # more feature sets in one steering request (a mechanism's parts)
    max_steer_features: int = 64  # features in one such part
    max_positions: int = 4096  # explicit positions in one request (a slice is resolved against the prompt)
    max_watch_tokens: int = 20  # watched next tokens in a sweep
    max_watch_attention: int = 20  # watched attention weights in a sweep
    max_top: int = 1000  # QK terms listed (--top, "top")
    max_graph_nodes: int = 100_000  # --max-nodes / "max_nodes"
    server_max_tokens: int = 1024  # tokens of one prompt the server traces (qktrace serve --max-tokens)
    max_prompt_chars: int = 100_000  # characters of prompt text the server tokenizes
    max_request_bytes: int = 1 << 20  # body of one API request
    # model work (QK, sweep, compare, explain requests; graph and explain jobs) queued or running in the server,
    # each on a thread of its own; one more is answered 429 with Retry-After (qktrace serve --queue)
    max_queued_jobs: int = 8
    retry_after_s: int = 10  # the Retry-After of that 429 (and of a 503)
    model_wait_s: float = 120.0  # how long admitted model work waits for its turn and the model before a 503
    max_finished_jobs: int = 256  # finished jobs remembered (the oldest finished are forgotten first)
    trace_cache_bytes: int = 1 << 30  # traced prompts the server keeps for further questions
    max_graph_file_bytes: int = 256 << 20  # a graph file the server reads (bigger ones are listed as invalid)
    max_layers: int = 1024  # n_layers and layer indices read from a graph file
    max_heads_per_layer: int = 1024  # head indices and settings.top_heads read from a graph file
    max_memory_bytes: int = 1 << 50  # the largest --max-memory understood (1 PiB)


LIMITS = Limits()

_BYTE_UNITS = {"": 1, "B": 1, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4}


MIN_MEMORY_BYTES = 1 << 20  # the smallest budget a graph build can work in (one chunk of rows)


def parse_bytes(spec: str | int, what: str = "memory budget") -> int:
    """'8GB' | '512MB' | '8GiB' | '1.5G' | '1000000' -> bytes (KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB
    of 1024); InputError for anything else, non-finite, below 1MiB (`MIN_MEMORY_BYTES`) or past
    `LIMITS.max_memory_bytes`. The one rule for byte budgets: the CLI, the server and `GraphOptions` all
    check through here. `what` names the value in the message."""
    import math
    import re

    from .errors import InputError

    usage = "give a byte count such as 8GB, 512MB or 16GiB"
    if isinstance(spec, bool) or not isinstance(spec, str | int):
        raise InputError(f"{what} {spec!r} is not understood: {usage}")
    text = str(spec).strip()
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMgGtT]?)(i?)[bB]?", text[:64])
    if m is None or len(text) > 64:
        raise InputError(f"{what} '{text[:64]}' is not understood: {usage}")
    number, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    if binary and not unit:
        raise InputError(f"{what} '{text}' is not understood: {usage}")
    factor = 1024 ** ("KMGT".index(unit) + 1) if binary else _BYTE_UNITS[unit]
    value = number * factor
    if not math.isfinite(value) or value < MIN_MEMORY_BYTES or value > LIMITS.max_memory_bytes:
        raise InputError(f"{what} '{text}' is out of range: give 1MiB to 1PiB, such as 8GB")
    return int(value)


def parse_scales(spec: str | Sequence[float], max_count: int | None = None) -> list[float]:
    """'-4:4:9' -> 9 evenly spaced values from -4 to 4; '0,1,2' -> those values; a sequence as is.

    Refused (InputError) before anything is expanded: no values, more than `max_count` (default
    `LIMITS.max_scales`: each scale is one forward pass), NaN, infinite, or past +-`LIMITS.max_abs_scale`."""
    import math

    from .errors import InputError

    limit = LIMITS.max_scales if max_count is None else max_count
    usage = "'start:stop:count' (e.g. -4:4:9) or 'a,b,c'"
    if isinstance(spec, str):
        text = spec.strip()
        try:
            if ":" in text:
                start, stop, count = text.split(":")
                n = int(count)
                bounds = [float(start), float(stop)]
            else:
                parts = [s for s in text.split(",") if s.strip()]
                n = len(parts)
                if n > limit:
                    raise InputError(f"{n} scales given: a sweep takes 1..{limit} (each is one forward pass)")
                bounds = [float(s) for s in parts]
        except ValueError:
            raise InputError(f"scale spec '{text[:60]}' is not {usage}") from None
    elif isinstance(spec, Sequence) and not isinstance(spec, bytes):
        n = len(spec)
        if n > limit:
            raise InputError(f"{n} scales given: a sweep takes 1..{limit} (each is one forward pass)")
        try:
            bounds = [float(s) for s in spec]
        except (TypeError, ValueError):
            raise InputError(f"scales {list(spec)[:5]!r} are not all numbers: give {usage}") from None
    else:
        raise InputError(f"scales {spec!r} are not understood: give {usage}")
    if not 1 <= n <= limit:
        raise InputError(f"{n} scales asked for: a sweep takes 1..{limit} (each is one forward pass), e.g. -2:4:7")
    bad = [b for b in bounds if not math.isfinite(b) or abs(b) > LIMITS.max_abs_scale]
    if bad:
        raise InputError(
            f"scale {bad[0]} is not a finite number within +-{LIMITS.max_abs_scale:g}: give scales such as -4:4:9"
        )
    if isinstance(spec, str) and ":" in spec:
        import numpy as np

        return [float(s) for s in np.linspace(bounds[0], bounds[1], n)]
    return bounds
