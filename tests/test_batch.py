"""``tritonsd batch`` in one process (no Ray): job lines, bad lines by number, grouped UNet batches, resume,
the command line. The fixtures' sd1-tiny at 64 px, 2 steps, loaded once for the module."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import tritonsd
from tritonsd.batch import make_units, read_jobs
from tritonsd.batch.worker import BatchWorker
from tritonsd.testing.reference import relative_error
from tritonsd.tools.cli import main as cli_main

from float_bounds import Reductions, reorder_bound

SMALL = {"steps": 2, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def pipe(fixtures):
    return tritonsd.load(str(fixtures / "sd1-tiny.safetensors"), fixtures / "sd1-tiny.yaml", device="cpu",
                         text_heads=2)


def lines(*jobs) -> list[str]:
    return [j if isinstance(j, str) else json.dumps(j) for j in jobs]


def rows_by_line(out: Path) -> dict[int, dict]:
    rows = [json.loads(s) for s in (out / "results.jsonl").read_text().splitlines()]
    by_line = {r["line"]: r for r in rows}
    assert len(by_line) == len(rows), "one row per line"
    return by_line


# ------------------------------------------------------------------------------------------------ job lines


def test_seed_missing_or_minus_one_comes_from_the_id():
    jobs, bad = read_jobs(lines({"id": "fox"}, {"id": "owl", "seed": -1}, {"id": "cat", "seed": 12}))
    assert not bad and jobs[2].settings.subseed is None
    expect = {i: int(hashlib.sha256(i.encode()).hexdigest()[:8], 16) for i in ("fox", "owl")}
    assert [j.seed for j in jobs] == [expect["fox"], expect["owl"], 12]


@pytest.mark.parametrize("fields, sampler, karras", [
    ({"sampler_name": "DPM++ 2M Karras"}, "dpmpp_2m", True),
    ({"sampler_name": "DPM++ 2M", "scheduler": "Uniform"}, "dpmpp_2m", False),
    ({"sampler_name": "Euler a"}, "euler_a", None),
    ({"sampler_name": "Euler", "scheduler": "Karras"}, "euler", True),
    ({"sampler_name": "ddim"}, "ddim", None),
    ({}, "dpmpp_2m", None),
])
def test_sampler_names_a1111_and_ours(fields, sampler, karras):
    (job,), bad = read_jobs(lines({"id": "x", **fields}))
    assert not bad and (job.settings.sampler, job.settings.karras) == (sampler, karras)


@pytest.mark.parametrize("job_id, words", [
    ("a/b", "path separator"), ("a\\b", "path separator"), ("x..y", "'..'"), ("..", "'..'"),
    ("a\x01b", "control character"), ("a\u202eb", "control character"), ("", "empty"), (7, "must be a string"),
    (".hidden", "starts with '.'"), ("x" * 201, "longer than 200"),
])
def test_bad_ids_are_refused(job_id, words):
    jobs, bad = read_jobs(lines({"id": job_id}))
    assert not jobs and words in bad[0].error and "\x01" not in bad[0].error and "\u202e" not in bad[0].error


def test_groups_share_settings_and_loras_never_mix(fixtures):
    lora = str(fixtures / "lora-sd1-tiny.safetensors")
    jobs, bad = read_jobs(lines(*[{"id": f"p{i}", **SMALL} for i in range(5)],
                                {"id": "wide", **SMALL, "width": 128},
                                {"id": "lora", **SMALL, "loras": [f"{lora}:0.7"]},
                                {"id": "tagged", **SMALL, "prompt": "<lora:x:1> a"},
                                {"id": "cfg", **SMALL, "cfg_scale": 3}))
    assert not bad
    units = make_units(jobs, 2)
    assert [[j.id for j in u] for u in units] == [["p0", "p1"], ["p2", "p3"], ["p4"], ["wide"], ["lora"],
                                                   ["tagged"], ["cfg"]]
    assert jobs[6].loras == ((str(Path(lora).resolve()), 0.7, 0.7),)


# ------------------------------------------------------------------------------------------------ runs


def test_bad_lines_are_reported_by_number_and_the_rest_run(pipe, tmp_path):
    jobs_file = tmp_path / "jobs.jsonl"
    jobs_file.write_bytes("\n".join([
        json.dumps({"id": "good1", "prompt": "a cat", **SMALL}),
        "{not json",
        json.dumps({"id": "sampler", "sampler_name": "Heun++", **SMALL}),
        json.dumps({"id": "w100", **SMALL, "width": 100}),
        json.dumps({"id": "lora", **SMALL, "loras": ["no-such-lora.safetensors:0.5"]}),
        json.dumps({"id": "good1", "prompt": "again", **SMALL}),
        json.dumps({"id": "sub/dir", **SMALL}),
        "",
        json.dumps({"id": "typo", "promt": "x"}),
        json.dumps(["not", "an", "object"]),
        json.dumps({"prompt": "no id"}),
        json.dumps({"id": "good2", "prompt": "a dog", **SMALL, "cfg_scale": 1}),
    ]).encode() + b"\n\xff\xfe\n")
    report = tritonsd.batch(jobs_file, tmp_path / "out", pipe=pipe)
    assert sorted(report.written) == ["good1", "good2"]
    by_line = rows_by_line(tmp_path / "out")
    assert sorted(by_line) == [1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13]
    expected_words = {2: "invalid JSON", 3: "unknown sampler 'Heun++'", 4: "width 100", 5: "LoRA file not found",
                      6: "duplicate id 'good1' (first on line 1)", 7: "path separator", 9: "unknown field 'promt'",
                      10: "JSON object", 11: "id is missing", 13: "not UTF-8"}
    for line, words in expected_words.items():
        assert words in by_line[line]["error"], (line, by_line[line])
    assert by_line[1]["file"] == "good1.png" and by_line[12]["file"] == "good2.png"
    with Image.open(tmp_path / "out" / "good2.png") as im:
        assert "a dog" in im.info["parameters"] and f"Seed: {by_line[12]['seed']}" in im.info["parameters"]


GROUPED_JOBS = [{"id": "a", "prompt": "a red car", "seed": 3, **SMALL, "sampler_name": "Euler a", "subseed": 9,
                 "subseed_strength": 0.4},
                {"id": "b", "prompt": "a very long winding road", "seed": 4, **SMALL, "sampler_name": "Euler a"},
                {"id": "c", "prompt": "", "negative_prompt": "x", **SMALL, "sampler_name": "Euler a"}]


def alone_within_reorder_bound(pipe, together, jobs):
    """Each job run alone against its row of TOGETHER, within float_bounds.reorder_bound: the UNet batches
    differ, so torch's CPU kernels may sum in another order (3e-5 of the latents' scale apart on one 2-core
    machine, 7e-6 on another)."""
    single = BatchWorker(pipe, 1)
    for i, job in enumerate(jobs):
        row = single._prepare(job)
        with Reductions(pipe.model).record() as reductions:
            alone = single.sample([row]).latents
        bound = reorder_bound(reductions.lengths, row.settings.cfg_scale)
        assert relative_error(together[i: i + 1], alone) <= bound, (job.id, bound)


def test_across_group_sizes_latents_agree_within_float32_reordering(pipe):
    jobs, _ = read_jobs(lines(*GROUPED_JOBS))
    grouped = BatchWorker(pipe, 3)
    together = grouped.sample([grouped._prepare(j) for j in jobs])
    assert together.latents.shape[0] == 3
    alone_within_reorder_bound(pipe, together.latents, jobs)
    assert (together.latents[0] - together.latents[1]).abs().max() > 0.1  # each row its own job


def test_across_group_sizes_latents_are_identical_with_a_row_wise_unet(pipe, monkeypatch):
    """With a stand-in UNet that computes each row from that row alone and sums nothing (so no summation order),
    a job's latents in a group of 3 and alone are bit-identical: noise, subseeds, conditioning rows, guidance and
    the sampler's steps are per job exactly; only the real UNet's sums may differ."""

    def row_wise(x, t, context, y=None, t_emb=None):
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1, 1, 1)  # [B or 1, 1, 1, 1]
        prompt = context[:, 1:1 + x.shape[1], 0].reshape(x.shape[0], x.shape[1], 1, 1)  # a token per channel
        return torch.tanh(x) * 0.5 + prompt + t * 1e-3

    monkeypatch.setattr(pipe.model.model.diffusion_model, "forward", row_wise)
    jobs, _ = read_jobs(lines(*GROUPED_JOBS))
    grouped = BatchWorker(pipe, 3)
    together = grouped.sample([grouped._prepare(j) for j in jobs]).latents
    single = BatchWorker(pipe, 1)
    for i, job in enumerate(jobs):
        assert torch.equal(together[i: i + 1], single.sample([single._prepare(job)]).latents), job.id
    assert (together[0] - together[1]).abs().max() > 0.1


def test_prompt_editing_rows_share_a_batch(pipe):
    """Prompts with ``[from:to:when]`` carry per-step tables [calls, 1, ...]: stacked along the batch axis."""
    jobs, _ = read_jobs(lines(*[{"id": f"e{i}", "prompt": f"[a cat:a dog:1] number {i}", "seed": i, **SMALL,
                                 "sampler_name": "Euler"} for i in range(2)],
                              {"id": "plain", "prompt": "a cat", "seed": 5, **SMALL, "sampler_name": "Euler"}))
    grouped = BatchWorker(pipe, 2)
    rows = [grouped._prepare(j) for j in jobs]
    assert [r.cond.per_step for r in rows] == [True, True, False]
    assert [[r.job.id for r in b] for b in grouped._batches(rows)] == [["e0", "e1"], ["plain"]]
    together = grouped.sample(rows[:2]).latents
    alone_within_reorder_bound(pipe, together, jobs[:2])


def test_at_a_fixed_group_size_an_image_does_not_depend_on_its_companions(pipe, tmp_path):
    target = {"id": "t", "prompt": "a lighthouse", "seed": 11, **SMALL}
    others = [{"id": f"o{i}", "prompt": f"thing {i}", "seed": 20 + i, **SMALL} for i in range(2)]
    alone = tritonsd.batch(lines(target), tmp_path / "alone", pipe=pipe, group_size=3)
    crowd = tritonsd.batch(lines(*others, target), tmp_path / "crowd", pipe=pipe, group_size=3)
    assert alone.written == ["t"] and sorted(crowd.written) == ["o0", "o1", "t"]
    assert (tmp_path / "alone" / "t.png").read_bytes() == (tmp_path / "crowd" / "t.png").read_bytes()


def test_interrupted_run_resumes_each_image_once(pipe, tmp_path):
    jobs = lines(*[{"id": f"j{i}", "prompt": f"p{i}", "seed": i, **SMALL} for i in range(5)], "bad")
    out = tmp_path / "out"
    seen = []

    def stop_after_two(result):
        seen.append(result)
        if len([r for r in seen if getattr(r, "png", None)]) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tritonsd.batch(jobs, out, pipe=pipe, on_result=stop_after_two)
    first = {p.name: p.read_bytes() for p in out.glob("*.png")}
    assert sorted(first) == ["j0.png", "j1.png"]
    (out / ".tritonsd-batch-999999-dead.tmp").write_bytes(b"half a png")  # a killed run's temporary

    report = tritonsd.batch(jobs, out, pipe=pipe)
    assert sorted(report.skipped) == ["j0", "j1"] and sorted(report.written) == ["j2", "j3", "j4"]
    assert {n: (out / n).read_bytes() for n in first} == first
    by_line = rows_by_line(out)
    assert sorted(by_line) == [1, 2, 3, 4, 5, 6] and "invalid JSON" in by_line[6]["error"]
    assert all(by_line[i]["file"] == f"j{i - 1}.png" for i in range(1, 6))
    assert not list(out.glob("*.tmp"))


def test_job_loras_are_applied_and_recorded(pipe, fixtures, tmp_path):
    lora = fixtures / "lora-sd1-tiny.safetensors"
    report = tritonsd.batch(lines({"id": "plain", "seed": 5, **SMALL},
                                  {"id": "lora", "seed": 5, **SMALL, "loras": [{"path": str(lora), "weight": 0.7}]},
                                  {"id": "plain2", "seed": 5, **SMALL}), tmp_path, pipe=pipe)
    assert sorted(report.written) == ["lora", "plain", "plain2"]
    with Image.open(tmp_path / "lora.png") as a, Image.open(tmp_path / "plain.png") as b:
        assert "Lora hashes" in a.info["parameters"] and "Lora hashes" not in b.info["parameters"]
        assert a.tobytes() != b.tobytes()
    # the LoRA is taken off again for the next job (same settings and seed, other id: the same file)
    assert (tmp_path / "plain2.png").read_bytes() == (tmp_path / "plain.png").read_bytes()


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_reports_bad_lines_and_exits_1(fixtures, tmp_path, capsys):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"id": "ok", **SMALL}) + "\n" + json.dumps({"id": "evil\x1b[2J", **SMALL}) + "\n")
    rc = cli_main(["batch", str(jobs), "--out", str(tmp_path / "out"), "--checkpoint",
                   str(fixtures / "sd1-tiny.safetensors"), "--config", str(fixtures / "sd1-tiny.yaml"),
                   "--text-heads", "2", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 1 and (tmp_path / "out" / "ok.png").is_file()
    assert "line 2" in err and "control character" in err and "\x1b" not in err
    assert "1 written, 0 already done, 1 failed" in err


@pytest.mark.parametrize("flags, code, words", [
    (["--group-size", "0"], 2, "--group-size must be at least 1"),
    (["--workers", "2"], 2, "--workers applies to --ray"),
    (["--device", "cpu", "--dtype", "fp16"], 2, "--dtype fp16 needs --device cuda"),
])
def test_cli_usage_errors(tmp_path, capsys, flags, code, words):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("{}\n")
    rc = cli_main(["batch", str(jobs), "--out", str(tmp_path / "o"), "--checkpoint", "demo:sd1", *flags])
    assert rc == code and words in capsys.readouterr().err


def test_cli_missing_inputs_fail_in_one_line(tmp_path, capsys):
    rc = cli_main(["batch", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o"), "--checkpoint", "demo:sd1"])
    err = capsys.readouterr().err
    assert rc == 1 and "jobs file not found" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "jobs.jsonl").write_text("{}\n")
    rc = cli_main(["batch", str(tmp_path / "jobs.jsonl"), "--out", str(tmp_path / "o"), "--checkpoint",
                   str(tmp_path / "missing.safetensors")])
    err = capsys.readouterr().err
    assert rc == 1 and "checkpoint not found" in err and len(err.strip().splitlines()) == 1


def test_two_runs_never_share_an_output_directory(tmp_path):
    from tritonsd.batch.output import OutputDir, OutputError

    with OutputDir(tmp_path):
        with pytest.raises(OutputError, match="another tritonsd batch run"):
            OutputDir(tmp_path)


def test_local_ray_declares_cpus_beyond_the_actors(monkeypatch):
    from tritonsd.batch import ray_run

    calls = []

    class FakeRay:
        @staticmethod
        def is_initialized():
            return False

        @staticmethod
        def init(**kw):
            calls.append(kw)

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert ray_run.connect(FakeRay, "local", 3) is True
    assert calls[0]["num_cpus"] >= 3 + 1 and calls[0]["num_gpus"] == 0


def test_throughput_script_writes_a_record(tmp_path):
    from tritonsd.batch.throughput import main

    out = tmp_path / "r.json"
    assert main(["--checkpoint", "demo:sd1", "--size", "64", "--steps", "1", "--images", "3", "--group-sizes", "1",
                 "2", "--device", "cpu", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert [r["group_size"] for r in record["rows"]] == [1, 2]
    assert all(r["images"] == 3 and r["images_per_hour"] > 0 for r in record["rows"])


def test_tritonsd_batch_is_callable_before_and_after_import():
    import subprocess
    import sys

    code = ("import tritonsd; a = tritonsd.batch; import tritonsd.batch.run; b = tritonsd.batch; "
            "print(callable(a), a is b, a.seed_from_id('fox') == b.seed_from_id('fox'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["True", "True", "True"], out.stderr
