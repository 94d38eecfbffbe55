"""The ``tritonsd`` command line. Subcommands only parse and call: each lives in ``tools/<name>.py`` exposing
``add_parser(subparsers)`` and ``run(args) -> int``.

Exit codes: 0 success, 1 a failed check (or a runtime error with a clear message), 2 bad usage, 130 interrupted
(Ctrl-C), 143 terminated (SIGTERM); the README lists them.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys

from tritonsd import __version__
from tritonsd.escape import escape

SUBCOMMANDS = ("generate", "inspect", "parity", "bench", "merge", "warmup", "check_compile", "batch", "serve")


class UsageError(ValueError):
    """Bad usage detected after parsing (exit code 2)."""


OPTIONAL_VALUE_FLAGS = ("--ray",)  # take a value only with "=" (``--ray``, ``--ray=local``): never the next word


def plain_help(doc: str) -> str:
    """A module docstring's first paragraph as plain help text: reST's double backquotes dropped, lines joined."""
    paragraph = doc.strip().split("\n\n", 1)[0]
    return re.sub(r"``([^`]*)``", r"\1", " ".join(line.strip() for line in paragraph.splitlines()))


def bare_flags(argv: list[str]) -> list[str]:
    """``--ray`` with no ``=`` becomes ``--ray=auto``, so that the word after it stays a positional argument (the
    jobs file) instead of being read as the flag's value; after ``--`` nothing is touched."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--":
            break
        if arg in OPTIONAL_VALUE_FLAGS:
            out[i] = f"{arg}=auto"
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tritonsd",
        description="Stable Diffusion with Triton kernels: generate images from original checkpoints, "
                    "inspect them, benchmark the kernels, check parity against reference outputs.",
    )
    parser.add_argument("--version", action="version", version=f"tritonsd {__version__}")
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
    return escape(str(e), limit=2000)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(bare_flags(sys.argv[1:] if argv is None else argv))
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
