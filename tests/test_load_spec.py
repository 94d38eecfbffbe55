"""One ``LoadSpec`` behind every door that loads a model: ``tritonsd.load``, ``load_spec``, ``tritonsd generate``,
``tritonsd batch`` (command line and Python) and the server's host all load the same model from the same spec;
its prechecks run once, before anything is read, each failure one line. Also the one dtype table and the one
seed range, as the doors use them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import tritonsd
import tritonsd.pipeline as pipeline_module
from tritonsd.devices import DTypeError, DeviceError, default_dtype, dtype_name, resolve_dtype
from tritonsd.load_spec import CheckedSpec, LoadSpec, LoadSpecError
from tritonsd.pipeline import load_spec
from tritonsd.tools.cli import build_parser, main as cli_main

SMALL = ["--width", "64", "--height", "64", "--steps", "1", "--seed", "1"]


@pytest.fixture
def loads(monkeypatch):
    """Every model load of the test, as (the arguments ``load_model`` got, the model it returned)."""
    seen = []
    real = pipeline_module.load_model

    def recording(path, **kwargs):
        model = real(path, **kwargs)
        seen.append(({"path": str(path), **{k: str(v) if v is not None else None for k, v in kwargs.items()}},
                     model))
        return model

    monkeypatch.setattr(pipeline_module, "load_model", recording)
    return seen


@pytest.fixture
def no_load(monkeypatch):
    """Fails the test when a model load starts: a precheck must refuse before anything is read."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model load started")

    monkeypatch.setattr(pipeline_module, "load_model", refuse)


def tiny_files(fixtures) -> tuple[str, str]:
    """sd1-tiny and its YAML, as absolute paths without links (what the batch driver and the server pass on)."""
    return str((fixtures / "sd1-tiny.safetensors").resolve()), str((fixtures / "sd1-tiny.yaml").resolve())


def tiny_spec(fixtures, **fields) -> LoadSpec:
    return LoadSpec(*tiny_files(fixtures), device="cpu", text_heads=2, **fields)


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------------------------ one spec


def test_every_door_loads_the_same_model_from_the_same_spec(fixtures, tmp_path, loads):
    from tritonsd.serve import build_state

    spec = tiny_spec(fixtures)
    ckpt, yaml = tiny_files(fixtures)
    model_flags = ["--checkpoint", ckpt, "--config", yaml, "--text-heads", "2", "--device", "cpu"]

    doors = {}
    doors["tritonsd.load"] = tritonsd.load(ckpt, yaml, device="cpu", text_heads=2)
    doors["load_spec"] = load_spec(spec)
    doors["load_spec(checked)"] = load_spec(spec.check())
    assert cli_main(["generate", *model_flags, "--prompt", "x", *SMALL, "--quiet", "--out", str(tmp_path / "g")]) == 0
    doors["tritonsd generate"] = None
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"id": "a", "prompt": "x", "steps": 1, "width": 64, "height": 64}) + "\n")
    assert cli_main(["batch", str(jobs), "--out", str(tmp_path / "b1"), *model_flags, "--quiet"]) == 0
    doors["tritonsd batch"] = None
    report = tritonsd.batch(str(jobs), tmp_path / "b2", spec=spec)
    assert report.written == ["a"] and not report.errors
    doors["tritonsd.batch(spec=)"] = None
    state = build_state(spec)
    try:
        doors["serve"] = state.host.pipe
    finally:
        state.worker.stop(30)

    assert len(loads) == len(doors)
    first_args, first_model = loads[0]
    assert first_args == {"path": ckpt, "config": yaml, "parameterization": None, "text_heads": "2", "vae": None,
                          "dtype": "torch.float32", "device": "cpu"}
    for (args, model), door in zip(loads, doors):
        assert args == first_args, door
        assert same_weights(model, first_model), door
        assert repr(model.config) == repr(first_model.config), door  # (it holds tensors: no ==)
    for door, pipe in doors.items():
        if pipe is not None:
            assert (pipe.name, pipe.model_hash, pipe.kernels) == ("sd1-tiny", doors["tritonsd.load"].model_hash,
                                                                  "auto"), door


def test_paths_compare_equal_whichever_type_they_came_as(fixtures):
    ckpt, yaml = tiny_files(fixtures)
    as_paths = LoadSpec(Path(ckpt), Path(yaml), text_heads=2, device="cpu")
    assert as_paths == tiny_spec(fixtures)
    assert isinstance(as_paths.path, str) and isinstance(as_paths.config, str)


def test_absolute_resolves_files_and_keeps_demo_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = LoadSpec("model.safetensors", "model.yaml", vae="vae.pt", lora_dir="loras", embeddings_dir="emb")
    absolute = spec.absolute()
    assert absolute.path == os.path.join(os.path.realpath(tmp_path), "model.safetensors")
    assert absolute.embeddings_dir == os.path.join(os.path.realpath(tmp_path), "emb")
    assert LoadSpec("demo:sd1").absolute().path == "demo:sd1"


def test_the_command_line_checks_once(fixtures, tmp_path, monkeypatch):
    calls = []
    real = LoadSpec.check

    def counting(self):
        calls.append(self)
        return real(self)

    monkeypatch.setattr(LoadSpec, "check", counting)
    assert cli_main(["generate", "--checkpoint", "demo:sd1", "--prompt", "x", *SMALL, "--device", "cpu", "--quiet",
                     "--out", str(tmp_path)]) == 0
    assert len(calls) == 1 and calls[0].path == "demo:sd1"


def test_a_checked_spec_loads_without_checking_again(fixtures, tmp_path, monkeypatch):
    """The checked spec stands for the checks that passed: the load does not repeat them (here a file the check
    saw is gone by then, and the load itself reports it)."""
    from tritonsd.formats.checkpoint import CheckpointError

    vae = tmp_path / "vae.safetensors"
    vae.write_bytes(b"x")
    checked = tiny_spec(fixtures, vae=str(vae)).check()
    assert isinstance(checked, CheckedSpec) and checked.check() is checked
    assert (checked.device, checked.dtype, checked.dtype_name) == (torch.device("cpu"), torch.float32, "fp32")
    vae.unlink()
    with pytest.raises(LoadSpecError, match="VAE file not found"):
        load_spec(tiny_spec(fixtures, vae=str(vae)))
    with pytest.raises(CheckpointError, match="no such file"):
        load_spec(checked)


# ------------------------------------------------------------------------------------------------ prechecks


def one_line(e: BaseException) -> str:
    text = str(e)
    assert text and "\n" not in text and isinstance(e, ValueError), repr(e)
    return text


@pytest.mark.parametrize("case, words", [
    ("missing checkpoint", ("checkpoint not found", "nope.safetensors")),
    ("checkpoint is a folder", ("checkpoint is not a regular file",)),
    ("checkpoint is a device", ("checkpoint is not a regular file", "/dev/null")),
    ("missing config", ("config not found", "nope.yaml")),
    ("missing VAE", ("VAE file not found", "nope-vae.pt")),
    ("missing embeddings folder", ("embeddings folder not found", "no-embeddings")),
    ("unknown kernels", ("unknown kernels 'cuda'", "auto, torch, triton")),
    ("unknown dtype", ("unknown dtype 'fp8'", "fp32, fp16, bf16")),
    ("integer dtype", ("torch.int8 is not supported",)),
    ("unknown device", ("unknown device 'gpu0'",)),
])
def test_each_precheck_is_one_line_before_anything_is_read(fixtures, tmp_path, no_load, case, words):
    spec = tiny_spec(fixtures)
    spec = {
        "missing checkpoint": LoadSpec(str(tmp_path / "nope.safetensors")),
        "checkpoint is a folder": LoadSpec(str(tmp_path)),
        "checkpoint is a device": LoadSpec("/dev/null"),
        "missing config": LoadSpec(spec.path, str(tmp_path / "nope.yaml")),
        "missing VAE": LoadSpec(spec.path, vae=str(tmp_path / "nope-vae.pt")),
        "missing embeddings folder": LoadSpec(spec.path, embeddings_dir=str(tmp_path / "no-embeddings")),
        "unknown kernels": LoadSpec(spec.path, kernels="cuda"),
        "unknown dtype": LoadSpec(spec.path, dtype="fp8"),
        "integer dtype": LoadSpec(spec.path, dtype=torch.int8),
        "unknown device": LoadSpec(spec.path, device="gpu0"),
    }[case]
    with pytest.raises(ValueError) as e:
        load_spec(spec)
    line = one_line(e.value)
    for word in words:
        assert word in line, line
    with pytest.raises(type(e.value)):  # the keywords of tritonsd.load are the same spec
        tritonsd.load(**{f.name: getattr(spec, f.name) for f in spec.__dataclass_fields__.values()})


def test_missing_cuda_is_one_line_before_the_file_is_read(fixtures, monkeypatch, no_load):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError) as e:
        tritonsd.load(fixtures / "sd1-tiny.safetensors", device="cuda")
    line = one_line(e.value)
    assert "'cuda'" in line and "CUDA is not available" in line


def test_demo_model_needs_no_file(no_load):
    checked = LoadSpec("demo:sd1", device="cpu").check()
    assert checked.spec.is_demo and checked.dtype == torch.float32


def test_untrusted_path_is_escaped_in_the_line(tmp_path, no_load):
    with pytest.raises(LoadSpecError) as e:
        LoadSpec(str(tmp_path / "evil\x1b[2J\nname")).check()
    line = one_line(e.value)
    assert "\x1b" not in line and "checkpoint not found" in line


def test_server_switches_with_the_same_options(fixtures, tmp_path, loads):
    """A checkpoint switched to is loaded with the server's spec for everything but the file, its YAML and the
    VAE."""
    from tritonsd.serve.catalog import Checkpoint
    from tritonsd.serve.host import load_pipeline

    spec = LoadSpec("demo:sd1", device="cpu", dtype="fp32", kernels="torch", text_heads=2)
    inpaint = Checkpoint(str(fixtures / "sd1-inpaint-tiny.safetensors"), "sd1-inpaint-tiny.safetensors",
                         str(fixtures / "sd1-inpaint-tiny.yaml"))
    pipe = load_pipeline(inpaint, None, spec)
    assert pipe.kernels == "torch" and pipe.name == "sd1-inpaint-tiny"
    [(args, _)] = loads
    assert args == {"path": inpaint.path, "config": inpaint.config, "parameterization": None, "text_heads": "2",
                    "vae": None, "dtype": "torch.float32", "device": "cpu"}


# ------------------------------------------------------------------------------------------------ dtype table


def test_dtype_names_and_their_way_back():
    for names, dtype, short in ((("fp16", "float16", "half", "FP16", torch.float16), torch.float16, "fp16"),
                                (("bf16", "bfloat16", torch.bfloat16), torch.bfloat16, "bf16"),
                                (("fp32", "float32", torch.float32), torch.float32, "fp32")):
        for name in names:
            assert resolve_dtype(name) is dtype and dtype_name(name) == short
    assert (default_dtype("cpu"), default_dtype(torch.device("cuda"))) == ("fp32", "fp16")
    with pytest.raises(DTypeError):
        dtype_name("int8")


def test_dtype_flags_take_the_table_names(tmp_path, capsys):
    """Every subcommand takes fp32 / fp16 / bf16 and refuses a name outside them."""
    for sub in (["generate", "--checkpoint", "demo:sd1", "--prompt", "x"],
                ["batch", str(tmp_path / "j.jsonl"), "--out", str(tmp_path), "--checkpoint", "demo:sd1"],
                ["serve", "--checkpoint", "demo:sd1"], ["warmup", "demo:sd1"]):
        with pytest.raises(SystemExit) as e:
            cli_main([*sub, "--dtype", "fp8"])
        assert e.value.code == 2
        assert "invalid choice: 'fp8' (choose from" in capsys.readouterr().err
        for name in ("fp32", "fp16", "bf16"):
            args = build_parser().parse_args([*sub, "--dtype", name])
            assert args.dtype == name


# ------------------------------------------------------------------------------------------------ seed range


def test_seed_range_is_the_same_at_every_door(monkeypatch):
    """Random seeds below 2**32 (AUTOMATIC1111's), given seeds up to 2**64 - 1 (torch's generator) in the
    settings, the infotext, the noise and the RNG alike."""
    from tritonsd.batch.jobs import seed_from_id
    from tritonsd.sampler.infotext_parse import generation_settings
    from tritonsd.sampler.noise import derived_seed
    from tritonsd.sampler.rng import RNGError, check_seed
    from tritonsd.sampler.settings import GenerationSettings, SettingsError
    from tritonsd.serve.jobs import _fixed_seed

    import secrets

    monkeypatch.setattr(secrets, "randbelow", lambda n: n - 1)  # the top of each random range
    assert GenerationSettings(prompt="x").check().seed == 2 ** 32 - 1
    assert _fixed_seed("seed", -1) == 2 ** 32 - 1
    assert all(0 <= seed_from_id(i) < 2 ** 32 for i in ("fox", "a", "z" * 200))
    top = 2 ** 64 - 1
    assert GenerationSettings(prompt="x", seed=top).check().seed == top
    with pytest.raises(SettingsError):
        GenerationSettings(prompt="x", seed=top, batch_size=2).check()  # image 1 would use 2**64
    assert check_seed(top) == top
    with pytest.raises(RNGError):
        check_seed(top + 1)
    assert derived_seed(top, "start") == top and derived_seed(top, "vae") < 2 ** 64
    parsed = generation_settings(f"x\nSteps: 3, Sampler: Euler, Seed: {top}")
    assert parsed["seed"] == top and not parsed["notes"]
    parsed = generation_settings(f"x\nSteps: 3, Sampler: Euler, Seed: {top + 1}")
    assert "seed" not in parsed and parsed["notes"]
