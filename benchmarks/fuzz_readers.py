"""The readers' long fuzz run: the checkpoint readers (issue 16, ``--suite checkpoints``, the default) or the
readers issue 26 hardened (``--suite inputs``: LoRA files, embeddings, YAML beside a checkpoint, PNG infotext;
tests/fuzz_inputs.py), and an atheris entry point for the checkpoint readers.

``run``: N generated inputs (structure-aware mutations of the fixtures, tests/fuzz_mutations.py; case i is
drawn from ``random.Random(i)``, so any case is reproducible alone) go through long-lived worker processes
under a watchdog: a case that takes more than ``--hang`` seconds of the worker's CPU time (10), or
``--wall-cap`` seconds of wall time (60), is a hang (the worker is killed and replaced; cases over 10 s of wall
time are counted too); a worker that dies is a crash; an exception other than our CheckpointError, a multi-line
or unescaped message, a changed input or readers that disagree is an escape. Each worker reports its peak RSS
after every case; the record keeps the largest rise over the worker's warmed-up baseline next to the file's
size. The counts go to a JSON file with the command that reproduces them::

    nice -n 19 python benchmarks/fuzz_readers.py run --cases 20000 --workers 1 --out benchmarks/results/fuzz-readers.json
    nice -n 19 python benchmarks/fuzz_readers.py --suite inputs run --cases 20000 --workers 1 \
        --out benchmarks/results/fuzz-inputs.json

``case I``: rebuild case I, print what it is and check it in this process (for a failure from the record).

``atheris [libFuzzer flags]``: the same mutators driven by atheris' coverage-guided bytes (atheris is optional,
``pip install atheris``; not a dependency).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import select
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import fuzz_mutations as fm  # noqa: E402  (lives with the tests; shared by the Hypothesis test)
from tritonsd.bench import environment  # noqa: E402


def _fixtures(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    from tritonsd.testing.reference import fixtures_dir

    return fixtures_dir()


class CheckpointSuite:
    """Issue 16's: mutated checkpoints through read_checkpoint and read_checkpoint_shapes."""

    name = "checkpoints"
    classes = fm.CLASSES
    seed_names = ["sd1-tiny.safetensors", "sd1-tiny.ckpt", "sd1-tiny.ckpt re-saved in torch's legacy format"]

    def __init__(self, fixtures: Path) -> None:
        self.seeds = fm.Seeds.load(fixtures)

    def warm(self, tmp: Path) -> None:
        for name, blob in (("w.safetensors", fm.safetensors_file(self.seeds.safetensors.header,
                                                                  self.seeds.safetensors.data)),
                           ("w.ckpt", fm.zip_file(self.seeds.zip.members)), ("l.ckpt", self.seeds.legacy.blob)):
            (tmp / name).write_bytes(blob)
            fm.check_outcome(tmp / name, time_limit=600)
            (tmp / name).unlink()

    def case(self, i: int):
        return fm.make_case(self.seeds, fm.RandomDraw(i))

    def check(self, case, path: Path):
        return fm.check_outcome(path, time_limit=1e9)  # the parent's watchdog times it

    def largest_seed(self) -> int:
        return max(len(b) for b in self.seeds.blobs.values())


class InputSuite:
    """Issue 26's: mutated LoRA files, embeddings, YAML configs and PNG infotexts (tests/fuzz_inputs.py)."""

    name = "inputs"
    seed_names = ["lora-sd1-tiny.safetensors", "embeddings/*", "sd1-tiny.yaml", "a PNG with an infotext chunk"]

    def __init__(self, fixtures: Path) -> None:
        import fuzz_inputs as fi

        self.fi = fi
        self.classes = fi.CLASSES
        self.seeds = fi.InputSeeds.load(fixtures)

    def warm(self, tmp: Path) -> None:
        for i in range(8):  # one of each class at least, so the baseline holds the imports and the first loads
            case = self.case(10_000_000 + i)
            path = tmp / f"w{case.suffix}"
            path.write_bytes(case.data)
            try:
                self.check(case, path)
            except Exception:  # noqa: BLE001 - warming only
                pass
            path.unlink()

    def case(self, i: int):
        return self.fi.make_case(self.seeds, fm.RandomDraw(i))

    def check(self, case, path: Path):
        return self.fi.check_case(case, path, self.seeds)

    def largest_seed(self) -> int:
        return max([len(b) for b in self.seeds.embeddings.values()] + [110220, len(self.seeds.png)])


SUITES = {"checkpoints": CheckpointSuite, "inputs": InputSuite}


# ---------------------------------------------------------------------------------------------------------------
# Worker: reads case numbers on stdin, answers one JSON line per case


def worker(fixtures: Path, suite_name: str = "checkpoints") -> None:
    suite = SUITES[suite_name](fixtures)
    tmp = Path(tempfile.mkdtemp(prefix="tritonsd-fuzz-"))
    suite.warm(tmp)  # so the baseline holds torch's own one-time allocations
    _answer({"ready": True, "maxrss_kb": _maxrss_kb()})
    for line in sys.stdin:
        i = int(line)
        case = suite.case(i)
        path = tmp / f"case{case.suffix}"
        path.write_bytes(case.data)
        _answer({"started": i})  # the watchdog times the readers from here, not the building of the case
        report = {"case": i, "cls": case.cls, "what": case.what[:120], "bytes": len(case.data)}
        try:
            outcome = suite.check(case, path)
            report.update(result=outcome.result, seconds=round(outcome.seconds, 4))
        except AssertionError as e:
            report.update(result="escaped", error=f"property: {str(e)[:300]}")
        except Exception as e:  # noqa: BLE001 - exactly what the run is looking for: a foreign exception
            report.update(result="escaped", error=f"{type(e).__name__}: {str(e)[:300]}")
        finally:
            path.unlink(missing_ok=True)
        report["maxrss_kb"] = _maxrss_kb()
        _answer(report)


def _answer(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _maxrss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


# ---------------------------------------------------------------------------------------------------------------
# Driver


class Worker:
    def __init__(self, fixtures: Path, suite: str = "checkpoints") -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--suite", suite, "worker", "--fixtures",
                                      str(fixtures)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.fd, self.pending = self.proc.stdout.fileno(), b""
        ready = self.read(600)
        if not ready or not ready.get("ready"):
            raise RuntimeError("a fuzz worker failed to start")
        self.baseline_kb = ready["maxrss_kb"]

    def send(self, i: int) -> None:
        self.proc.stdin.write(f"{i}\n")
        self.proc.stdin.flush()

    def read(self, timeout: float) -> dict | None:
        """The next answer, or None on a timeout or a dead worker. Lines are split here from raw reads: a
        buffered reader could hold a second line that select() no longer sees."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.pending:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                return None
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:  # the worker died
                return None
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return json.loads(line)

    def cpu_seconds(self) -> float:
        """The worker's CPU time so far (user + system, from /proc; wall time where that is missing)."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return time.monotonic()

    def await_report(self, hang: float, wall_cap: float) -> dict | None:
        """The case's report, or None for a hang: more than ``hang`` seconds of the worker's CPU time, or
        ``wall_cap`` seconds of wall time. CPU time, not wall time, is the watchdog's measure because the run
        is niced on a shared machine, where a worker can wait seconds for a core without doing anything."""
        cpu0, wall0 = self.cpu_seconds(), time.monotonic()
        while True:
            report = self.read(min(hang, 1.0))
            if report is not None or self.proc.poll() is not None:
                return report
            if self.cpu_seconds() - cpu0 > hang or time.monotonic() - wall0 > wall_cap:
                return None

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def run(args: argparse.Namespace) -> int:
    fixtures = _fixtures(args.fixtures)
    suite = SUITES[args.suite](fixtures)
    workers = [Worker(fixtures, args.suite) for _ in range(args.workers)]
    counts: Counter[str] = Counter()
    by_class: dict[str, Counter[str]] = {c: Counter() for c in suite.classes}
    failures: list[dict] = []
    worst = {"seconds": 0.0, "rss_rise_mb": 0.0}
    memory_over = slow_wall = 0
    slowest: list[dict] = []  # the ten slowest cases (wall time in the readers)
    start = time.monotonic()
    pending: dict[int, int] = {}  # worker index -> case in flight
    next_case, done, end = args.start, 0, args.start + args.cases
    while done < args.cases:
        for w, wk in enumerate(workers):
            if w not in pending and next_case < end:
                wk.send(next_case)
                pending[w] = next_case
                next_case += 1
        for w in list(pending):
            wk, i = workers[w], pending[w]
            started = wk.read(args.build_timeout)
            built = started is not None and started.get("started") == i
            report = wk.await_report(args.hang, args.wall_cap) if built else None
            if report is None:  # a hang (no answer in time), a crash (the worker died), a slow generator
                kind = "crash" if wk.proc.poll() is not None else "hang" if built else "build_timeout"
                wk.kill()
                counts[kind] += 1
                failures.append({"case": i, "result": kind})
                print(f"case {i}: {kind}", file=sys.stderr, flush=True)
                workers[w] = Worker(fixtures, args.suite)
            else:
                result = report["result"]
                counts[result] += 1
                by_class[report["cls"]][result] += 1
                rise_mb = (report["maxrss_kb"] - wk.baseline_kb) / 1024
                if rise_mb * 2**20 > 2**30 + report["bytes"]:
                    memory_over += 1
                    failures.append({**report, "result": "memory"})
                if result == "escaped":
                    failures.append(report)
                    print(f"case {i}: escaped: {report.get('error')}", file=sys.stderr, flush=True)
                worst["seconds"] = max(worst["seconds"], report.get("seconds", 0.0))
                slowest.append({k: report.get(k) for k in ("case", "cls", "what", "bytes", "seconds")})
                slowest.sort(key=lambda r: -(r["seconds"] or 0.0))
                del slowest[10:]
                slow_wall += report.get("seconds", 0.0) > 10
                worst["rss_rise_mb"] = max(worst["rss_rise_mb"], round(rise_mb, 1))
            del pending[w]
            done += 1
            if done % 500 == 0:
                print(f"{done}/{args.cases} cases, {dict(counts)}, {time.monotonic() - start:.0f} s", flush=True)
    for wk in workers:
        wk.kill()
    record = {
        "command": " ".join(["python", "benchmarks/fuzz_readers.py", "--suite", args.suite, "run", "--cases",
                             str(args.cases), "--start",
                             str(args.start), "--workers", str(args.workers), "--hang", str(args.hang),
                             "--wall-cap", str(args.wall_cap)]),
        "run_as": "PYTHONPATH=<checkout>/.pp OMP_NUM_THREADS=1 nice -n 19 <command> --out <this file>",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": environment.git_commit()[0] or "unknown",
        "python": platform.python_version(), "torch": _torch_version(), "machine": platform.machine(),
        "suite": args.suite, "seeds": suite.seed_names,
        "cases": args.cases, "first_case": args.start,
        "outcomes": dict(counts),
        "by_class": {c: dict(v) for c, v in by_class.items()},
        "escaped": counts["escaped"], "hangs_over_limit": counts["hang"], "crashes": counts["crash"],
        "hang_limit_cpu_s": args.hang, "hang_limit_wall_s": args.wall_cap,
        "slowest_case_wall_s": round(worst["seconds"], 3), "cases_over_10s_wall": slow_wall,
        "slowest_cases": slowest,
        "peak_rss_rise_mb": worst["rss_rise_mb"], "peak_rss_rise_over_1gb_plus_file": memory_over,
        "largest_seed_bytes": suite.largest_seed(),
        "failures": failures[:50],
        "elapsed_s": round(time.monotonic() - start, 1),
    }
    text = json.dumps(record, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0 if not failures else 1



def _torch_version() -> str:
    import torch

    return torch.__version__


def one_case(args: argparse.Namespace) -> int:
    suite = SUITES[args.suite](_fixtures(args.fixtures))
    case = suite.case(args.number)
    print(f"case {args.number}: {case.cls}: {case.what} ({len(case.data)} bytes)")
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"case{case.suffix}"
        path.write_bytes(case.data)
        if args.keep:
            Path(args.keep).write_bytes(case.data)
        outcome = suite.check(case, path)
    print(f"{outcome.result} in {outcome.seconds:.3f} s {outcome.message}")
    return 0


def atheris_main(argv: list[str], fixtures: Path) -> None:
    import atheris  # optional

    seeds = fm.Seeds.load(fixtures)
    tmp = Path(tempfile.mkdtemp(prefix="tritonsd-atheris-"))

    def test_one(data: bytes) -> None:
        case = fm.make_case(seeds, fm.AtherisDraw(atheris.FuzzedDataProvider(data)))
        path = tmp / f"case{case.suffix}"
        path.write_bytes(case.data)
        try:
            fm.check_outcome(path)  # AssertionError or a foreign exception: atheris reports the input
        finally:
            path.unlink(missing_ok=True)

    atheris.Setup([sys.argv[0], *argv], test_one)
    atheris.Fuzz()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixtures", default=None, help="the fixtures directory (default: the project's)")
    parser.add_argument("--suite", choices=sorted(SUITES), default="checkpoints",
                        help="which readers: checkpoints (issue 16) or inputs (issue 26)")
    sub = parser.add_subparsers(dest="mode", required=True)
    r = sub.add_parser("run", help="the long run")
    r.add_argument("--cases", type=int, default=20_000)
    r.add_argument("--start", type=int, default=0, help="the first case number")
    r.add_argument("--workers", type=int, default=1)
    r.add_argument("--hang", type=float, default=10.0,
                   help="CPU seconds in the readers that count as a hang")
    r.add_argument("--wall-cap", type=float, default=60.0, help="wall seconds that count as a hang regardless")
    r.add_argument("--build-timeout", type=float, default=120.0, help="seconds allowed for building a case")
    r.add_argument("--out", default=None, help="write the record here (JSON)")
    c = sub.add_parser("case", help="rebuild and check one case")
    c.add_argument("number", type=int)
    c.add_argument("--keep", default=None, help="also write the case's file here")
    w = sub.add_parser("worker")
    w.add_argument("--fixtures", dest="worker_fixtures", default=None)
    sub.add_parser("atheris", help="coverage-guided fuzzing (needs atheris); libFuzzer flags follow")
    args, rest = parser.parse_known_args(argv)
    if args.mode == "worker":
        worker(_fixtures(args.worker_fixtures or args.fixtures), args.suite)
        return 0
    if args.mode == "atheris":
        atheris_main(rest, _fixtures(args.fixtures))
        return 0
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return run(args) if args.mode == "run" else one_case(args)


if __name__ == "__main__":
    sys.exit(main())
