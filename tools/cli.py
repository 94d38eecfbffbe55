"""The ``tritonsd`` command line. Subcommands only parse and call: each lives in ``tools/<name>.py`` exposing
``add_parser(subparsers)`` and ``run(args) -> int``.

Exit codes: 0 success, 1 a failed check (or a runtime error with a clear message), 2 bad usage.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = ("generate", "inspect", "parity", "bench", "merge", "warmup", "check_compile", "batch", "serve")


class UsageError(ValueError):
    """Bad usage detected after parsing (exit code 2)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tritonsd",
        description="Stable Diffusion with Triton kernels: generate images from original checkpoints, "
                    "inspect them, benchmark the kernels, check parity against reference outputs.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"tritonsd.tools.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"tritonsd.tools.{name}":
                raise
            continue
        module.add_parser(sub)
    return parser


def one_line(e: BaseException) -> str:
    """An error's message on one line whatever it holds: newlines, escape sequences and other control
    characters from names read out of files are shown escaped (``tritonsd.escape``), never acted on."""
    from tritonsd.escape import escape

    return escape(str(e), limit=2000)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except UsageError as e:
        print(f"tritonsd {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError, OSError) as e:
        print(f"tritonsd {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # Under ``python -m tritonsd.tools.cli`` this file runs as ``__main__``, a second copy of the module: its
    # UsageError is not the one subcommands import (``from .cli import UsageError``), so run the package's main.
    from tritonsd.tools.cli import main as package_main

    sys.exit(package_main())
