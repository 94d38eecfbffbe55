"""tritonsd.outputs: atomic writes, no partial or temporary file after a kill, stale temporaries of dead writers
removed by the next run (never a live writer's), collision-free numbering under concurrent writers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from tritonsd import outputs as files

# A child that writes DIR/NAME through files.atomic_write (or write_numbered), and in the middle of writing
# creates READY and sleeps: the parent kills it there, in the write phase.
_CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from tritonsd import outputs as files
    out, ready, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]

    def write(f):
        f.write(b"partial" * 1000)
        f.flush()
        ready.write_text("now")
        time.sleep(60)
        f.write(b"end")

    if mode == "numbered":
        files.write_numbered(out, lambda n: f"{n:05d}-7.png", write)
    else:
        files.atomic_write(out / "image.png", write)
""")


def _default_sigint() -> None:
    """A child as a terminal starts it: SIGINT at its default, even where the test run inherited it ignored (a
    shell's background job: Python then installs no KeyboardInterrupt handler, and a writer rightly ignores it)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(out: Path, ready: Path, mode: str = "single") -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(out), str(ready), mode],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_default_sigint)
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None, proc.communicate()[1].decode()
        assert time.monotonic() < deadline, "the child never reached its write phase"
        time.sleep(0.02)
    return proc


def _temps(directory: Path) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.startswith(".tritonsd-"))


def _next_run(out: Path) -> Path:
    """Another process writing into the same directory (the 'next run')."""
    code = ("import sys; from tritonsd import outputs as files; "
            "print(files.write_numbered(sys.argv[1], lambda n: f'{n:05d}-1.png', lambda f: f.write(b'ok')))")
    proc = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return Path(proc.stdout.strip())


# --------------------------------------------------------------------------------------------------------------
# In process


def test_atomic_write_replaces_whole_and_leaves_no_temp(tmp_path):
    target = tmp_path / "merged.safetensors"
    assert files.atomic_write(target, lambda f: f.write(b"first")) == target
    files.atomic_write(target, lambda f: f.write(b"second version"))
    assert target.read_bytes() == b"second version"
    assert _temps(tmp_path) == []
    assert (target.stat().st_mode & 0o777) == 0o666 & ~_umask()  # a normal file, not mkstemp's 0600


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "out.png"

    def boom(f):
        f.write(b"half")
        raise RuntimeError("encoder failed")

    with pytest.raises(RuntimeError, match="encoder failed"):
        files.atomic_write(target, boom)
    assert os.listdir(tmp_path) == []
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        files.atomic_write(target, boom)
    assert target.read_bytes() == b"old" and _temps(tmp_path) == []


def test_no_overwrite_keeps_the_existing_file(tmp_path):
    target = tmp_path / "a.png"
    target.write_bytes(b"mine")
    with pytest.raises(FileExistsError):
        files.atomic_write(target, lambda f: f.write(b"theirs"), overwrite=False)
    assert target.read_bytes() == b"mine" and _temps(tmp_path) == []


def test_context_manager_form(tmp_path):
    with files.atomic_file(tmp_path / "x.bin") as f:
        f.write(b"abc")
        assert not (tmp_path / "x.bin").exists()  # not visible until the block ends
        assert len(_temps(tmp_path)) == 1 and _temps(tmp_path)[0].startswith(f".tritonsd-tmp-{os.getpid()}-")
    assert (tmp_path / "x.bin").read_bytes() == b"abc"


def test_signal_handlers_installed_only_while_writing(tmp_path):
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    during = {}

    def write(f):
        during.update({s: signal.getsignal(s) for s in before})
        f.write(b"x")

    files.atomic_write(tmp_path / "a", write)
    assert all(h is not before[s] for s, h in during.items())
    assert {s: signal.getsignal(s) for s in before} == before


def test_sigint_in_process_removes_the_temp(tmp_path):
    # Python's own SIGINT handler, as in a foreground process (a background job's test run has SIGINT ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)

    def write(f):
        f.write(b"x")
        os.kill(os.getpid(), signal.SIGINT)  # Python's handler raises KeyboardInterrupt after ours ran
        time.sleep(5)

    try:
        with pytest.raises(KeyboardInterrupt):
            files.atomic_write(tmp_path / "a.png", write)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert os.listdir(tmp_path) == []


def test_numbering_continues_after_existing_files(tmp_path):
    (tmp_path / "00007-123.png").write_bytes(b"old")
    (tmp_path / "notes.txt").write_text("not numbered")
    path = files.write_numbered(tmp_path, lambda n: f"{n:05d}-9.png", lambda f: f.write(b"new"))
    assert path.name == "00008-9.png" and path.read_bytes() == b"new"
    assert (tmp_path / "00007-123.png").read_bytes() == b"old" and _temps(tmp_path) == []


def test_numbering_skips_a_taken_name(tmp_path):
    (tmp_path / "00000-1.png").write_bytes(b"taken")
    path = files.write_numbered(tmp_path, lambda n: f"{n:05d}-1.png", lambda f: f.write(b"new"), start=0)
    assert path.name == "00001-1.png" and (tmp_path / "00000-1.png").read_bytes() == b"taken"


def test_concurrent_threads_never_share_a_number(tmp_path):
    results: list[Path] = []

    def worker(w: int) -> None:
        for i in range(5):
            results.append(files.write_numbered(tmp_path, lambda n: f"{n:05d}-{w}.png",
                                                lambda f, w=w, i=i: f.write(f"{w}:{i}".encode() * 100)))

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    numbers = sorted(int(p.name[:5]) for p in results)
    assert numbers == list(range(30))
    assert sorted(p.read_bytes() for p in results) == sorted(f"{w}:{i}".encode() * 100 for w in range(6)
                                                             for i in range(5))
    assert _temps(tmp_path) == []


# --------------------------------------------------------------------------------------------------------------
# Other processes: kills during the write phase, concurrent runs


@pytest.mark.parametrize("mode", ["single", "numbered"])
def test_sigterm_during_write_leaves_nothing(tmp_path, mode):
    out = tmp_path / "out"
    out.mkdir()
    proc = _start(out, tmp_path / "ready", mode)
    assert len(_temps(out)) == 1  # the write phase: the temporary file exists
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == -signal.SIGTERM  # the default action still happens, after the cleanup
    assert os.listdir(out) == []


def test_sigint_to_a_child_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    proc = _start(out, tmp_path / "ready")
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)
    assert os.listdir(out) == []


@pytest.mark.parametrize("mode", ["single", "numbered"])
def test_sigkill_leaves_a_stale_temp_that_the_next_run_removes(tmp_path, mode):
    out = tmp_path / "out"
    out.mkdir()
    (out / "00003-5.png").write_bytes(b"an earlier image")
    proc = _start(out, tmp_path / "ready", mode)
    proc.kill()
    assert proc.wait(timeout=30) == -signal.SIGKILL
    stale = _temps(out)
    assert len(stale) == 1 and stale[0].startswith(f".tritonsd-tmp-{proc.pid}-")  # cannot be caught ...
    assert not (out / "image.png").exists()
    written = _next_run(out)  # ... and the next run removes it
    assert sorted(os.listdir(out)) == ["00003-5.png", "00004-1.png"] and written.name == "00004-1.png"
    assert (out / "00003-5.png").read_bytes() == b"an earlier image"


def test_a_live_writers_temp_is_never_removed(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    proc = _start(out, tmp_path / "ready")
    try:
        live = _temps(out)
        assert files.remove_stale_temps(out) == []
        _next_run(out)  # a concurrent run writing into the same directory
        assert set(live) <= set(_temps(out))
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert [p.name for p in files.remove_stale_temps(out)] == live
    assert _temps(out) == []


def test_stale_temps_of_the_older_pending_scheme_and_foreign_names(tmp_path):
    dead = _dead_pid()
    names = [f".tritonsd-tmp-{dead}-abcd-x.png", f".tritonsd-pending-{dead}-0.png",
             f".tritonsd-tmp-{os.getpid()}-beef-mine.png", ".tritonsd-tmp-notapid-x.png", "00001-2.png",
             f".other-{dead}-x"]
    for n in names:
        (tmp_path / n).write_bytes(b"x")
    removed = sorted(p.name for p in files.remove_stale_temps(tmp_path))
    assert removed == sorted(names[:2])
    assert sorted(os.listdir(tmp_path)) == sorted(names[2:])


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_concurrent_processes_number_without_collisions(tmp_path):
    out, go = tmp_path / "out", tmp_path / "go"
    code = textwrap.dedent("""
        import sys, time
        from pathlib import Path
        from tritonsd import outputs as files
        out, go, w = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
        while not go.exists():
            time.sleep(0.005)
        for i in range(8):
            files.write_numbered(out, lambda n: f"{n:05d}-{w}.png", lambda f: f.write(f"{w}:{i}".encode() * 500))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(out), str(go), str(w)], stderr=subprocess.PIPE)
             for w in range(4)]
    time.sleep(1.0)  # let them all start and wait on the go file
    go.write_text("go")
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read().decode()
    names = sorted(os.listdir(out))
    assert [int(n[:5]) for n in names] == list(range(32))
    contents = sorted((out / n).read_bytes() for n in names)
    assert contents == sorted(f"{w}:{i}".encode() * 500 for w in range(4) for i in range(8))
    for n in names:  # each file's name carries its writer, and holds that writer's content
        assert (out / n).read_bytes().startswith(n.split("-")[1].split(".")[0].encode() + b":")


def test_a_long_final_name_still_fits(tmp_path):
    target = tmp_path / ("n" * 250 + ".png")  # 254 bytes: the temporary name must not grow past the limit
    files.atomic_write(target, lambda f: f.write(b"x"))
    assert target.read_bytes() == b"x" and _temps(tmp_path) == []
