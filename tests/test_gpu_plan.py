"""The prepared GPU run's planner: the committed cost data plans stages 0-4 within 360 s from a cold start, a
stage that does not fit the budget is skipped and named, --only selects what to rerun; the cache archive
round-trips and refuses paths outside its root; the runner survives a failing, raising or unrunnable stage (one
line why, the next stage runs); the shell script's dry run."""

from __future__ import annotations

import copy
import io
import json
import os
import subprocess
import sys
import tarfile
from types import SimpleNamespace

import pytest

from benchmarks import gpu_plan as G


@pytest.fixture(scope="module")
def costs():
    return G.load_costs()


def fake_costs(run_s: float = 10.0) -> dict:
    """Round numbers: every stage runs ``run_s``, 1 s per process start, no compile or tuning to speak of."""
    groups = {g: {"variants": 1, "tasks": {"fp16": {"conv": 1}}, "tuning_keys": 0, "tuning_configs": 0}
              for g in ("sd15-fp16", "sd21-fp16", "sdxl-fp16", "bench-fp16", "tiny-fp32", "tiny-half")}
    return {"measured": {"compile_s_per_task": {"fp16": {"conv": 0.0}}, "compile_s_default": 0.0,
                         "speedup_2_workers": 2.0},
            "counts": groups,
            "assumed": {"setup_s": 0.0, "process_start_s": 0.0, "cache_hit_s_per_task": 0.0, "tune_s_per_config": 0.0,
                        "gpu_machine_cores": 16, "run_s": {s.run_s: run_s for s in G.STAGES}}}


def test_cold_plan_of_stages_0_to_4_fits_360_s(costs):
    """From a cold start (setup, the parallel precompile and stages 1-4), with the committed measurements."""
    estimates = G.plan(G.parse_only("1-4"), costs, warm=False)
    assert [e.stage for e in estimates] == [0, 1, 2, 3, 4]
    total = costs["assumed"]["setup_s"] + sum(e.seconds for e in estimates)
    assert total <= G.COLD_LIMIT_S, G.format_plan(estimates, [], costs, False, G.DEFAULT_BUDGET_S)


def test_plan_is_built_from_the_compile_data_and_a_warm_start_plans_less(costs):
    estimates = G.plan(G.parse_only("1-4"), costs, warm=False)
    assert estimates[0].parts["compile"] > 0  # stage 0 carries the parallel compile
    more = copy.deepcopy(costs)
    more["measured"]["compile_s_per_task"]["fp16"]["conv"] *= 2
    assert G.plan([0], more)[0].seconds > estimates[0].seconds
    warm = G.plan(G.parse_only("1-4"), costs, warm=True)
    assert sum(e.seconds for e in warm) < sum(e.seconds for e in estimates)


@pytest.mark.slow  # benchmarks/gpu_plan.py in a subprocess
def test_committed_counts_are_what_the_models_need(costs):
    """The counts the estimate uses match a fresh count of the same group (the sd15 fp16 UNet step, VAE decode
    and text layer), made in a process without the interpreter (which ships one config per kernel)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(G.ROOT / "benchmarks" / "gpu_plan.py"), "count", "--group", "sd15-fp16"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    fresh = json.loads(out.stdout)["sd15-fp16"]
    assert fresh == costs["counts"]["sd15-fp16"]
    assert G._n(fresh["tasks"]) > fresh["variants"]  # autotuned kernels compile several configs each


def test_budget_skips_and_names_the_stage_that_would_not_fit():
    costs = fake_costs(run_s=100.0)
    estimates = G.plan([0, 1, 2, 3], costs)
    budget = 4 * 100.0 + G.ARCHIVE_RESERVE_S - 1  # one stage too many
    todo, skipped = G.fit(estimates, budget, setup_s=0.0)
    assert [e.stage for e in todo] == [0, 1, 2] and [e.stage for e in skipped] == [3]
    text = G.format_plan(todo, skipped, costs, False, budget)
    assert "SKIP 3 cuda-tests" in text and "skipped (would not finish in the budget): 3 cuda-tests" in text


def test_a_smaller_later_stage_still_runs_after_a_skip():
    costs = fake_costs(run_s=50.0)
    costs["assumed"]["run_s"]["diffusers_compile"] = 1000.0
    todo, skipped = G.fit(G.plan([4, 5, 6], costs), budget=200.0, setup_s=0.0)
    assert [e.stage for e in todo] == [4, 6] and [e.stage for e in skipped] == [5]


def test_stages_1_to_4_are_skipped_with_the_precompile():
    costs = fake_costs(run_s=10.0)
    costs["assumed"]["run_s"]["precompile"] = 1000.0
    todo, skipped = G.fit(G.plan([0, 1, 4, 6], costs), budget=500.0, setup_s=0.0)
    assert [e.stage for e in todo] == [6] and [e.stage for e in skipped] == [0, 1, 4]


def test_only_selects_stages_and_brings_the_precompile_along():
    assert G.parse_only(None) == [s.number for s in G.STAGES]
    assert G.parse_only("3") == [0, 3]
    assert G.parse_only("1,3-4") == [0, 1, 3, 4]
    assert G.parse_only("6, 7") == [6, 7]  # nothing of 1-4: no precompile
    for bad in ("x", "12", "2-x"):
        with pytest.raises(G.PlanError):
            G.parse_only(bad)


def test_tuning_is_paid_once_per_group():
    costs = fake_costs()
    costs["counts"]["sd15-fp16"]["tuning_configs"] = 100
    costs["assumed"]["tune_s_per_config"] = 0.5
    both = G.plan([1, 4], costs)
    assert both[0].parts["tuning"] == 50.0 and "tuning" not in both[1].parts
    alone = G.plan([4], costs)  # rerun alone: stage 4 tunes them itself
    assert alone[0].parts["tuning"] == 50.0


def test_parallel_speedup_extrapolation():
    assert G.parallel_speedup(2.0, 16) == pytest.approx(16.0)
    assert G.parallel_speedup(1.0, 16) == pytest.approx(1.0)
    s = G.parallel_speedup(1.6, 16)  # p = 0.75
    assert s == pytest.approx(1 / (0.25 + 0.75 / 16))


def test_cli_plan_and_bad_flags(capsys, tmp_path):
    assert G.main(["plan", "--only", "6", "--budget", "10000"]) == 0
    out = capsys.readouterr().out
    assert "run  6 bench-kernels" in out and "cold start" in out
    assert G.main(["plan", "--budget", "-1"]) == 2
    assert "--budget" in capsys.readouterr().err
    assert G.main(["plan", "--costs", str(tmp_path / "none.json")]) == 2
    assert "cost data unreadable" in capsys.readouterr().err


def test_archive_round_trip_in_parts(tmp_path, monkeypatch):
    root = tmp_path / "c" / "cache"
    (root / "triton" / "abc").mkdir(parents=True)
    payload = bytes(range(256)) * 400  # ~100 KB, incompressible enough to need several small parts
    (root / "triton" / "abc" / "k.cubin").write_bytes(payload)
    (root / "tritonsd" / "tuning").mkdir(parents=True)
    (root / "tritonsd" / "tuning" / "t.json").write_text(json.dumps({"entries": {}}))
    monkeypatch.setattr(G, "ARCHIVE_PART_BYTES", 1000)
    out = tmp_path / "out"
    out.mkdir()
    parts = G.write_archive(root, out)
    assert len(parts) > 1 and all((out / p).stat().st_size <= 1000 for p in parts)
    restored = tmp_path / "r" / "cache"
    assert G.restore_archive(out, restored)
    assert (restored / "triton" / "abc" / "k.cubin").read_bytes() == payload
    assert json.loads((restored / "tritonsd" / "tuning" / "t.json").read_text()) == {"entries": {}}
    assert not G.restore_archive(tmp_path / "empty", restored)


def test_archive_with_an_escaping_path_is_refused(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("../evil")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    src = tmp_path / "in"
    src.mkdir()
    (src / "gpu-cache.tar.gz.00").write_bytes(buf.getvalue())
    with pytest.raises(G.PlanError, match="unsafe"):
        G.restore_archive(src, tmp_path / "r" / "cache")
    assert not (tmp_path / "r" / "evil").exists() and not (tmp_path / "evil").exists()


def test_stage_commands_name_their_outputs():
    for stage in G.STAGES:
        assert stage.commands and stage.run_s
        filled = [G._fill(c, json="/w/s.json", xml="/w/s.xml", fix="/f", commit="abc") for c in stage.commands]
        assert all("{" not in c for c in filled), filled
    assert any("--git-commit abc" in c for s in G.STAGES for c in
               (G._fill(x, json="j", xml="x", fix="f", commit="abc") for x in s.commands))
    assert set(G.PRECOMPILED) <= set(fake_costs()["counts"])


# ---- the runner: one stage's failure never costs the next ----------------------------------------------------------

def two_stages(monkeypatch, tmp_path, first: str, first_modules=()):
    """Stages 1 and 2 replaced by shell one-liners (stage 2 writes its JSON); results under tmp_path."""
    monkeypatch.setattr(G, "STAGES", (
        G.Stage(1, "first", "the one that goes wrong", (first,), run_s="correctness", modules=first_modules),
        G.Stage(2, "second", "the one after it", ("echo '{{\"ok\": true}}' > {json}",), run_s="parity"),
    ))
    monkeypatch.setattr(G, "RESULTS_DIR", tmp_path / "results")
    return SimpleNamespace(out=str(tmp_path / "out"), fixtures=str(tmp_path / "fix"),
                           cache_root=str(tmp_path / "c" / "cache"), warm=False, budget=500.0, git_commit="abc")


def ran(tmp_path) -> dict:
    summary = json.loads((tmp_path / "out" / "gpu-run.json").read_text())
    return {r["stage"]: r for r in summary["stages"]}, summary


def test_a_failing_stage_is_named_and_the_next_one_runs(monkeypatch, tmp_path, capsys):
    args = two_stages(monkeypatch, tmp_path, "exit 3")
    assert G.execute([1, 2], fake_costs(run_s=10.0), args) == 1
    stages, _ = ran(tmp_path)
    assert stages[1]["status"] == "failed" and stages[1]["why"] == "command 1 of 1 exited 3"
    assert stages[2]["status"] == "ok" and stages[2]["result"] == {"ok": True}
    assert json.loads((tmp_path / "results" / "gpu-stage2-second.json").read_text()) == {"ok": True}
    out = capsys.readouterr().out
    assert "[stage 1] failed in" in out and "command 1 of 1 exited 3" in out and "[stage 2] ok in" in out
    assert "--only 1\n" in out  # what to rerun


def test_a_stage_that_raises_is_an_error_and_the_next_one_runs(monkeypatch, tmp_path, capsys):
    args = two_stages(monkeypatch, tmp_path, "true")
    real = G.run_stage

    def run_stage(stage, *a):
        if stage.number == 1:
            raise OSError(28, "No space left on device")
        return real(stage, *a)
    monkeypatch.setattr(G, "run_stage", run_stage)
    monkeypatch.setattr(G, "write_archive", lambda *a: (_ for _ in ()).throw(OSError("archive: disk full")))
    (tmp_path / "c" / "cache").mkdir(parents=True)
    assert G.execute([1, 2], fake_costs(run_s=10.0), args) == 1
    stages, summary = ran(tmp_path)
    assert stages[1]["status"] == "error" and "No space left on device" in stages[1]["why"]
    assert stages[2]["status"] == "ok"
    assert "disk full" in summary["archive_error"]  # the archive failing is a note, not the end of the run
    out = capsys.readouterr().out
    assert "[stage 1] error in" in out and "note: cache archive not written: OSError: archive: disk full" in out


def test_a_stage_missing_a_package_is_skipped_before_planning(monkeypatch, tmp_path, capsys):
    args = two_stages(monkeypatch, tmp_path, "true", first_modules=("tritonsd_no_such_package",))
    assert G.execute([1, 2], fake_costs(run_s=10.0), args) == 1
    stages, summary = ran(tmp_path)
    assert list(stages) == [2] and stages[2]["status"] == "ok"
    (skip,) = summary["skipped"]
    assert skip["stage"] == 1 and "needs tritonsd_no_such_package" in skip["why"]
    assert "skipped (cannot run here): 1 first: needs tritonsd_no_such_package" in capsys.readouterr().out


def test_stage_requirements_name_what_is_missing(tmp_path):
    e2e = G.stage_by_number(4)
    assert G.missing(e2e, tmp_path) == f"fixture files missing from {tmp_path}: manifests/sd15.json"
    (tmp_path / "manifests").mkdir()
    (tmp_path / "manifests" / "sd15.json").write_text("{}")
    assert G.missing(e2e, tmp_path) is None
    peer = G.Stage(9, "peer", "", ("true",), modules=("tritonsd_no_such_package",))
    assert "needs tritonsd_no_such_package" in G.missing(peer, None)
    wheels = tmp_path / "whl"
    wheels.mkdir()
    (wheels / "tritonsd_no_such_package-1.0-py3-none-any.whl").write_bytes(b"")
    assert G.missing(peer, None, wheels) is None  # a dry run: carried, not yet installed


def test_restore_of_an_unusable_archive_is_one_line_and_a_cold_start(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    assert G.main(["restore", "--from", str(src), "--to", str(tmp_path / "c" / "cache")]) == 1  # none carried
    (src / "gpu-cache.tar.gz.00").write_bytes(b"not a tar file")
    assert G.main(["restore", "--from", str(src), "--to", str(tmp_path / "c" / "cache")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gpu_plan: cache archive not restored, starting cold:") and "\n" not in err


def test_gpu_run_dry_run_plans_and_names_what_is_missing(tmp_path):
    env = {**os.environ, "TRITONSD_FIXTURES": str(tmp_path / "nofixtures")}
    proc = subprocess.run(["bash", str(G.ROOT / "benchmarks" / "gpu_run.sh"), "--dry-run", "--only", "2,6"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "GPU run plan (cold start)" in proc.stdout and "bench-kernels" in proc.stdout
    assert "skipped (cannot run here): 2 parity: fixture files missing" in proc.stdout
    bad = subprocess.run(["bash", str(G.ROOT / "benchmarks" / "gpu_run.sh"), "--budget"], capture_output=True,
                         text=True, env=env, timeout=60)
    assert bad.returncode == 2 and "--budget needs a value" in bad.stderr
