"""Every exception qktrace raises on purpose, in one place.

    QKTraceError                 base; its message is one line that names the problem and the fix
    ├── ModelLoadError           path missing, not a causal LM, hub unreachable
    ├── UnsupportedModelError    a family the anatomy layer does not know
    ├── SAELoadError             corrupt or unknown SAE file, missing optional extra
    ├── SAEMismatchError         SAE d_in differs from the model, hook is not a residual checkpoint
    ├── InputError               empty prompt, bad token ids
    ├── OutOfRangeError          layer, head, position or feature index out of range
    │   └── MissingSAEError      no SAE at a checkpoint asked for (raised by `saes.sae_at` / `require_saes` only;
    │                            also an InputError and an SAEMismatchError, the types this check raised before)
    ├── GraphFileError           graph JSON that is corrupt or of an unknown version
    └── Cancelled                work stopped at a checkpoint because whoever asked for it is gone (the server)

The CLI catches QKTraceError and prints its message on one line (exit 2), never a traceback.

A fix that each front end words its own way (a flag on the command line, a request field or the server's start
option over HTTP, a keyword in Python) is a `Fix`: the error carries it, and each front end asks for its own
line (`QKTraceError.line("cli")`, `line("http")`); `str(e)` is the library's (`line("api")`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Front = Literal["api", "cli", "http"]


@dataclass(frozen=True)
class Fix:
    """The way out of a refusal, as each front end says it: `api` (Python: a keyword, e.g. "pass
    transcoders=PATH"), `cli` (a flag: "pass --transcoders DIR"), `http` (a request field, or how the server
    is started: "start the server with `qktrace serve --transcoders DIR`")."""

    api: str
    cli: str
    http: str

    @classmethod
    def loaded(cls, keyword: str, flag: str, *, also: str = "") -> Fix:
        """For what a tracer is loaded with (transcoders, SAEs): the load keyword, the command's flag, or the
        server's start option, since a request cannot load it (`also`: other start options it needs)."""
        serve = " ".join(x for x in ("qktrace serve --model MODEL", also, f"{flag} DIR") if x)
        return cls(
            api=f"load them (Tracer.load(..., {keyword}=DIR))",
            cli=f"pass {flag} DIR",
            http=f"start the server with `{serve}`",
        )

    @classmethod
    def option(cls, verb: str, field: str, flag: str) -> Fix:
        """For a setting of one request: its field (the API's keyword and the HTTP body's) or its flag."""
        return cls(api=f"{verb} {field}", cli=f"{verb} {flag}", http=f"{verb} {field}")


class QKTraceError(Exception):
    """Base class: the message is a single line that says what happened and how to fix it. Built with a
    `fix`, the message is `problem: fix.api`, and `line(front)` words the fix for that front end."""

    def __init__(self, message: str = "", fix: Fix | None = None) -> None:
        super().__init__(message if fix is None else f"{message}: {fix.api}")
        self.problem, self.fix = message, fix

    def line(self, front: Front) -> str:
        """The one line front end `front` shows: the problem and the fix in its own words."""
        return str(self) if self.fix is None else f"{self.problem}: {getattr(self.fix, front)}"


class ModelLoadError(QKTraceError):
    pass


class UnsupportedModelError(QKTraceError):
    pass


class SAELoadError(QKTraceError):
    pass


class SAEMismatchError(QKTraceError):
    pass


class InputError(QKTraceError):
    pass


class OutOfRangeError(QKTraceError):
    pass


class MissingSAEError(OutOfRangeError, InputError, SAEMismatchError):
    """No SAE at a checkpoint that was asked for. One owner raises it (`qktrace.saes.sae_at` and
    `require_saes`, behind `SAESet[c]`, `Traced.sae`, graphs and steering); its message names the
    checkpoint, the loaded ones, and how to load one. It subclasses the three types that the five
    separate checks raised before, so handlers written for any of them still catch it."""


class GraphFileError(QKTraceError):
    pass


class Cancelled(QKTraceError):
    """Work stopped at a checkpoint (between layers) or before it ran: its requester went away."""


def check_index(value: int, size: int, what: str, *, allow_negative: bool = False) -> int:
    """Return `value` as a non-negative index into `size` items, or raise OutOfRangeError.

    Negative values count from the end when `allow_negative` is set (positions do; layers and heads don't).
    """
    if allow_negative and -size <= value < 0:
        return value + size
    if 0 <= value < size:
        return value
    lo = -size if allow_negative else 0
    raise OutOfRangeError(f"{what} {value} is out of range: valid values are {lo}..{size - 1}")


def quoted(value: object, limit: int = 60) -> str:
    """A user's value as an error message shows it: its repr (one line: newlines are escaped), cut to about
    `limit` characters with how long it was, so that a 100 KB answer or a 5,000-digit number gives a short line."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 3.33 * limit:
        return f"an integer of about {value.bit_length() * 0.30103:.0f} digits"  # str() of 10**5000 is refused
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value):,} characters)"
    try:
        text = repr(value)
    except (ValueError, RecursionError):
        return f"a {type(value).__name__}"
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"
