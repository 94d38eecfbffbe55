"""Issue 28, "One product, whichever door": one test (or more) per point of the report, through the door where
it was found. Points 2 and 4's server halves live in ``test_serve_api.py`` (they need its server)."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tritonsd
from tritonsd.tools.cli import build_parser, main

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SMALL = ["--width", "64", "--height", "64", "--steps", "2", "--device", "cpu", "--quiet"]


def cli(*args, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tritonsd.tools.cli", *map(str, args)], capture_output=True,
                          text=True, env=ENV, timeout=timeout, cwd=str(ROOT))


def sd1(fixtures) -> list[str]:
    return ["--checkpoint", str(fixtures / "sd1-tiny.safetensors"), "--text-heads", "2"]


def written(capsys) -> list[Path]:
    return [Path(line) for line in capsys.readouterr().out.split()]


# ---------------------------------------------------------------- 1. a --lora image reproduces itself


def test_lora_png_reproduces_itself_from_png(fixtures, tmp_path, capsys):
    lora = fixtures / "lora-sd1-tiny.safetensors"
    assert main(["generate", *sd1(fixtures), "--prompt", "a fox", "--seed", "5", "--lora", f"{lora}:0.8", *SMALL,
                 "--out", str(tmp_path / "a")]) == 0
    [first] = written(capsys)
    text = Image.open(first).info["parameters"]
    assert text.splitlines()[0] == "a fox <lora:lora-sd1-tiny:0.8>"
    assert 'Lora hashes: "lora-sd1-tiny: 3718a40f15e6"' in text

    assert main(["generate", *sd1(fixtures), "--from-png", str(first), "--lora-dir", str(fixtures), "--device", "cpu",
                 "--quiet", "--out", str(tmp_path / "b")]) == 0
    [again] = written(capsys)
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(first)))
    assert Image.open(again).info["parameters"] == text

    # the same without the LoRA differs: the test above is not comparing two LoRA-less images
    assert main(["generate", *sd1(fixtures), "--prompt", "a fox", "--seed", "5", *SMALL,
                 "--out", str(tmp_path / "c")]) == 0
    [plain] = written(capsys)
    assert not np.array_equal(np.asarray(Image.open(plain)), np.asarray(Image.open(first)))

    # without the folder: one line naming the LoRA and its hash, nothing written
    assert main(["generate", *sd1(fixtures), "--from-png", str(first), "--device", "cpu", "--quiet",
                 "--out", str(tmp_path / "d")]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "LoRA lora-sd1-tiny (hash 3718a40f15e6)" in err and "--lora-dir" in err
    assert not (tmp_path / "d").exists()


def test_lora_tag_with_two_weights_and_missing_embedding(fixtures, tmp_path):
    pipe = tritonsd.load(fixtures / "sd1-tiny.safetensors", device="cpu", text_heads=2)
    pipe.set_loras([(fixtures / "lora-sd1-tiny.safetensors", 0.5, 1.25)])
    [image] = pipe("a", seed=1, steps=1, width=64, height=64)
    assert image.info["parameters"].splitlines()[0] == "a <lora:lora-sd1-tiny:0.5:1.25>"
    text = "x\nSteps: 2, Seed: 1, Size: 64x64, TI hashes: \"wrongname: 0123456789ab\""
    with pytest.raises(ValueError, match=r"embedding wrongname \(hash 0123456789ab\)"):
        pipe.from_infotext(text)


# ---------------------------------------------------------------- 2. what is not implemented is refused


def test_cli_infotext_asking_for_face_restoration_is_bad_usage(fixtures, tmp_path, capsys):
    text = "a fox\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64, Face restoration: CodeFormer"
    assert main(["generate", *sd1(fixtures), "--infotext", text, "--device", "cpu", "--quiet",
                 "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Face restoration" in err and "--ignore-unsupported" in err
    assert main(["generate", *sd1(fixtures), "--infotext", text, "--ignore-unsupported", "--device", "cpu",
                 "--quiet", "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "ignored (not implemented): Face restoration" in captured.err and len(captured.out.split()) == 1


# ---------------------------------------------------------------- 3. inspect explains what it cannot know


@pytest.mark.parametrize("name", ["sd1-tiny", "sdxl-tiny"])
def test_inspect_reports_unknown_text_heads(fixtures, capsys, name):
    assert main(["inspect", str(fixtures / f"{name}.safetensors")]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.strip().startswith("text heads") and "unknown" in line)
    assert "give --text-heads" in row
    assert "text heads are not in the weights" in out  # the reason, in its own row
    # with the head count given, no unknown is left
    assert main(["inspect", str(fixtures / f"{name}.safetensors"), "--text-heads", "2"]) == 0
    assert "unknown" not in capsys.readouterr().out


# ---------------------------------------------------------------- 5. one set of names and defaults


def test_python_takes_a1111_names_seed_minus_one_and_diffusers_names(fixtures):
    pipe = tritonsd.load(fixtures / "sd1-tiny.safetensors", device="cpu", text_heads=2)
    s = pipe.settings()
    assert (s.cfg_scale, s.steps, s.sampler, s.karras) == (7.0, 20, "dpmpp_2m", True)  # A1111's UI defaults
    assert pipe.settings(sampler="Euler a").sampler == "euler_a"
    assert (pipe.settings(sampler="DPM++ 2M Karras").sampler, pipe.settings(sampler="DPM++ 2M Karras").karras) == \
        ("dpmpp_2m", True)
    assert pipe.settings(sampler="k_euler").sampler == "euler"
    assert pipe.settings(sampler="DPM++ 2M", karras="Uniform").karras is False
    seeds = {pipe.settings(seed=-1).seed for _ in range(3)}
    assert all(0 <= x < 2 ** 32 for x in seeds) and len(seeds) > 1

    ours = pipe("a cat", seed=7, steps=2, cfg_scale=5.0, batch_size=2, width=64, height=64)
    theirs = pipe("a cat", seed=7, num_inference_steps=2, guidance_scale=5.0, num_images_per_prompt=2, width=64,
                  height=64)
    assert isinstance(theirs, list) and theirs.images is theirs and len(theirs.images) == 2
    assert [np.asarray(a).tobytes() for a in ours] == [np.asarray(b).tobytes() for b in theirs.images]
    init = Image.new("RGB", (64, 64), (200, 30, 30))
    a = pipe("x", seed=1, steps=2, init_image=init, strength=0.5)[0]
    b = pipe("x", seed=1, num_inference_steps=2, image=init, strength=0.5)[0]
    assert a.tobytes() == b.tobytes()
    with pytest.raises(tritonsd.SettingsError, match="given twice"):
        pipe("x", steps=2, num_inference_steps=3)
    with pytest.raises(tritonsd.SettingsError, match="not a setting"):
        pipe("x", guidance=3)


def test_public_api_is_listed():
    names = dir(tritonsd)
    assert {"load", "Pipeline", "LoadSpec", "GenerationSettings", "SettingsError", "batch", "__version__"} <= \
        set(names)
    assert set(tritonsd.__all__) <= set(names)
    for name in tritonsd.__all__:
        assert getattr(tritonsd, name) is not None


def test_cli_takes_a1111_sampler_names_and_defaults(fixtures, tmp_path, capsys):
    assert main(["generate", *sd1(fixtures), "--prompt", "a fox", "--seed", "-1", "--sampler", "Euler a", *SMALL,
                 "--out", str(tmp_path)]) == 0
    [path] = written(capsys)
    text = Image.open(path).info["parameters"]
    assert "Sampler: Euler a" in text and "CFG scale: 7," in text
    assert main(["generate", *sd1(fixtures), "--prompt", "a fox", "--seed", "1", "--sampler", "DPM++ 2M",
                 "--scheduler", "Uniform", *SMALL, "--out", str(tmp_path)]) == 0
    [path] = written(capsys)
    assert "Schedule type: Uniform" in Image.open(path).info["parameters"]


# ---------------------------------------------------------------- 6. serve: the port first, signals named


@pytest.mark.slow
def test_serve_on_a_busy_port_refuses_before_loading(fixtures):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = cli("serve", "--checkpoint", fixtures / "sd1-tiny.safetensors", "--text-heads", "2", "--device", "cpu",
                "--port", port, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and f"cannot listen on 127.0.0.1:{port}" in r.stderr
    assert "loaded" not in r.stderr and "loading" not in r.stderr


@pytest.mark.slow
def test_serve_ends_on_sigterm_with_a_line(fixtures):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "tritonsd.tools.cli", "serve", "--checkpoint", "demo:sd1",
                             "--device", "cpu", "--port", str(port)], stderr=subprocess.PIPE, text=True, env=ENV,
                            cwd=str(ROOT))
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/sdapi/v1/progress", timeout=2).read()
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read()
                time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    assert err.strip().splitlines()[-1] == "tritonsd serve: stopped by SIGTERM"


def test_readme_lists_every_exit_code():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Exit codes"):]
    for code in ("0", "1", "2", "130", "143"):
        assert f"| {code} |" in section


# ---------------------------------------------------------------- 7. --ray takes no positional


def test_ray_flag_never_swallows_the_jobs_file(tmp_path):
    from tritonsd.tools.cli import bare_flags

    jobs = str(tmp_path / "jobs.jsonl")
    args = build_parser().parse_args(bare_flags(["batch", "--ray", jobs, "--out", "d", "--checkpoint", "demo:sd1"]))
    assert (args.ray, str(args.jobs)) == ("auto", jobs)
    args = build_parser().parse_args(bare_flags(["batch", jobs, "--ray=local", "--out", "d", "--checkpoint", "x"]))
    assert (args.ray, str(args.jobs)) == ("local", jobs)


@pytest.mark.slow
def test_ray_without_a_cluster_names_only_our_flags(tmp_path):
    pytest.importorskip("ray")
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"id": "a", "prompt": "x", "steps": 1, "width": 64, "height": 64}\n')
    env = {k: v for k, v in ENV.items() if k != "RAY_ADDRESS"}
    r = subprocess.run([sys.executable, "-m", "tritonsd.tools.cli", "batch", "--ray", str(jobs), "--out",
                        str(tmp_path / "out"), "--checkpoint", "demo:sd1", "--device", "cpu"], capture_output=True,
                       text=True, env=env, timeout=120, cwd=str(ROOT))
    assert r.returncode == 1
    assert "--address" not in r.stderr and "--ray=local" in r.stderr and r.stderr.strip().count("\n") == 0


# ---------------------------------------------------------------- 8. merge writes what PNGs get


@pytest.mark.slow
def test_merge_writes_the_mode_pngs_get(fixtures, tmp_path, capsys):
    assert main(["generate", "--checkpoint", "demo:sd1", "--prompt", "x", *SMALL, "--out", str(tmp_path)]) == 0
    [png] = written(capsys)
    out = tmp_path / "merged.safetensors"
    r = cli("merge", fixtures / "sd1-tiny.safetensors", "--lora", f"{fixtures / 'lora-sd1-tiny.safetensors'}:0.5",
            "--out", out)
    assert r.returncode == 0, r.stderr
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == stat.S_IMODE(png.stat().st_mode) == 0o666 & ~umask


# ---------------------------------------------------------------- 9. help, version, devices


@pytest.mark.parametrize("command", ["inspect", "warmup", "check-compile"])
def test_help_is_plain_text(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    description = out.split("\n\n")[1]
    assert "``" not in out and not description.rstrip().endswith(":")


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"tritonsd {tritonsd.__version__}"


@pytest.mark.parametrize("command", ["generate", "batch", "serve"])
def test_device_takes_cuda_n(command, tmp_path):
    extra = {"generate": ["--prompt", "x"], "batch": [str(tmp_path / "j.jsonl"), "--out", str(tmp_path)],
             "serve": []}[command]
    args = build_parser().parse_args([command, "--checkpoint", "demo:sd1", *extra, "--device", "cuda:1"])
    assert args.device == "cuda:1"


# ---------------------------------------------------------------- 10. a start in seconds


def test_model_hash_is_cached_on_disk_and_computed_only_when_needed(fixtures, tmp_path, monkeypatch):
    import hashlib

    from tritonsd.formats import hashes

    monkeypatch.setenv("TRITONSD_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "m.safetensors"
    path.write_bytes((fixtures / "sd1-tiny.safetensors").read_bytes())
    calls = []
    real = hashes.sha256_file
    monkeypatch.setattr(hashes, "sha256_file", lambda p: calls.append(p) or real(p))

    pipe = tritonsd.load(path, config=fixtures / "sd1-tiny.yaml", device="cpu", text_heads=2)
    assert calls == []  # loading hashes nothing
    want = hashlib.sha256(path.read_bytes()).hexdigest()[:10]  # computed here, not by the code under test
    assert pipe.model_hash == want and len(calls) == 1
    again = tritonsd.load(path, config=fixtures / "sd1-tiny.yaml", device="cpu", text_heads=2)
    assert again.model_hash == want and len(calls) == 1  # a second load reads the cache
    assert (tmp_path / "cache" / "hashes.json").is_file()
    with open(path, "r+b") as f:  # a changed file (size and mtime) is hashed again
        f.seek(0, 2)
        f.write(b" ")
    os.utime(path, ns=(1, 1))
    assert hashes.model_hash(path) == hashlib.sha256(path.read_bytes()).hexdigest()[:10] and len(calls) == 2


def test_loading_initialises_no_parameters(fixtures, monkeypatch):
    import torch

    from tritonsd.model import load as L

    called = []
    for cls in L._INIT_CLASSES:
        original = cls.__dict__["reset_parameters"]
        monkeypatch.setattr(cls, "reset_parameters",
                            lambda self, _o=original: called.append(type(self).__name__) or _o(self))
    pipe = tritonsd.load(fixtures / "sd1-tiny.safetensors", device="cpu", text_heads=2)
    assert called == []
    assert pipe.model.model.diffusion_model is not None
    torch.nn.Linear(2, 2)  # and outside the load, modules initialise as usual
    assert called == ["Linear"]
