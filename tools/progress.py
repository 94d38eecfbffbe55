"""Progress bars for the command line: tqdm on stderr, shown only to a person watching a terminal."""

from __future__ import annotations

import sys

from tqdm import tqdm


def progress_enabled(quiet: bool) -> bool:
    """Bars only when not ``--quiet`` and stderr is a terminal (no bar noise in logs or pipes)."""
    return not quiet and sys.stderr.isatty()


def bar(total: int, desc: str, enabled: bool, unit: str = "it") -> tqdm:
    """A tqdm bar on stderr that leaves no line behind; a silent no-op bar when ``enabled`` is False."""
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not enabled, leave=False,
                dynamic_ncols=True)
