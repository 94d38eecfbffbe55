"""``tritonsd parity`` run as a user runs it (``python -m tritonsd.tools.cli parity ...`` in a subprocess).

The whole public reference files are recomputed once per fixture (cached per module); the other tests use
``--only`` on modified copies of them to stay cheap: a tampered tensor, an unknown one, a batch-1 / fewer-prompt
slice (rows of the original's outputs are the original's outputs for those rows: every sample and prompt is
computed independently), a reference of another model, the Triton kernels under the interpreter.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tritonsd.testing.reference import relative_error

from conftest import FP32_BOUND

pytestmark = pytest.mark.slow  # every test runs `tritonsd parity` in a subprocess, the full runs for minutes

FIXTURES = ["sd1-tiny", "sd2v-tiny", "sd1-inpaint-tiny", "sdxl-tiny"]

# What the READMEs call inputs of the reference runs (every other tensor must be recomputed and compared).
INPUTS = {
    "sd1-tiny": {"unet.x", "unet.t0", "unet.t1", "vae.z", "vae.image", "sample.x_T", "euler_a_cfg7p5.noise"},
    "sd2v-tiny": {"unet.x", "unet.t0", "unet.t1", "vae.z", "vae.image", "sample.x_T", "euler_a_cfg7p5.noise"},
    "sd1-inpaint-tiny": {"unet.x", "unet.t0", "unet.t1", "vae.z", "vae.image", "inpaint.image", "inpaint.mask",
                         "inpaint.masked_image_noise", "inpaint.x_T"},
    "sdxl-tiny": {"unet.x", "unet.t0", "unet.t1", "vae.z", "vae.image", "sample.x_T", "text.original_size_as_tuple",
                  "text.crop_coords_top_left", "text.target_size_as_tuple"},
}
# Stored as "rows [1, 2] of text.*": compared with the recomputed rows.
DERIVED = {"unet.context", "unet.y"}


def parity(*args, timeout: int = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    """One run; one torch thread (the tiny models keep a second one poorly busy, and tests run side by side)."""
    cmd = [sys.executable, "-m", "tritonsd.tools.cli", "parity", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def rows_of(path: Path) -> dict[str, dict]:
    return {r["name"]: r for r in json.loads(path.read_text())["rows"]}


def copy_reference(fixtures: Path, name: str, dest: Path, tensors: dict | None = None, meta: dict | None = None):
    """NAME.reference.{safetensors,json} into ``dest``, optionally with other tensors / JSON."""
    ref = dest / f"{name}.reference.safetensors"
    if tensors is None:
        shutil.copy(fixtures / f"{name}.reference.safetensors", ref)
    else:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(ref))
    if meta is None:
        shutil.copy(fixtures / f"{name}.reference.json", ref.with_suffix(".json"))
    else:
        ref.with_suffix(".json").write_text(json.dumps(meta))
    return ref


@pytest.fixture(scope="module")
def full_run(fixtures, tmp_path_factory):
    """full_run(name) -> (CompletedProcess-like, rows, seconds, saved path); sd1 also saves its tensors.

    The four whole-file runs start together on first use, one thread each: the tiny models keep two threads
    poorly busy, so running them side by side on CI's two cores is faster than one after another.
    """
    runs: dict[str, tuple] = {}

    def start_all():
        for name in FIXTURES:
            out = tmp_path_factory.mktemp(name)
            args = [fixtures / f"{name}.safetensors", "--reference", fixtures / f"{name}.reference.safetensors",
                    "--json", out / "rows.json"]
            if name == "sd1-tiny":
                args += ["--save", out / "recomputed.safetensors"]
            cmd = [sys.executable, "-m", "tritonsd.tools.cli", "parity", *map(str, args)]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    env={**os.environ, "OMP_NUM_THREADS": "1"})
            runs[name] = (proc, out, time.perf_counter())

    def get(name: str):
        if not runs:
            start_all()
        proc, out, t0 = runs[name][:3]
        if len(runs[name]) == 3:
            stdout, stderr = proc.communicate(timeout=1800)
            done = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
            rows = rows_of(out / "rows.json") if (out / "rows.json").exists() else {}
            runs[name] = (proc, out, t0, (done, rows, time.perf_counter() - t0, out / "recomputed.safetensors"))
        return runs[name][3]

    yield get
    for proc, *_ in runs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("name", FIXTURES)
def test_every_tensor_of_the_reference_passes(full_run, reference, name):
    proc, rows, seconds, _ = full_run(name)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    ref, _ = reference(name)
    assert set(rows) == set(ref), "one row per key of the reference file, no more, no less"
    failed = [n for n, r in rows.items() if not r["pass"]]
    assert not failed, failed
    inputs = {n for n, r in rows.items() if r["kind"] == "input"}
    derived = {n for n, r in rows.items() if r["kind"] == "derived"}
    assert inputs == INPUTS[name]
    assert derived == DERIVED & set(ref)
    for n, r in rows.items():
        if n in inputs:
            continue
        assert list(ref[n].shape) == r["shape"]
        if ref[n].is_floating_point():
            assert r["kind"] in ("compared", "derived") and r["error"] <= FP32_BOUND == r["bound"], (n, r)
        else:
            assert r["kind"] == "exact" and r["error"] == 0, (n, r)
    assert "FAIL" not in proc.stdout
    print(f"{name}: {seconds:.1f} s")


def test_saved_tensors_pass_the_comparison(full_run, reference):
    proc, rows, _, saved = full_run("sd1-tiny")
    assert proc.returncode == 0
    ref, _ = reference("sd1-tiny")
    out = load_file(str(saved))
    recomputed = {n for n, r in rows.items() if r["kind"] not in ("input", "derived")}
    assert recomputed <= set(out)
    for n in recomputed:
        assert out[n].dtype == ref[n].dtype and out[n].shape == ref[n].shape, n
        if ref[n].is_floating_point():
            assert relative_error(out[n], ref[n]) <= FP32_BOUND, n
        else:
            assert torch.equal(out[n], ref[n]), n
    # the inputs travel along, so the saved file is a complete reference itself
    assert all(torch.equal(out[n], ref[n]) for n in INPUTS["sd1-tiny"])


def test_ckpt_file(fixtures, tmp_path, reference):
    """The float16 .ckpt of the same model: every weight-dependent group (text, UNet, VAE)."""
    groups = "tokens,text,unet,vae"
    proc = parity(fixtures / "sd1-tiny.ckpt", "--reference", fixtures / "sd1-tiny.reference.safetensors",
                  "--only", groups, "--json", tmp_path / "rows.json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = rows_of(tmp_path / "rows.json")
    ref, _ = reference("sd1-tiny")
    assert set(rows) == {k for k in ref if k.split(".")[0] in groups.split(",")}
    assert all(r["pass"] for r in rows.values())
    assert "not checked (--only)" in proc.stdout


def test_tampered_tensor_fails_and_is_named(fixtures, tmp_path, reference):
    ref, _ = reference("sd1-tiny")
    tensors = dict(ref)
    t = tensors["ddim_cfg1p0.latents"].clone()
    t.view(-1)[123] += 1e-3 * t.abs().max()  # relative error 1e-3, ten times the bound
    tensors["ddim_cfg1p0.latents"] = t
    path = copy_reference(fixtures, "sd1-tiny", tmp_path, tensors)
    proc = parity(fixtures / "sd1-tiny.safetensors", "--reference", path, "--only", "unet,ddim_cfg1p0",
                  "--json", tmp_path / "rows.json")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = rows_of(tmp_path / "rows.json")
    assert [n for n, r in rows.items() if not r["pass"]] == ["ddim_cfg1p0.latents"]
    assert rows["ddim_cfg1p0.latents"]["error"] == pytest.approx(1e-3, rel=0.05)
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("ddim_cfg1p0.latents "))
    assert "FAIL" in line
    assert "FAILED: ddim_cfg1p0.latents" in proc.stdout


def test_wrong_token_id_and_tensors_we_cannot_recompute_fail(fixtures, tmp_path, reference):
    """Token ids compare exactly; a tensor of an unknown group, or one its group does not produce, is a FAILURE
    that names it, never a silent skip."""
    ref, _ = reference("sd2v-tiny")
    tokens = ref["tokens.input_ids"].clone()
    tokens[2, 3] += 1
    tensors = {**ref, "tokens.input_ids": tokens, "mystery.thing": torch.ones(3), "unet.hidden": torch.ones(2)}
    path = copy_reference(fixtures, "sd2v-tiny", tmp_path, tensors)
    proc = parity(fixtures / "sd2v-tiny.safetensors", "--reference", path, "--only", "tokens,mystery,unet",
                  "--json", tmp_path / "rows.json")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = rows_of(tmp_path / "rows.json")
    assert {n for n, r in rows.items() if not r["pass"]} == {"tokens.input_ids", "mystery.thing", "unet.hidden"}
    row = rows["tokens.input_ids"]
    assert row["kind"] == "exact" and "1 of 462 values differ" in row["note"]
    assert "unknown group 'mystery'" in rows["mystery.thing"]["note"]
    assert "cannot recompute unet.hidden" in rows["unet.hidden"]["note"]
    assert rows["unet.out0"]["pass"] and rows["unet.out1"]["pass"]
    for name in ("tokens.input_ids", "mystery.thing", "unet.hidden"):
        assert any(ln.startswith(name + " ") and "FAIL" in ln for ln in proc.stdout.splitlines())


def test_other_batch_prompts_and_steps_from_shapes(fixtures, tmp_path, reference):
    """A slice of the original's runs is itself a reference: 3 of the 6 prompts, batch 1 for the UNet and the
    sampler; the JSON without 'steps' (taken from x_inter's rows) and with the prompts of the slice."""
    ref, meta = reference("sd1-tiny")
    rows = [5, 2, 3]
    t = {"tokens.input_ids": ref["tokens.input_ids"][rows], "text.context": ref["text.context"][rows]}
    for k in ("unet.x", "unet.context", "unet.out0", "unet.out1", "sample.x_T", "sample.cond", "sample.uncond",
              "ddim_cfg7p5.latents", "ddim_cfg7p5.image"):
        t[k] = ref[k][1:2]
    t["unet.t0"], t["unet.t1"] = ref["unet.t0"][1:2], ref["unet.t1"][1:2]
    for k in ("ddim_cfg7p5.x_inter", "ddim_cfg7p5.pred_x0"):
        t[k] = ref[k][:, 1:2]
    new_meta = {k: v for k, v in meta.items() if k not in ("steps", "tensors")}
    new_meta["prompts"] = [meta["prompts"][r] for r in rows]
    new_meta["tensors"] = {k: {kk: vv for kk, vv in meta["tensors"][k].items() if kk != "prompts"} for k in t}
    new_meta["tensors"]["unet.context"]["produced_by"] = "rows [1] of text.context"  # sample 1 = prompt 2 = row 1 of 3
    path = copy_reference(fixtures, "sd1-tiny", tmp_path, t, new_meta)
    proc = parity(fixtures / "sd1-tiny.safetensors", "--reference", path, "--json", tmp_path / "rows.json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = rows_of(tmp_path / "rows.json")
    assert set(out) == set(t) and all(r["pass"] for r in out.values())
    assert out["unet.context"]["kind"] == "derived"


@pytest.mark.parametrize("checkpoint,reference_name", [("sd1-tiny.safetensors", "sdxl-tiny"),
                                                       ("sd1-inpaint-tiny.safetensors", "sd1-tiny"),
                                                       ("sd1-tiny.ckpt", "sd2v-tiny")])
def test_reference_of_another_model_is_refused_cleanly(fixtures, checkpoint, reference_name):
    proc = parity(fixtures / checkpoint, "--reference", fixtures / f"{reference_name}.reference.safetensors")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tritonsd parity: error: ")
    assert f"{reference_name}.reference" in lines[0] or "another model" in lines[0]


def test_bad_usage_exits_2(fixtures, tmp_path):
    ckpt, ref = fixtures / "sd1-tiny.safetensors", fixtures / "sd1-tiny.reference.safetensors"
    for args in ([ckpt, "--reference", tmp_path / "missing.safetensors"],
                 [ckpt, "--reference", ref, "--only", "nonsense"],
                 [ckpt]):
        proc = parity(*args)
        assert proc.returncode == 2, (args, proc.stdout + proc.stderr)
        assert "Traceback" not in proc.stderr


def test_triton_kernels_under_the_interpreter(fixtures, tmp_path):
    """The text tower through the Triton kernels (the interpreter without a GPU), even when the environment does
    not ask for the interpreter: the command arranges it itself.

    Only text: under the interpreter on 2 CPU cores, sd1-tiny's text group takes ~15 s, but its UNet group
    ~8 min and its VAE group ~20 min (all within 2.3e-6 there); the UNet and VAE kernels have their own tests."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    groups = "tokens,text"
    cmd = [sys.executable, "-m", "tritonsd.tools.cli", "parity", str(fixtures / "sd1-tiny.safetensors"),
           "--reference", str(fixtures / "sd1-tiny.reference.safetensors"), "--kernels", "triton",
           "--only", groups, "--json", str(tmp_path / "rows.json")]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "rows.json").read_text())
    assert report["kernels"] == "triton"
    assert all(r["pass"] for r in report["rows"])
    assert {r["group"] for r in report["rows"]} == set(groups.split(","))
    print(f"triton {groups}: {seconds:.1f} s")
