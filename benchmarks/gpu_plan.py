"""The prepared GPU run (``benchmarks/gpu_run.sh``): its stages in priority order, their time estimates, the budget.

GPU time comes in short windows on a bare machine (issue 11): so the run is planned before it starts. Each
stage's estimate is built from committed data (``benchmarks/data/gpu_costs.json``):

* compile counts: the kernel variants x autotune configs each stage needs, counted here by walking the models
  on the meta device (:func:`count`; ``python3 benchmarks/gpu_plan.py count --write`` refreshes them);
* per-task compile seconds for sm_90 per kernel and dtype, measured without a GPU (``tritonsd check-compile``
  and ``tritonsd warmup --arch sm_90``), and the parallel speed-up measured with 1 and 2 workers on a 2-core
  machine, extrapolated to the GPU machine's cores by Amdahl's law;
* assumed constants (process start, tuning seconds per config, run seconds), named as assumptions.

Stage 0 compiles what stages 1-4 need in parallel (``tritonsd warmup``), so they start warm; a restored cache
archive (``--cache-archive``, written after every stage) makes it nearly free. ``run`` executes the selected
stages (``--only``) in order, skips (and names) a stage whose estimate does not fit the budget left, stops a
stage that runs past the budget, and rewrites ``gpu-run.json`` (every stage's status and its results) after
each stage; each stage's own JSON also goes to ``benchmarks/results/``.

Nothing one stage does may cost the stages after it: a stage whose packages (diffusers, pytest) or fixture files
are missing is skipped before the budget is shared out, with its reason; a stage that fails, times out or raises
prints one line saying why and the next stage runs; a failed archive write is one line too.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data" / "gpu_costs.json"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
COLD_LIMIT_S = 360  # stages 0-4 from a cold start (issue 11)
DEFAULT_BUDGET_S = 560  # one device command runs at most 600 s: leave room for the archive and the transfer
ARCHIVE_RESERVE_S = 20  # kept back from the budget for writing the cache archive
ARCHIVE_PART_BYTES = 15 * 2 ** 20  # files coming back from the machine are capped at 16 MiB each


class PlanError(ValueError):
    """A plan that cannot be made as asked (unknown stage, bad budget, missing cost data)."""


# ---------------------------------------------------------------- stages


@dataclass(frozen=True)
class Stage:
    number: int
    name: str
    what: str
    commands: tuple[str, ...]  # shell commands, run in order from the repository root; {json} {xml} {fix} {commit}
    compiles: tuple[str, ...] = ()  # the compile-count groups this stage compiles itself (serially, in-process)
    tunes: tuple[str, ...] = ()  # the count groups whose autotune keys this stage tunes first
    run_s: str = ""  # the key of its assumed run time (``assumed.run_s``)
    processes: int = 1  # python processes it starts (each pays ``assumed.process_start_s``)
    modules: tuple[str, ...] = ()  # packages every command needs (the stage is skipped without them)
    fixtures: tuple[str, ...] = ()  # files under the fixtures directory it reads (likewise)

    @property
    def slug(self) -> str:
        return f"stage{self.number}-{self.name}"


TESTS_CUDA = ("tests/test_graph.py::test_graph_replay_equals_eager_loop_cuda "
              "tests/test_pipeline_graph.py::test_graph_loop_equals_eager_cuda "
              "tests/test_pipeline_graph.py::test_moved_weights_get_a_new_runner_cuda "
              "tests/test_lora_pipeline.py::test_switching_under_cuda_graphs_captures_once "
              "tests/test_hoist.py::test_captured_loop_with_hoists_follows_a_prompt_and_a_weight_change_cuda "
              "tests/test_controlnet_graph.py::test_graph_replay_with_control_equals_eager_cuda")
TESTS_PREVIEW = ("tests/test_preview.py::test_a_cuda_preview_does_not_synchronize_the_loop "
                 "tests/test_preview.py::test_previews_of_a_replayed_graph_do_not_synchronize_the_loop "
                 "tests/test_pipeline_graph.py::test_graph_previews_equal_eager_previews_cuda")
UNTUNED = "TRITONSD_AUTOTUNE=0"  # correctness runs: one config per kernel variant (no tuning, a third of the compiles)
E2E = "python3 -m tritonsd.tools.cli bench e2e --git-commit {commit} --steps 20 --repeat 10 --sampler dpmpp_2m"

STAGES = (
    Stage(0, "precompile", "compile every kernel variant stages 1-4 need, in parallel on all cores (no GPU work)",
          ("python3 -m tritonsd.tools.cli warmup --model sd15 --size 512x512 --batch 1,2 --dtype fp16",
           f"{UNTUNED} python3 -m tritonsd.tools.cli warmup {{fix}}/sd1-tiny.safetensors --size 128x128 "
           "--batch 2 --dtype fp32 --no-vae",
           f"{UNTUNED} python3 -m tritonsd.tools.cli warmup {{fix}}/sd1-tiny.safetensors --size 64x64 "
           "--batch 2,4 --dtype fp16",
           f"{UNTUNED} python3 -m tritonsd.tools.cli warmup {{fix}}/sd1-tiny.safetensors --size 128x128 "
           "--batch 2 --dtype fp16",
           f"{UNTUNED} python3 -m tritonsd.tools.cli warmup {{fix}}/sd1-tiny.safetensors --size 128x128 "
           "--batch 2 --dtype bf16"),
          run_s="precompile", processes=4),
    Stage(1, "kernels-fp16", "fp16 correctness of every kernel at SD 1.5 shapes vs torch (fresh random inputs, "
                             "outputs poisoned first, relative error <= 1e-2)",
          ("python3 benchmarks/gpu_correctness.py --dtype fp16 --models sd15-512,text --git-commit {commit} "
           "--json {json}",), tunes=("sd15-fp16",), run_s="correctness"),
    Stage(2, "parity", "GPU parity of the tiny fixtures: the fp32 set (text and UNet of sd1-tiny) within 1e-4 "
                       "(tritonsd parity), the whole model in fp16 / bf16 within "
                       "the half-precision bounds (test_precision)",
          (f"{UNTUNED} python3 -m tritonsd.tools.cli parity {{fix}}/sd1-tiny.safetensors --reference "
           "{fix}/sd1-tiny.reference.safetensors --device cuda --only tokens,text,unet --json {json}",
           f"{UNTUNED} python3 -m pytest -q -p no:cacheprovider tests/test_precision.py -k "
           "half_model_close_to_float32_cuda --junitxml {xml}"),
          run_s="parity", processes=2, fixtures=("sd1-tiny.safetensors", "sd1-tiny.reference.safetensors")),
    Stage(3, "cuda-tests", "pytest: CUDA-graph replay == eager, LoRA switching and ControlNet under graphs "
                           "capture once",
          (f"{UNTUNED} python3 -m pytest -q -p no:cacheprovider {TESTS_CUDA} --junitxml {{xml}}",),
          run_s="cuda_tests", modules=("pytest",), fixtures=("sd1-tiny.safetensors", "lora-sd1-tiny.safetensors",
                                                             "controlnet-sd1-tiny.safetensors")),
    Stage(4, "e2e-sd15", "SD 1.5 512x512 batch 1: tritonsd (graph) vs diffusers eager; warm-up (compile + tuning) "
                         "recorded apart from the first image",
          (f"{E2E} --model sd15 --batch 1 --impl tritonsd-graph --impl diffusers-eager --json {{json}}",),
          tunes=("sd15-fp16",), run_s="e2e_sd15", fixtures=("manifests/sd15.json",)),
    Stage(5, "diffusers-compile", "SD 1.5 512x512 batch 1: diffusers compiled with diffusion-fast's recipe "
                                  "(its compile time is not known without a GPU: assumed)",
          (f"{E2E} --model sd15 --batch 1 --impl diffusers-compile --json {{json}}",), run_s="diffusers_compile",
          modules=("diffusers",), fixtures=("manifests/sd15.json",)),
    Stage(6, "bench-kernels", "tritonsd bench kernels (fp16): every kernel against its peers",
          ("python3 -m tritonsd.tools.cli bench kernels --dtype fp16 --git-commit {commit} --json {json}",),
          compiles=("bench-fp16",), tunes=("bench-fp16",), run_s="bench_kernels"),
    Stage(7, "e2e-sd21-sdxl", "SD 2.1 768x768 and SDXL 1024x1024 batch 1: tritonsd vs diffusers eager",
          (f"{E2E} --model sd21 --model sdxl --batch 1 --impl tritonsd-graph --impl diffusers-eager "
           "--json {json}",), compiles=("sd21-fp16", "sdxl-fp16"), tunes=("sd21-fp16", "sdxl-fp16"),
          run_s="e2e_sd21_sdxl", fixtures=("manifests/sd21-v.json", "manifests/sdxl-base.json")),
    Stage(8, "e2e-sd15-hires", "SD 1.5 hires fix 512x512 -> 1024x1024 batch 1 (latent upscale, 20 + 20 steps at "
                               "strength 0.7): both loops CUDA-graphed, the second pass's time as hires_ms",
          (f"{E2E} --model sd15 --batch 1 --impl tritonsd-graph --hires-scale 2 --repeat 3 --json {{json}}",),
          compiles=("sd15-1024-fp16",), tunes=("sd15-fp16", "sd15-1024-fp16"), run_s="e2e_sd15_hires",
          fixtures=("manifests/sd15.json",)),
    Stage(9, "controlnet-share", "SD 1.5 512x512 batch 1: the ControlNet's share of a step with 0 / 1 / 2 units "
                                 "(random full-size ControlNets), eager and captured; another image / weight / "
                                 "start / end replays the captured loop, equal to a fresh eager run",
          ("python3 benchmarks/controlnet_share.py --model sd15 --size 512 --steps 20 --repeat 5 --check "
           "--git-commit {commit} --json {json}",),
          tunes=("sd15-fp16",), run_s="controlnet_share", fixtures=("manifests/sd15.json",)),
    Stage(10, "previews", "live previews' cost: SD 1.5 512x512 time per step with previews off / every 10 / every "
                          "step, graphed and eager (CUDA events); pytest: graph previews == eager, no sync",
          ("python3 benchmarks/preview_cost.py --model sd15 --size 512 --steps 20 --repeat 5 --json {json}",
           f"{UNTUNED} python3 -m pytest -q -p no:cacheprovider {TESTS_PREVIEW} --junitxml {{xml}}"),
          tunes=("sd15-fp16",), run_s="previews", processes=2, modules=("pytest",),
          fixtures=("manifests/sd15.json", "sd1-tiny.safetensors")),
    Stage(11, "fusions", "issue 22's fusions: every fused GEMM (LayerNorm prologue, GEGLU / residual epilogues, "
                         "q/k/v in one) and GroupNorm-prologue conv vs its float32 reference, stage timings fused vs "
                         "the launches it replaces, and the SD 1.5 step with all fusions, each one off, and all off",
          ("python3 benchmarks/gpu_fusions.py --dtype fp16 --models sd15-512 --step sd15 --git-commit {commit} "
           "--json {json}",), tunes=("sd15-fp16",), run_s="fusions"),
)
PRECOMPILED = ("sd15-fp16", "tiny-fp32", "tiny-half")  # what stage 0 compiles
UNTUNED_GROUPS = ("tiny-fp32", "tiny-half")  # compiled and run with TRITONSD_AUTOTUNE=0


def stage_by_number(n: int) -> Stage:
    for s in STAGES:
        if s.number == n:
            return s
    raise PlanError(f"no stage {n} (stages: {', '.join(str(s.number) for s in STAGES)})")


def parse_only(text: str | None) -> list[int]:
    """``1,3-4`` -> [1, 3, 4]; None -> every stage. Stage 0 (precompile) comes along with any of 1-4 unless
    the cache archive was restored (then it costs little: every compile is a hit)."""
    if text is None:
        return [s.number for s in STAGES]
    out: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            lo, _, hi = part.partition("-")
            first, last = int(lo), int(hi or lo)
        except ValueError:
            raise PlanError(f"--only {text!r}: expected stage numbers like 1,3-4") from None
        for n in range(first, last + 1):
            out.add(stage_by_number(n).number)
    if out & {1, 2, 3, 4}:
        out.add(0)
    return sorted(out)


def _importable(module: str, wheels: Path | None) -> bool:
    """Whether ``module`` imports here, or (a dry run, before the wheels are installed) is carried in ``wheels``."""
    if importlib.util.find_spec(module) is not None:
        return True
    name = module.replace("-", "_").lower()
    return wheels is not None and any(w.name.lower().startswith(name + "-") for w in wheels.glob("*.whl"))


def missing(stage: Stage, fixtures: Path | None, wheels: Path | None = None) -> str | None:
    """Why ``stage`` cannot run here (one line), or None: a package that does not import, a fixture file that
    is not there. ``fixtures`` None: files are not checked."""
    gone = [m for m in stage.modules if not _importable(m, wheels)]
    if gone:
        return f"needs {', '.join(gone)}, which does not import (carry its wheel: benchmarks/gpu_prepare.sh)"
    if fixtures is not None:
        absent = [f for f in stage.fixtures if not (fixtures / f).is_file()]
        if absent:
            return f"fixture files missing from {fixtures}: {', '.join(absent)}"
    return None


def unrunnable(numbers: list[int], fixtures: Path | None, wheels: Path | None = None) -> dict[int, str]:
    """The selected stages that cannot run here, with why."""
    out = {}
    for n in numbers:
        why = missing(stage_by_number(n), fixtures, wheels)
        if why:
            out[n] = why
    return out


# ---------------------------------------------------------------- costs


def load_costs(path: Path = DATA) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PlanError(f"cost data unreadable: {path} ({e})") from None


def parallel_speedup(speedup_2: float, cores: int) -> float:
    """Amdahl's law: the parallel fraction p that gives ``speedup_2`` on 2 workers, applied to ``cores``."""
    speedup_2 = min(max(speedup_2, 1.0), 2.0)
    p = 2.0 * (1.0 - 1.0 / speedup_2)
    return 1.0 / ((1.0 - p) + p / cores)


def compile_seconds(tasks: dict, per_task: dict, default: float) -> float:
    """Serial seconds for ``tasks`` ({dtype: {kernel: n}}) at the measured per-task seconds."""
    total = 0.0
    for dtype, kernels in tasks.items():
        for kernel, n in kernels.items():
            total += n * per_task.get(dtype, {}).get(kernel, default)
    return total


@dataclass
class Estimate:
    stage: int
    name: str
    seconds: float
    parts: dict = field(default_factory=dict)


def estimate(stage: Stage, costs: dict, warm: bool = False, tuned: set | None = None) -> Estimate:
    """Seconds for one stage. ``warm``: the cache archive was restored (compiles and tuning are hits).
    ``tuned``: count groups already tuned by an earlier stage of this run (updated)."""
    measured, counts, assumed = costs["measured"], costs["counts"], costs["assumed"]
    per_task, default = measured["compile_s_per_task"], measured["compile_s_default"]
    cores = assumed["gpu_machine_cores"]
    parts = {"process_start": stage.processes * assumed["process_start_s"], "run": assumed["run_s"][stage.run_s]}
    if stage.number == 0:
        serial = sum(compile_seconds(counts[g]["tasks"], per_task, default) for g in PRECOMPILED)
        speedup = parallel_speedup(measured["speedup_2_workers"], cores)
        parts["compile"] = (assumed["cache_hit_s_per_task"] * sum(_n(counts[g]["tasks"]) for g in PRECOMPILED)
                            if warm else serial / speedup)
    if stage.compiles:  # compiled in-process by the JIT, one after another
        n = sum(_n(counts[g]["tasks"]) for g in stage.compiles)
        parts["compile"] = (assumed["cache_hit_s_per_task"] * n if warm else
                            sum(compile_seconds(counts[g]["tasks"], per_task, default) for g in stage.compiles))
    tuned = set() if tuned is None else tuned
    fresh = [g for g in stage.tunes if g not in tuned]
    tuned.update(stage.tunes)
    if fresh and not warm:
        configs = sum(counts[g]["tuning_configs"] for g in fresh)
        parts["tuning"] = configs * assumed["tune_s_per_config"]
    return Estimate(stage.number, stage.name, round(sum(parts.values()), 1),
                    {k: round(v, 1) for k, v in parts.items()})


def _n(tasks: dict) -> int:
    return sum(n for kernels in tasks.values() for n in kernels.values())


def plan(numbers: list[int], costs: dict, warm: bool = False) -> list[Estimate]:
    tuned: set = set()
    return [estimate(stage_by_number(n), costs, warm, tuned) for n in numbers]


def fit(estimates: list[Estimate], budget: float, setup_s: float) -> tuple[list[Estimate], list[Estimate]]:
    """(to run, skipped): in order, a stage whose estimate does not fit what is left is skipped; later, smaller
    stages may still run, except stages 1-4 without stage 0 (their estimates assume its compiles)."""
    left = budget - setup_s - ARCHIVE_RESERVE_S
    run, skipped = [], []
    for e in estimates:
        needs_precompile = 1 <= e.stage <= 4 and any(s.stage == 0 for s in skipped)
        if e.seconds <= left and not needs_precompile:
            run.append(e)
            left -= e.seconds
        else:
            skipped.append(e)
    return run, skipped


def format_plan(estimates: list[Estimate], skipped: list[Estimate], costs: dict, warm: bool, budget: float,
                cannot: dict[int, str] | None = None) -> str:
    setup = costs["assumed"]["setup_s"]
    lines = [f"GPU run plan ({'warm: cache archive restored' if warm else 'cold start'}), budget {budget:.0f} s, "
             f"setup {setup:.0f} s (wheels, cache restore)"]
    skipped_numbers = {e.stage for e in skipped}
    total = setup
    for e in sorted(estimates + skipped, key=lambda e: e.stage):
        parts = ", ".join(f"{k} {v:.0f}" for k, v in e.parts.items())
        mark = "SKIP" if e.stage in skipped_numbers else "run "
        if e.stage not in skipped_numbers:
            total += e.seconds
        lines.append(f"  {mark} {e.stage} {e.name:<18} {e.seconds:6.0f} s  ({parts})  "
                     f"{stage_by_number(e.stage).what}")
    first = setup + sum(e.seconds for e in estimates + skipped if e.stage <= 4)
    lines.append(f"  stages 0-4 (skipped or not): {first:.0f} s (limit {COLD_LIMIT_S} s); planned total {total:.0f} s")
    if not warm:
        per_task, default = costs["measured"]["compile_s_per_task"], costs["measured"]["compile_s_default"]
        groups = ", ".join(f"{g} {compile_seconds(costs['counts'][g]['tasks'], per_task, default):.0f} s "
                           f"({_n(costs['counts'][g]['tasks'])} tasks)" for g in PRECOMPILED)
        lines.append(f"  stage 0 serial compile: {groups}; parallel speed-up on "
                     f"{costs['assumed']['gpu_machine_cores']} cores "
                     f"{parallel_speedup(costs['measured']['speedup_2_workers'], costs['assumed']['gpu_machine_cores']):.1f}"
                     f" (from {costs['measured']['speedup_2_workers']:.2f} on 2)")
    if skipped:
        lines.append("  skipped (would not finish in the budget): " + ", ".join(
            f"{e.stage} {e.name} ({e.seconds:.0f} s)" for e in skipped))
    for n, why in sorted((cannot or {}).items()):
        lines.append(f"  skipped (cannot run here): {n} {stage_by_number(n).name}: {why}")
    return "\n".join(lines)


# ---------------------------------------------------------------- counting (without a GPU)


def _tiny_config():
    from tritonsd.formats.checkpoint import read_checkpoint_shapes
    from tritonsd.model.config import detect_config
    from tritonsd.testing.reference import fixtures_dir

    return detect_config(read_checkpoint_shapes(fixtures_dir() / "sd1-tiny.safetensors"), text_heads=2)


def count_groups(only: list[str] | None = None) -> dict:
    """Compile tasks ({dtype: {kernel: n}}) and autotune configs to time, per count group, walked on meta.
    Run it without ``TRITON_INTERPRET`` (the interpreter ships one config per kernel, not the GPU's)."""
    import torch

    from tritonsd.compile import precompile, shapes, variants

    fp16, bf16, fp32 = torch.float16, torch.bfloat16, torch.float32
    sd15, sd21, sdxl = (shapes.released(n) for n in ("sd15", "sd21", "sdxl"))
    groups = {
        "sd15-fp16": lambda: variants.model_launches(sd15, [sd15.size], (1, 2), fp16),
        "sd21-fp16": lambda: variants.model_launches(sd21, [sd21.size], (2,), fp16),
        "sdxl-fp16": lambda: variants.model_launches(sdxl, [sdxl.size], (2,), fp16),
        "sd15-1024-fp16": lambda: variants.model_launches(sd15, [(1024, 1024)], (2,), fp16),  # hires fix's 2x
        # the kernel benchmarks' SD 2.1 and SDXL cases (stage 0 compiled SD 1.5's): their models at batch 2
        "bench-fp16": lambda: (variants.model_launches(sd21, [sd21.size], (2,), fp16)
                               + variants.model_launches(sdxl, [sdxl.size], (2,), fp16)),
        # untuned (TRITONSD_AUTOTUNE=0): the fp32 parity set (sd1-tiny's text and UNet at 128 px, batch 2: fp32
        # convolutions compile slowly); the CUDA tests in fp16 (64 px) and the half-precision model test (fp16 /
        # bf16 at 128 px)
        "tiny-fp32": lambda: variants.model_launches(_tiny_config(), [(128, 128)], (2,), fp32, vae=False),
        "tiny-half": lambda: (variants.model_launches(_tiny_config(), [(64, 64)], (2, 4), fp16)
                              + variants.model_launches(_tiny_config(), [(128, 128)], (2,), fp16)
                              + variants.model_launches(_tiny_config(), [(128, 128)], (2,), bf16)),
    }
    out = {}
    for name, launches_of in groups.items():
        if only and name not in only:
            continue
        launches = launches_of()
        unique = variants.unique(launches)
        tasks: dict = {}
        untuned = name in UNTUNED_GROUPS
        for t in precompile.tasks_for(unique, ["sm_90"]):
            if untuned and t.config not in (None, 0):
                continue  # TRITONSD_AUTOTUNE=0: the first shipped config only
            dtype = _dtype(t.launch)
            kernel = t.launch.module.rsplit(".", 1)[-1]
            tasks.setdefault(dtype, {}).setdefault(kernel, 0)
            tasks[dtype][kernel] += 1
        keys = variants.unique(launches, lambda la: (la.name, la.tuning_key()))
        configs = 0
        for la in keys:
            kernel = la.resolve()
            n = len(getattr(kernel, "configs", ()) or ())
            configs += n if n > 1 and not untuned else 0
            if la.module.endswith(".linear") and not untuned:
                configs += 2  # the fused GEMM against cuBLAS apart, timed once per key (_triton.runs_apart)
        out[name] = {"variants": len(unique), "tasks": tasks, "tuning_keys": sum(1 for la in keys if la.tuning_key()),
                     "tuning_configs": configs}
    return out


def _dtype(launch) -> str:
    from tritonsd.compile.check_compile import _dtype_of

    return _dtype_of(launch)


# ---------------------------------------------------------------- running on the GPU machine


def _fill(command: str, **values: str) -> str:
    return command.format(**{k: shlex.quote(v) for k, v in values.items()})


def run_stage(stage: Stage, work: Path, fix: Path, commit: str, timeout: float) -> dict:
    """Run one stage's commands (each in its own process group, all stopped at ``timeout`` seconds); its JSON
    (and pytest's XML) are written in ``work`` and returned inside the result, and the JSON copied to
    ``benchmarks/results/``."""
    json_path, xml_path = work / f"{stage.slug}.json", work / f"{stage.slug}.xml"
    start = time.perf_counter()
    status, rcs, why = "ok", [], []
    for i, command in enumerate(stage.commands, 1):
        left = timeout - (time.perf_counter() - start)
        if left <= 0:
            status = "timeout"
            why.append(f"no time left for command {i} of {len(stage.commands)}")
            break
        cmd = _fill(command, json=str(json_path), xml=str(xml_path), fix=str(fix), commit=commit)
        print(f"[stage {stage.number}] $ {cmd}", flush=True)
        proc = subprocess.Popen(cmd, shell=True, cwd=ROOT, start_new_session=True)
        try:
            rcs.append(proc.wait(timeout=left))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            status = "timeout"
            why.append(f"command {i} of {len(stage.commands)} stopped at the budget ({timeout:.0f} s)")
            break
        if rcs[-1] != 0:  # the next command still runs: each one measures something of its own
            status = "failed"
            why.append(f"command {i} of {len(stage.commands)} exited {rcs[-1]}")
    result = {"stage": stage.number, "name": stage.name, "status": status, "returncodes": rcs,
              "seconds": round(time.perf_counter() - start, 1)}
    if why:
        result["why"] = "; ".join(why)
    if json_path.is_file():
        try:
            result["result"] = json.loads(json_path.read_text())
        except ValueError:
            result["result"] = None
        try:
            RESULTS_DIR.mkdir(parents=True, exist_ok=True)
            (RESULTS_DIR / f"gpu-{stage.slug}.json").write_text(json_path.read_text())
        except OSError as e:  # the copy is a convenience: gpu-run.json holds the result
            print(f"[stage {stage.number}] note: not copied to {RESULTS_DIR}: {_one_line(e)}", flush=True)
    if xml_path.is_file():
        result["pytest_junit_xml"] = xml_path.read_text(errors="replace")[:200_000]
    return result


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def write_archive(cache_root: Path, out: Path) -> list[str]:
    """The compile and tuning caches as one .tar.gz beside the JSON, split into parts under the 16 MiB cap
    (``gpu-cache.tar.gz.00``, ``.01``, ...); returns the part names."""
    for old in out.glob("gpu-cache.tar.gz.*"):
        old.unlink()
    whole = out / "gpu-cache.tar.gz.tmp"
    with tarfile.open(whole, "w:gz") as tar:
        tar.add(cache_root, arcname="cache")
    names = []
    with whole.open("rb") as f:
        for i in range(100):
            chunk = f.read(ARCHIVE_PART_BYTES)
            if not chunk:
                break
            name = f"gpu-cache.tar.gz.{i:02d}"
            (out / name).write_bytes(chunk)
            names.append(name)
    whole.unlink()
    return names


def restore_archive(parts_dir: Path, cache_root: Path) -> bool:
    """Unpack ``gpu-cache.tar.gz.NN`` parts (from an earlier run) into ``cache_root``; False when none."""
    parts = sorted(parts_dir.glob("gpu-cache.tar.gz.[0-9][0-9]"))
    if not parts:
        return False
    whole = cache_root.parent / "gpu-cache.restore.tar.gz"
    cache_root.parent.mkdir(parents=True, exist_ok=True)
    with whole.open("wb") as f:
        for p in parts:
            f.write(p.read_bytes())
    with tarfile.open(whole, "r:gz") as tar:
        for member in tar.getmembers():  # our own archive, but never write outside the cache root
            if member.name.startswith("/") or ".." in Path(member.name).parts or member.issym() or member.islnk():
                raise PlanError(f"unsafe path in the cache archive: {member.name!r}")
        tar.extractall(cache_root.parent)
    whole.unlink()
    return True


def execute(numbers: list[int], costs: dict, args) -> int:
    started = time.perf_counter()
    out, fix, cache_root = Path(args.out), Path(args.fixtures), Path(args.cache_root)
    out.mkdir(parents=True, exist_ok=True)
    work = cache_root.parent / "stages"  # not $OUT: at most 8 files come back, so $OUT holds gpu-run.json + archive
    work.mkdir(parents=True, exist_ok=True)
    warm = bool(args.warm)
    cannot = unrunnable(numbers, fix)  # before the budget is shared out: their time goes to the others
    estimates = plan([n for n in numbers if n not in cannot], costs, warm)
    todo, skipped = fit(estimates, args.budget, costs["assumed"]["setup_s"])
    print(format_plan(todo, skipped, costs, warm, args.budget, cannot), flush=True)
    summary = {"command": " ".join(sys.argv), "git_commit": args.git_commit, "budget_s": args.budget, "warm": warm,
               "plan": [asdict(e) for e in estimates],
               "skipped": [{"stage": n, "name": stage_by_number(n).name, "estimate_s": None, "why": why}
                           for n, why in sorted(cannot.items())]
               + [{"stage": e.stage, "name": e.name, "estimate_s": e.seconds,
                   "why": "would not finish in the budget"} for e in skipped],
               "stages": []}
    failed = bool(cannot)
    for e in todo:
        stage = stage_by_number(e.stage)
        left = args.budget - (time.perf_counter() - started) - ARCHIVE_RESERVE_S
        if left < min(e.seconds, 30):
            summary["skipped"].append({"stage": e.stage, "name": e.name, "estimate_s": e.seconds,
                                       "why": f"only {left:.0f} s left when its turn came"})
            print(f"[stage {e.stage}] skipped: {left:.0f} s left, estimate {e.seconds:.0f} s", flush=True)
            continue
        result = _run_guarded(stage, work, fix, args.git_commit or "unknown", left)
        result["estimate_s"] = e.seconds
        failed |= result["status"] != "ok"
        summary["stages"].append(result)
        why = f": {result['why']}" if result.get("why") else ""
        print(f"[stage {e.stage}] {result['status']} in {result['seconds']:.0f} s (estimate {e.seconds:.0f} s){why}",
              flush=True)
        summary["archive"] = _archive_guarded(cache_root, out, summary)
        summary["elapsed_s"] = round(time.perf_counter() - started, 1)
        _write_summary(out, summary)
    _write_summary(out, summary)
    again = sorted({r["stage"] for r in summary["stages"] if r["status"] != "ok"} | {s["stage"] for s in
                                                                                        summary["skipped"]})
    if again:
        print(f"rerun what failed or was skipped: benchmarks/gpu_run.sh --only {','.join(map(str, again))}", flush=True)
    return 1 if failed else 0


def _run_guarded(stage: Stage, work: Path, fix: Path, commit: str, timeout: float) -> dict:
    """``run_stage``, with anything it raises (a command that cannot start, a full disk, ...) turned into the
    stage's status: the next stage still runs."""
    start = time.perf_counter()
    try:
        return run_stage(stage, work, fix, commit, timeout)
    except Exception as e:  # noqa: BLE001 - one stage's failure must not end the window
        return {"stage": stage.number, "name": stage.name, "status": "error", "returncodes": [],
                "seconds": round(time.perf_counter() - start, 1), "why": _one_line(e)}


def _archive_guarded(cache_root: Path, out: Path, summary: dict) -> list[str]:
    """The cache archive's parts, or the previous ones (and a note) when writing it fails."""
    if not cache_root.is_dir():
        return []
    try:
        return write_archive(cache_root, out)
    except Exception as e:  # noqa: BLE001 - the next window just starts colder
        print(f"note: cache archive not written: {_one_line(e)}", flush=True)
        summary["archive_error"] = _one_line(e)
        return summary.get("archive", [])


def _write_summary(out: Path, summary: dict) -> None:
    try:
        (out / "gpu-run.json").write_text(json.dumps(summary, indent=1))
    except (OSError, TypeError, ValueError) as e:
        print(f"note: {out / 'gpu-run.json'} not written: {_one_line(e)}", flush=True)


def restore_command(parts_dir: Path, cache_root: Path) -> int:
    """``restore``: 0 when the archive was unpacked, 1 when there is none, 2 (one line why) when it is unusable;
    in every case the run goes on (cold without it)."""
    try:
        return 0 if restore_archive(parts_dir, cache_root) else 1
    except (PlanError, OSError, tarfile.TarError, EOFError) as e:
        print(f"gpu_plan: cache archive not restored, starting cold: {_one_line(e)}", file=sys.stderr)
        return 2


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python3 benchmarks/gpu_plan.py", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("plan", "run"):
        q = sub.add_parser(name, help="print the plan" if name == "plan" else "run the stages (on the GPU machine)")
        q.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds for the whole run")
        q.add_argument("--only", default=None, metavar="STAGES", help="e.g. 1,3-4 (default all)")
        q.add_argument("--warm", action="store_true", help="the cache archive was restored")
        q.add_argument("--costs", type=Path, default=DATA)
        if name == "plan":
            q.add_argument("--fixtures", type=Path, default=None,
                           help="also name the stages that could not run for want of these fixture files")
            q.add_argument("--wheels", type=Path, default=None, help="the carried wheels (.whl/), not yet installed")
        if name == "run":
            q.add_argument("--out", required=True, help="where the JSON and the cache archive go ($OUT)")
            q.add_argument("--fixtures", required=True, help="the carried fixtures directory")
            q.add_argument("--cache-root", required=True, help="the directory holding the Triton and tuning caches")
            q.add_argument("--git-commit", default=None)
    r = sub.add_parser("restore", help="unpack an earlier run's cache archive (exit 1: none, 2: unusable)")
    r.add_argument("--from", dest="parts", type=Path, required=True, help="where gpu-cache.tar.gz.NN are")
    r.add_argument("--to", dest="cache_root", type=Path, required=True, help="the cache root to unpack into")
    c = sub.add_parser("count", help="count the compile tasks and tuning configs per group (no GPU)")
    c.add_argument("--write", action="store_true", help=f"store them in {DATA.name}")
    c.add_argument("--group", action="append", default=None, help="only this group (repeatable)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "restore":
        return restore_command(args.parts, args.cache_root)
    try:
        if args.command == "count":
            if os.environ.get("TRITON_INTERPRET") == "1":
                raise PlanError("unset TRITON_INTERPRET: the interpreter ships one config per kernel")
            counts = count_groups(args.group)
            print(json.dumps(counts, indent=1))
            if args.write:
                costs = load_costs()
                costs["counts"].update(counts)
                DATA.write_text(json.dumps(costs, indent=1) + "\n")
            return 0
        if not math.isfinite(args.budget) or args.budget <= 0:
            raise PlanError(f"--budget must be a positive number of seconds, got {args.budget}")
        costs = load_costs(args.costs)
        numbers = parse_only(args.only)
        if args.command == "plan":
            cannot = unrunnable(numbers, args.fixtures, args.wheels)
            estimates = plan([n for n in numbers if n not in cannot], costs, args.warm)
            todo, skipped = fit(estimates, args.budget, costs["assumed"]["setup_s"])
            print(format_plan(todo, skipped, costs, args.warm, args.budget, cannot))
            return 0
        return execute(numbers, costs, args)
    except PlanError as e:
        print(f"gpu_plan: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
