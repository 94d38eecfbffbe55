"""The end-to-end benchmark's plumbing on the CPU at tiny scale (timings there mean nothing), and the README
speed table generated from results files."""

from __future__ import annotations

import sys
import json

import pytest
from safetensors import safe_open

from tritonsd.bench import e2e as bench_e2e
from tritonsd.bench import environment
from benchmarks import readme_table

def tiny_manifest(fixtures, tmp_path):
    """A key manifest (the released manifests' format) of the sd1-tiny file, from its header."""
    dtypes = {"F32": "float32", "F16": "float16", "I64": "int64", "I32": "int32", "BF16": "bfloat16"}
    with safe_open(str(fixtures / "sd1-tiny.safetensors"), "pt") as f:
        tensors = {k: {"shape": list(f.get_slice(k).get_shape()), "dtype": dtypes[f.get_slice(k).get_dtype()]}
                   for k in f.keys()}
    path = tmp_path / "sd1-tiny.json"
    path.write_text(json.dumps({"model": "sd1-tiny", "tensors": tensors}))
    return path


def test_e2e_smoke_on_cpu(fixtures, tmp_path, capsys):
    out = tmp_path / "e2e.json"
    rc = bench_e2e.main(["--device", "cpu", "--model", str(tiny_manifest(fixtures, tmp_path)), "--text-heads", "2",
                         "--size", "64", "--batch", "1", "--steps", "2", "--repeat", "1", "--dtype", "fp32",
                         "--impl", "tritonsd-graph", "--sampler", "euler_a", "--git-commit", "abc123",
                         "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["bench"] == "e2e" and data["git_commit"] == "abc123" and data["device"]
    assert data["settings"]["steps"] == 2 and data["settings"]["dtype"] == "fp32" and data["torch"]
    assert data["settings"]["repeat"] == 1 and isinstance(data["command"], str) and data["command"]
    assert set(environment.SMI_FIELDS.values()) <= set(data["gpu"])  # nulls without nvidia-smi, never missing
    (row,) = data["rows"]
    assert row["warmup_s"] is None  # no compile off CUDA: the field is there, empty
    assert "error" not in row and row["finite"] and row["loop_entries"] == 0  # the CPU runs the eager loop
    assert row["cuda_graph"] is False and row["vae_retries"] == 0  # on the CPU the loop runs eagerly
    assert row["impl"] == "tritonsd-graph" and row["sampler"] == "euler_a" and row["batch"] == 1
    assert row["step_ms"] == pytest.approx(row["loop_ms"] / 2) and row["it_per_s"] == pytest.approx(2e3 / row["loop_ms"])
    assert row["raw"]["loop_ms"] == [row["loop_ms"]] and row["image_ms"] >= row["loop_ms"]
    assert "wrote" in capsys.readouterr().out


def test_default_repeats_are_at_least_ten():
    import argparse

    p = argparse.ArgumentParser()
    bench_e2e.add_arguments(p)
    assert p.parse_args([]).repeat >= 10


def test_commit_comes_from_the_flag_then_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(environment.COMMIT_ENV, "fromenv")
    assert environment.git_commit("fromflag", root=tmp_path) == ("fromflag", None)
    assert environment.git_commit(None, root=tmp_path) == ("fromenv", None)
    monkeypatch.delenv(environment.COMMIT_ENV)
    assert environment.git_commit(None, root=tmp_path) == (None, None)  # no .git there, nothing passed


def test_nvidia_smi_line_is_parsed_and_absence_is_null(monkeypatch):
    got = environment.parse_smi("580.159.04, 1980, 3201, 1980, 3201, 700.00, 41")
    assert got == {"driver": "580.159.04", "sm_clock_mhz": 1980, "mem_clock_mhz": 3201, "sm_clock_max_mhz": 1980,
                   "mem_clock_max_mhz": 3201, "power_limit_w": 700.0, "temperature_c": 41}
    assert environment.parse_smi("[N/A], 1980")["driver"] is None
    monkeypatch.setattr(environment.shutil, "which", lambda name: None)
    assert environment.gpu_state() == dict.fromkeys(environment.SMI_FIELDS.values())


def test_cli_bench_e2e_without_cuda(monkeypatch, capsys):
    import torch

    from tritonsd.tools import cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["bench", "e2e", "--model", "sd15", "--batch", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("tritonsd bench: error: device 'cuda'") and "\n" not in err


def test_e2e_refuses_bad_settings():
    with pytest.raises(bench_e2e.BenchE2EError, match="--size"):
        bench_e2e.main(["--device", "cpu", "--size", "500"])
    with pytest.raises(bench_e2e.BenchE2EError, match="--batch"):
        bench_e2e.main(["--device", "cpu", "--batch", "0"])


def test_e2e_names_missing_diffusers(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` raises ImportError, as when absent
    with pytest.raises(bench_e2e.BenchE2EError, match="diffusers is not installed"):
        bench_e2e.main(["--device", "cpu", "--impl", "diffusers-eager"])


def test_e2e_missing_diffusers_beside_tritonsd_rows(fixtures, tmp_path, capsys, monkeypatch):
    """The GPU run's e2e stage asks for tritonsd and diffusers rows: without diffusers the tritonsd rows are still
    measured, the diffusers row is an error row, and the exit status is 1."""
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` raises ImportError, as when absent
    out = tmp_path / "e2e.json"
    rc = bench_e2e.main(["--device", "cpu", "--model", str(tiny_manifest(fixtures, tmp_path)), "--text-heads", "2",
                         "--size", "64", "--batch", "1", "--steps", "1", "--repeat", "1", "--dtype", "fp32",
                         "--impl", "tritonsd-eager", "--impl", "diffusers-eager", "--sampler", "euler",
                         "--json", str(out)])
    assert rc == 1
    rows = {r["impl"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"tritonsd-eager", "diffusers-eager"}
    assert "error" not in rows["tritonsd-eager"] and rows["tritonsd-eager"]["finite"]
    assert "diffusers is not installed" in rows["diffusers-eager"]["error"]
    assert "running tritonsd-eager only" in capsys.readouterr().err


@pytest.mark.parametrize("name,size", [("sd15", 512), ("sd21", 768), ("sdxl", 1024)])
def test_peer_configs_have_our_parameter_counts(name, size):
    import diffusers
    import torch

    from tritonsd.bench.random_weights import build_meta_model

    unet_cfg, vae_cfg = bench_e2e.diffusers_configs(name, size)
    with torch.device("meta"):
        unet, vae = diffusers.UNet2DConditionModel(**unet_cfg), diffusers.AutoencoderKL(**vae_cfg)
    ours = build_meta_model(name)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(unet) == count(ours.model.diffusion_model) and count(vae) == count(ours.first_stage_model)


# ---------------------------------------------------------------- README table


def results(rows, **env):
    return {"bench": "e2e", "device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "triton": "3.6.0",
            "diffusers": "0.42.1", "git_commit": "0123456789abcdef", "date": "2026-11-24T10:00:00+00:00",
            "settings": {"dtype": "fp16", "steps": 20, "cfg": 7.5}, "rows": rows, **env}


def row(impl, batch, its, sampler="dpmpp_2m", **extra):
    return {"model": "sd15", "size": 512, "batch": batch, "sampler": sampler, "impl": impl, "it_per_s": its,
            "image_ms": 1234.0, "first_image_ms": 56789.0, "peak_mem_gb": 3.21, **extra}


def test_table_from_results():
    data = results([row("tritonsd-graph", 1, 31.25), row("diffusers-eager", 1, 20.5), row("tritonsd-graph", 4, 9.0),
                    row("tritonsd-eager", 4, 1.0, sampler="euler"),
                    {"model": "sd15", "size": 512, "batch": 4, "sampler": "dpmpp_2m", "impl": "diffusers-eager",
                     "error": "OutOfMemoryError: ..."}])
    table = readme_table.speed_table(data, source="e2e-x.json")
    lines = table.splitlines()
    assert lines[0].startswith("NVIDIA H100 80GB HBM3, fp16, 20 steps DPM++ 2M Karras, CFG 7.5; torch 2.11.0")
    assert "diffusers 0.42.1" in lines[0] and "0123456789abcdef" in lines[0] and "`e2e-x.json`" in lines[0]
    assert lines[2] == ("| model | size | batch | tritonsd-graph it/s | diffusers-eager it/s | tritonsd-graph image s "
                        "| first image s | peak GB |")
    assert lines[4] == "| sd15 | 512×512 | 1 | 31.25 | 20.50 | 1.23 | 56.8 | 3.2 |"
    assert lines[5] == "| sd15 | 512×512 | 4 | 9.00 | – | 1.23 | 56.8 | 3.2 |"  # the error row is left out
    assert len(lines) == 6
    assert readme_table.speed_table(data, sampler="euler_a") == ""


def test_table_cli_newest_file_update_and_no_results(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(readme_table, "RESULTS_DIR", tmp_path)
    assert readme_table.main([]) == 0 and capsys.readouterr().out == ""  # nothing measured yet: no table
    old = results([row("tritonsd-graph", 1, 1.0)], date="2026-11-20T00:00:00+00:00")
    new = results([row("tritonsd-graph", 1, 2.0)])
    (tmp_path / "e2e-b.json").write_text(json.dumps(old))
    (tmp_path / "e2e-a.json").write_text(json.dumps(new))
    (tmp_path / "kernels-x.json").write_text("{}")
    assert readme_table.main([]) == 0
    assert "| 2.00 |" in capsys.readouterr().out
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{readme_table.START}\nold\n{readme_table.END}\ntail\n")
    assert readme_table.main([str(tmp_path / "e2e-b.json"), "--update", str(readme)]) == 0
    text = readme.read_text()
    assert "old" not in text and "| 1.00 |" in text and text.endswith(f"{readme_table.END}\ntail\n")
    assert readme_table.main([str(tmp_path / "kernels-x.json")]) == 1


def test_merge_split_runs():
    a = results([row("tritonsd-graph", 1, 1.0), row("diffusers-eager", 1, 3.0)], date="2026-11-24T09:00:00+00:00",
                git_commit="aaaaaaaaaaaa")
    b = results([row("tritonsd-graph", 1, 2.0), {**row("diffusers-eager", 1, None), "error": "OOM"},
                 row("diffusers-compile", 1, 4.0)], git_commit="bbbbbbbbbbbb")
    other = results([row("tritonsd-graph", 4, 9.0)], device="NVIDIA H200", date="2026-11-23T00:00:00+00:00")
    merged = readme_table.merge([b, other, a])
    got = {(r["impl"], r["batch"]): r.get("it_per_s") for r in merged["rows"] if "error" not in r}
    assert got == {("tritonsd-graph", 1): 2.0, ("diffusers-eager", 1): 3.0, ("diffusers-compile", 1): 4.0}
    assert merged["git_commit"] == "aaaaaaaaaa, bbbbbbbbbb" and merged["device"] == "NVIDIA H100 80GB HBM3"
