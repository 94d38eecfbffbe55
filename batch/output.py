"""The output directory of a batch run: ``DIR/<id>.png`` written atomically, ``DIR/results.jsonl`` with one row
per job line, and what a resumed run needs to know.

A PNG is written to a temporary file in DIR (``.tritonsd-batch-<pid>-*.tmp``) and renamed into place, so a
killed run leaves no partial PNG; the temporaries of dead runs are removed when the next run starts. An id whose
PNG exists is done and skipped. ``results.jsonl`` is rewritten at the start of a run with the rows of the jobs
that are done (renumbered to the current file's lines), then appended to as results come in (flushed per row),
so after any run, finished or killed, it holds at most one row per line.
"""

from __future__ import annotations

import fcntl
import json
import os
import stat
import tempfile
from pathlib import Path

from tritonsd.escape import escape

RESULTS = "results.jsonl"
LOCK = ".tritonsd-batch.lock"
TEMP_PREFIX = ".tritonsd-batch-"


class OutputError(RuntimeError):
    """The output directory cannot be used (one line)."""


class OutputDir:
    """An output directory held for one run (an exclusive lock: two runs never write one directory)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"cannot create output directory {self.path}: {e.strerror or e}") from None
        if not self.path.is_dir():
            raise OutputError(f"output directory {self.path} is not a directory")
        try:
            self._lock = open(self.path / LOCK, "a")
        except OSError as e:
            raise OutputError(f"output directory {self.path} is not writable: {e.strerror or e}") from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise OutputError(f"another tritonsd batch run is writing to {self.path}") from None
        self._remove_stale_temporaries()
        self._results = None
        self.results_error = _not_regular(self.path / RESULTS)  # one line, or None: results.jsonl is usable

    def close(self) -> None:
        if self._results is not None:
            self._results.close()
            self._results = None
        self._lock.close()

    def __enter__(self) -> "OutputDir":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ resume

    def done_ids(self, ids) -> set[str]:
        """Those of ``ids`` whose PNG is already there (a regular file; ``is_file`` follows links)."""
        return {i for i in ids if (self.path / f"{i}.png").is_file()}

    def previous_rows(self) -> dict[str, dict]:
        """id -> the last successful row an earlier run wrote (unreadable lines are ignored). Only a regular
        file is read: a FIFO in its place would block the run forever."""
        rows: dict[str, dict] = {}
        path = self.path / RESULTS
        try:
            if self.results_error is not None or not stat.S_ISREG(path.stat().st_mode):  # links followed
                return rows
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return rows
        for line in text.splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if isinstance(row, dict) and isinstance(row.get("id"), str) and "file" in row:
                rows[row["id"]] = row
        return rows

    def start_results(self, kept_rows: list[dict]) -> None:
        """Rewrite ``results.jsonl`` (atomically) with ``kept_rows``, then keep it open for appending. When
        something other than a regular file holds its name (``results_error``), or it cannot be written, the
        run goes on without it (``results_error`` says why; the driver reports it as one error row)."""
        if self.results_error is not None:
            return
        body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept_rows).encode("utf-8")
        try:
            self._write_atomic(self.path / RESULTS, body)
            self._results = open(self.path / RESULTS, "a", encoding="utf-8")
        except OSError as e:
            self.results_error = f"{RESULTS} cannot be written ({e.strerror or e}); no results file this run"

    def add_row(self, row: dict) -> None:
        if self._results is None:
            return
        self._results.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._results.flush()

    # ------------------------------------------------------------ images

    def write_png(self, job_id: str, data: bytes) -> Path:
        """``DIR/<id>.png``, atomically; OutputError (one line) when something other than a regular file (a
        directory, a FIFO, a socket) holds the name, or the file cannot be written: that job's error."""
        path = self.path / f"{job_id}.png"
        blocked = _not_regular(path)
        if blocked is not None:
            raise OutputError(blocked)
        try:
            self._write_atomic(path, data)
        except OSError as e:
            raise OutputError(f"{escape(path.name)} cannot be written ({e.strerror or e})") from None
        return path

    def _write_atomic(self, path: Path, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", suffix=".tmp", dir=self.path)
        try:
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's file is private; outputs are not
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _remove_stale_temporaries(self) -> None:
        """Temporaries of runs that died (we hold the lock, so no live run owns one)."""
        for p in self.path.glob(f"{TEMP_PREFIX}*.tmp"):
            p.unlink(missing_ok=True)


def _not_regular(path: Path) -> str | None:
    """None when ``path`` is absent, a regular file or a link (replaced, not followed, by a rename); else one
    line naming what is there."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"{escape(path.name)} cannot be read ({e.strerror or e})"
    if stat.S_ISREG(mode) or stat.S_ISLNK(mode):
        return None
    kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
    return f"{escape(path.name)} is {kind}; it is left alone"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
