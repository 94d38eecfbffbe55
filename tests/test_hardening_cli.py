"""Issue 26 through the command line's doors: ``tritonsd generate`` / ``inspect`` / ``batch`` as subprocesses,
fed the files and flags the red team used. Each refusal is exit 1 (or 2) with one stderr line naming the file or
field; memory bounds are the child's own peak RSS (``VmHWM``, read inside the child: ``run_measured``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fuzz_inputs import safetensors_bytes
from measured import run_measured
from test_serve_hardening import LORA_MODULE, malformed_loras

CLI = [sys.executable, "-m", "tritonsd.tools.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
HANG_S = 600


def one_error_line(proc: subprocess.CompletedProcess, command: str, *words: str) -> str:
    assert proc.returncode in (1, 2), (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith(f"tritonsd {command}: error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert "\x1b" not in proc.stderr
    for w in words:
        assert w.lower() in lines[0].lower(), lines[0]
    return lines[0]


def tiny(fixtures: Path) -> list[str]:
    return ["--checkpoint", fixtures / "sd1-tiny.safetensors", "--config", fixtures / "sd1-tiny.yaml",
            "--text-heads", "2"]


SMALL = ["--width", "64", "--height", "64", "--steps", "2"]


# ---------------------------------------------------------------- generate: LoRA files, flags, prompts


@pytest.mark.parametrize("name", sorted(malformed_loras()))
def test_malformed_lora_is_one_line_naming_the_file(fixtures, tmp_path, name):
    """A LoRA with 0-dim factors printed a 36-line traceback; every malformed shape is one line now, and the
    1 GiB delta of the huge-product file is never computed."""
    path = tmp_path / f"{name}.safetensors"
    path.write_bytes(safetensors_bytes({f"{LORA_MODULE}.{k}": v for k, v in malformed_loras()[name].items()}))
    proc, peak = run_measured("generate", *tiny(fixtures), "--prompt", "x", *SMALL, "--lora", path,
                              "--out", tmp_path / "out")
    one_error_line(proc, "generate", name)
    assert peak < 1 << 30


@pytest.mark.parametrize("args, words", [
    (["--cfg", "1e30"], ["--cfg"]),
    (["--prompt", "(" * 3000 + "x"], ["nested"]),
    (["--prompt", "(x:" + "9" * 400 + ")"], ["emphasis"]),
    (["--prompt", "x <lora:a:1e38>"], ["multiplier"]),
])
def test_client_errors_are_one_line_before_loading(fixtures, tmp_path, args, words):
    base = ["--prompt", "x"] if "--prompt" not in args else []
    proc, _ = run_measured("generate", *tiny(fixtures), *base, *SMALL, *args, "--lora-dir", tmp_path,
                           "--out", tmp_path / "out")
    one_error_line(proc, "generate", *words)


# ---------------------------------------------------------------- YAML beside a checkpoint


@pytest.mark.parametrize("edit, words", [
    ("timesteps: 1.0e+11", ["timesteps"]),
    ("timesteps: 0", ["timesteps"]),
    ("timesteps: [1000]", ["timesteps"]),
    ("scale_factor: abc", ["scale_factor"]),
    ("linear_start: {a: 1}", ["linear_start"]),
])
def test_yaml_values_are_checked_by_name(fixtures, tmp_path, edit, words):
    """``timesteps: 1e11`` tried to allocate 800 GB; wrong types and ``timesteps: 0`` gave tracebacks."""
    key = edit.split(":")[0]
    text = (fixtures / "sd1-tiny.yaml").read_text()
    lines = [f"    {edit}" if line.strip().startswith(f"{key}:") and line.startswith("    " + key) else line
             for line in text.splitlines()]
    assert lines != text.splitlines(), key
    (tmp_path / "model.safetensors").symlink_to(fixtures / "sd1-tiny.safetensors")
    (tmp_path / "model.yaml").write_text("\n".join(lines) + "\n")
    proc, peak = run_measured("generate", "--checkpoint", tmp_path / "model.safetensors", "--text-heads", "2",
                              "--prompt", "x", *SMALL, "--out", tmp_path / "out")
    one_error_line(proc, "generate", "model.yaml", *words)
    assert peak < 2 << 30


def test_unknown_family_escapes_the_prefixes_it_lists(tmp_path):
    """A tensor name with a terminal escape sequence reached the terminal; one with newlines split the line."""
    path = tmp_path / "odd.safetensors"
    save_file({"\x1b[2Jwiped.weight": torch.ones(1), "a\nforged: line.weight": torch.ones(1)}, str(path))
    for command in ("generate", "inspect"):
        args = ["--checkpoint", path, "--prompt", "x", "--out", tmp_path / "out"] if command == "generate" else [path]
        proc, _ = run_measured(command, *args)
        line = one_error_line(proc, command, "unknown model family")
        assert "\\x1b[2J" in line and "\\x0aforged" in line


# ---------------------------------------------------------------- batch


def jobs_file(path: Path, *jobs: dict, raw: bytes = b"") -> Path:
    path.write_bytes(raw + b"".join(json.dumps(j).encode() + b"\n" for j in jobs))
    return path


def batch(fixtures, jobs: Path, out: Path, *extra, quiet: bool = True) -> tuple[subprocess.CompletedProcess, int]:
    return run_measured("batch", jobs, "--out", out, *tiny(fixtures), *(["--quiet"] if quiet else []), *extra)


JOB = {"prompt": "a fox", "width": 64, "height": 64, "steps": 2}


def test_a_long_job_line_is_not_read_whole(fixtures, tmp_path):
    """A 400 MB line was read whole before the 1 MiB check. The line here is sparse (no disk), 256 MB of NUL
    bytes without a newline: the run's peak RSS stays that of a run without it."""
    small, small_peak = batch(fixtures, jobs_file(tmp_path / "a.jsonl", {"id": "x", **JOB, "width": 3}),
                              tmp_path / "a")
    assert small.returncode == 1
    big = tmp_path / "b.jsonl"
    jobs_file(big, {"id": "x", **JOB, "width": 3})
    with open(big, "ab") as f:
        f.truncate(big.stat().st_size + (256 << 20))
    proc, peak = batch(fixtures, big, tmp_path / "b")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    rows = [json.loads(x) for x in (tmp_path / "b" / "results.jsonl").read_text().splitlines()]
    assert any("longer than 1 MiB" in r["error"] for r in rows)
    assert peak - small_peak < 64 << 20, (peak, small_peak)


def test_a_fifo_or_directory_in_the_output_is_one_error_row(fixtures, tmp_path):
    """A FIFO named results.jsonl hung the run; a directory named <id>.png aborted it."""
    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / "results.jsonl")
    (out / "blocked.png").mkdir()
    jobs = jobs_file(tmp_path / "jobs.jsonl", {"id": "fine", **JOB}, {"id": "blocked", **JOB})
    proc, _ = batch(fixtures, jobs, out, quiet=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert (out / "fine.png").is_file() and (out / "blocked.png").is_dir()
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("tritonsd batch: line")]
    assert len(errors) == 2, proc.stderr
    assert any("results.jsonl is a FIFO" in ln for ln in errors) and any("blocked.png is a directory" in ln
                                                                         for ln in errors)
    out2 = tmp_path / "out2"
    out2.mkdir()
    (out2 / "results.jsonl").mkdir()
    proc, _ = batch(fixtures, jobs_file(tmp_path / "j2.jsonl", {"id": "fine", **JOB}), out2, quiet=False)
    assert proc.returncode == 1 and (out2 / "fine.png").is_file()
    assert "results.jsonl is a directory" in proc.stderr


def test_a_jobs_loras_path_is_read_only_if_it_is_a_lora(fixtures, tmp_path):
    """No byte of a file that is not a LoRA reaches a message, however the job names it."""
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET-1234 " * 100)
    (tmp_path / "secret.safetensors").symlink_to(secret)
    (tmp_path / "digits.safetensors").write_bytes(b"99999999" + b"TOPSECRET-1234")
    jobs = jobs_file(tmp_path / "jobs.jsonl", *({"id": f"j{i}", **JOB, "loras": [name]} for i, name in enumerate(
        (str(secret), "secret.safetensors", "digits.safetensors", "/etc/passwd", "/dev/zero"))))
    proc, _ = batch(fixtures, jobs, tmp_path / "out", "--lora-dir", tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    results = (tmp_path / "out" / "results.jsonl").read_text()
    for text in (proc.stderr, results):
        assert "TOPSECRET" not in text and "root:" not in text and "9999" not in text
    assert len(results.splitlines()) == 5 and all("error" in json.loads(x) for x in results.splitlines())


def test_group_size_is_checked_against_memory_before_loading(fixtures, tmp_path):
    """--group-size 512 on one job took 1.8 GB (its batch is padded to the group size); now one line, before
    the model is loaded."""
    jobs = jobs_file(tmp_path / "jobs.jsonl", {"id": "one", "prompt": "x", "width": 512, "height": 512,
                                                "steps": 2})
    proc, peak = batch(fixtures, jobs, tmp_path / "out", "--group-size", "512")
    line = one_error_line(proc, "batch", "--group-size 512", "GiB")
    assert "use a smaller group size" in line
    assert not (tmp_path / "out" / "one.png").exists()
