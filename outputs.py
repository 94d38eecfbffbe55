"""Writing output files so that nothing half-written is ever left behind.

Every write goes to a hidden temporary file in the target's own directory, named
``.tritonsd-tmp-<pid>-<random>-<final name>``, is flushed and fsynced, and only then renamed (or hard-linked)
to its final name, so a reader sees either no file or the whole file. While a write is in flight SIGTERM and
SIGINT handlers remove the temporary file before the signal takes its usual course (the previous handlers are
restored when the last write finishes). SIGKILL cannot be caught: the temporary file of a killed writer stays,
and the next write into that directory (or an explicit ``remove_stale_temps``) removes it, because the pid in
its name no longer exists. A temporary file of a live process is never touched.

Numbered outputs (``00012-1234.png``, numbered like A1111) are claimed under an exclusive lock on the directory
with ``os.link``, which refuses an existing name, so concurrent writers into one directory never take the same
number (whatever follows it) or overwrite a file.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

TEMP_PREFIX = ".tritonsd-tmp-"
# ours, and the older ``.tritonsd-pending-<pid>-<i>.png`` of tools/generate.py
_TEMP_NAME = re.compile(r"^\.tritonsd-(?:tmp|pending)-(\d+)-")
NUMBERED = re.compile(r"^(\d+)-")  # A1111's output names: a number, a dash, the rest

_lock = threading.RLock()  # re-entrant: the signal handler runs in the main thread, which may hold it
_dir_lock = threading.Lock()
_in_flight: set[Path] = set()  # temporary files this process is writing now
_previous_handlers: dict[int, object] = {}
_cleaned_dirs: set[Path] = set()  # directories whose stale temporaries this process has removed already


def temp_path(target: Path) -> Path:
    """The hidden temporary file a write of ``target`` goes through (this process's pid, a random part, and the
    final name cut to 100 characters so the whole stays within the usual 255-byte name limit)."""
    return target.parent / f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-{target.name[:100]}"


@contextlib.contextmanager
def atomic_file(path: str | Path, overwrite: bool = True) -> Iterator[BinaryIO]:
    """``with atomic_file(path) as f: f.write(...)``: ``path`` appears, complete and fsynced, when the block ends
    without an exception; on an exception or a SIGTERM/SIGINT nothing is left. ``overwrite=False`` raises
    ``FileExistsError`` (leaving the existing file alone) if ``path`` exists by then."""
    path = Path(path)
    remove_stale_temps_once(path.parent)
    with _temp_file(path) as (tmp, f):
        yield f
        _finish(f)
        if overwrite:
            os.replace(tmp, path)
        else:
            _link_or_refuse(tmp, path)
        _fsync_dir(path.parent)


def atomic_write(path: str | Path, write_fn: Callable[[BinaryIO], object], overwrite: bool = True) -> Path:
    """Write ``path`` atomically: ``write_fn(f)`` writes the content to the binary file object ``f``."""
    with atomic_file(path, overwrite=overwrite) as f:
        write_fn(f)
    return Path(path)


def write_numbered(directory: str | Path, make_name: Callable[[int], str], write_fn: Callable[[BinaryIO], object],
                   start: int | None = None) -> Path:
    """Write a new file in ``directory`` under the first free number: ``make_name(n)`` gives the name for number
    ``n`` (e.g. ``lambda n: f"{n:05d}-{seed}.png"``); numbering starts after the highest ``NNNNN-`` name there
    (or at ``start``). The content is complete before the name appears; concurrent writers never collide."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    remove_stale_temps_once(directory)
    with _temp_file(directory / make_name(0)) as (tmp, f):
        write_fn(f)
        _finish(f)
        final = claim_numbered(directory, make_name, tmp, start)
        _fsync_dir(directory)
    return final


def claim_numbered(directory: Path, make_name: Callable[[int], str], source: Path, start: int | None = None) -> Path:
    """Give the finished file ``source`` (in ``directory``) the first free number and return its new path;
    ``source`` itself stays (the caller removes it). A number is free when no name in ``directory`` starts with
    it (``00012-1.png`` takes 12 for ``00012-2.png`` too); numbering starts one past the highest number there,
    or at the first free one from ``start``. Concurrent writers are serialised by an exclusive ``flock`` on the
    directory while they pick and link, and the hard link refuses an existing name in any case. On a file
    system without hard links the name is reserved with O_EXCL and the file renamed over the reservation."""
    with _directory_lock(directory):
        taken = _numbers(directory)
        number = max(taken, default=-1) + 1 if start is None else start
        while True:
            while number in taken:
                number += 1
            target = directory / make_name(number)
            try:
                os.link(source, target)
                return target
            except FileExistsError:
                taken.add(number)
            except OSError:  # no hard links here (some network and FAT file systems)
                try:
                    os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
                except FileExistsError:
                    taken.add(number)
                    continue
                os.replace(source, target)
                return target


def _numbers(directory: Path) -> set[int]:
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return set()
    return {int(m.group(1)) for name in names if (m := NUMBERED.match(name))}


@contextlib.contextmanager
def _directory_lock(directory: Path) -> Iterator[None]:
    """An exclusive advisory lock on the directory itself (no lock file is left behind); a no-op where flock is
    missing or refused (the hard link still prevents overwriting, though not a shared number)."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    with _dir_lock:  # threads of this process take turns too (flock is per open file: belt and braces)
        try:
            fd = os.open(directory, os.O_RDONLY)
        except OSError:
            yield
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:
                pass
            yield
        finally:
            os.close(fd)


def next_number(directory: Path) -> int:
    """One past the highest ``NNNNN-`` number among the names in ``directory`` (0 when there is none)."""
    return max(_numbers(directory), default=-1) + 1


def remove_stale_temps(directory: str | Path) -> list[Path]:
    """Remove the temporary files in ``directory`` left by writers that no longer exist (killed, crashed); keep
    those of every live process, this one included. Returns what was removed."""
    directory = Path(directory)
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    removed = []
    for name in names:
        m = _TEMP_NAME.match(name)
        if m and not _process_exists(int(m.group(1))):
            with contextlib.suppress(FileNotFoundError):  # another run may be removing it at the same moment
                (directory / name).unlink()
                removed.append(directory / name)
    return removed


def remove_stale_temps_once(directory: Path) -> None:
    """``remove_stale_temps`` the first time this process writes into ``directory``."""
    key = Path(os.path.abspath(directory))
    if key not in _cleaned_dirs:
        _cleaned_dirs.add(key)
        remove_stale_temps(directory)


def _process_exists(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's live process (or a pid we cannot test): leave its file alone
    return True


@contextlib.contextmanager
def _temp_file(target: Path) -> Iterator[tuple[Path, BinaryIO]]:
    """Create the temporary file for ``target`` and register it for the signal handlers; remove it on the way
    out, whatever happens (after a successful rename it is gone already)."""
    tmp = temp_path(target)
    _register(tmp)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        with os.fdopen(fd, "wb") as f:
            yield tmp, f
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        _unregister(tmp)


def _finish(f: BinaryIO) -> None:
    f.flush()
    os.fsync(f.fileno())


def _link_or_refuse(tmp: Path, path: Path) -> None:
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # no hard links: check, then rename (not atomic against a concurrent writer of the same name)
        if path.exists():
            raise FileExistsError(f"{path} exists") from None
        os.replace(tmp, path)


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable (not possible on every platform; the rename itself is atomic regardless)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------------------
# Signal handlers: installed while at least one write is in flight (main thread only: Python delivers signals
# there), they remove every in-flight temporary file and then let the signal do what it did before.

_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGINT", None)) if s is not None)


def _register(tmp: Path) -> None:
    with _lock:
        first = not _in_flight
        _in_flight.add(tmp)
    if first and threading.current_thread() is threading.main_thread():
        for sig in _SIGNALS:
            _previous_handlers[sig] = signal.signal(sig, _on_signal)


def _unregister(tmp: Path) -> None:
    with _lock:
        _in_flight.discard(tmp)
        last = not _in_flight
    if last and threading.current_thread() is threading.main_thread():
        _restore_handlers()


def _restore_handlers() -> None:
    for sig, previous in list(_previous_handlers.items()):
        signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        del _previous_handlers[sig]


def _on_signal(signum: int, frame) -> None:
    with _lock:
        for tmp in list(_in_flight):
            with contextlib.suppress(OSError):
                tmp.unlink()
    previous = _previous_handlers.get(signum, signal.SIG_DFL)
    if callable(previous):  # e.g. Python's SIGINT handler: KeyboardInterrupt unwinds through the writers
        previous(signum, frame)
    elif previous != signal.SIG_IGN:  # the default action (terminate): restore it and deliver the signal again
        _restore_handlers()
        os.kill(os.getpid(), signum)
