"""`python -m qktrace.server ARGS` is `qktrace serve ARGS`: one parser, one set of checks (an entry point,
never imported by the package)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from qktrace.cli import main as cli_main


def main(argv: Sequence[str] | None = None) -> int:
    return int(cli_main(["serve", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    raise SystemExit(main())
