"""The `qktrace` command line. Every mistake ends in one line on stderr and exit status 2; a bug ends in
one line and exit status 1 (with -v, its traceback too). Parsing: `args`; the sub-commands: `commands`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import traceback
from collections.abc import Sequence

from ..errors import QKTraceError
from .args import build_parser, join_dash_values, one_line

__all__ = ["main"]


def _quiet_transformers() -> None:
    """HF's own progress bars and warnings would bury our one-line errors; our progress is rich's."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    try:
        from huggingface_hub.utils import logging as hub_logging

        hub_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - huggingface_hub always comes with transformers
        pass


def _fail(message: str) -> None:
    print(f"qktrace: {one_line(message)}", file=sys.stderr)


def _is_out_of_memory(e: BaseException) -> bool:
    return (
        isinstance(e, MemoryError)
        or type(e).__name__ == "OutOfMemoryError"
        or any(s in str(e) for s in ("out of memory", "can't allocate memory"))
    )


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else ""


def main(argv: Sequence[str] | None = None) -> int:
    from .commands import COMMANDS

    try:
        args = build_parser(COMMANDS).parse_args(join_dash_values(sys.argv[1:] if argv is None else argv))
    except SystemExit as e:  # a mistake (already one line on stderr, code 2) or --help (0)
        return e.code if isinstance(e.code, int) else 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        _quiet_transformers()
        return int(args.func(args) or 0)
    except QKTraceError as e:
        _fail(f"error: {e.line('cli')}")
        return 2
    except KeyboardInterrupt:
        _fail("interrupted")
        return 130
    except BrokenPipeError:  # `qktrace ... | head`: the reader left; say nothing more
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as e:  # a bug, or the machine ran out of something: still one line
        if args.verbose:
            traceback.print_exc()
        if _is_out_of_memory(e):
            _fail(
                f"error: out of memory ({type(e).__name__}: {_first_line(e)}): use a shorter prompt, "
                "--dtype bfloat16, a smaller --max-memory or another --device"
            )
            return 2
        hint = "" if args.verbose else ": run with -v for the traceback"
        _fail(f"internal error ({type(e).__name__}: {_first_line(e)}){hint}, and please report it")
        return 1


if __name__ == "__main__":
    sys.exit(main())
