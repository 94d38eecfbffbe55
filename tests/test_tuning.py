"""The persistent tuning cache: store, lookup in a later "process" (a new TuningCache on the same directory),
and invalidation by GPU name, triton version, kernel source and key, with a fake timer (no GPU); the launch path's
use of it (kernels/_triton.py: lookup, the tuner plugged in by ``tuning()``, CUDA-graph capture); and the layering
(nothing under kernels/ imports compile/)."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import triton

from tritonsd.compile import tuning, variants
from tritonsd.kernels import _triton, conv

CONFIGS = [triton.Config({"BLOCK": b}, num_warps=w, num_stages=2) for b, w in [(64, 4), (128, 4), (128, 8)]]
FAST = CONFIGS[1]


class FakeTimer:
    """Milliseconds per config: CONFIGS[1] is the fastest; counts the timings taken."""

    def __init__(self, fail=()):
        self.calls = 0
        self.fail = fail

    def __call__(self, config):
        self.calls += 1
        if config in self.fail:
            raise RuntimeError("out of resources")
        return {0: 2.0, 1: 1.0, 2: 3.0}[CONFIGS.index(config)]


def choose(root, timer, gpu="NVIDIA H200", version="3.6.0", source="src-a", key=(320, 64, "torch.float16"),
           configs=CONFIGS, tables_dir=None):
    cache = tuning.TuningCache(gpu, version, root=root, tables_dir=tables_dir)
    return tuning.choose(cache, "tritonsd.kernels.conv._conv2d_kernel", source, key, configs, timer)


def test_tuned_once_then_found_by_a_later_process(tmp_path):
    timer = FakeTimer()
    assert choose(tmp_path, timer) == (FAST, True)
    assert timer.calls == 3
    later = FakeTimer()
    assert choose(tmp_path, later) == (FAST, False)  # a new TuningCache reads the file: no timing at all
    assert later.calls == 0
    files = list((tmp_path / "tuning").iterdir())
    assert [f.name for f in files] == ["NVIDIA_H200-triton3.6.0.json"]
    data = json.loads(files[0].read_text())
    assert data["gpu"] == "NVIDIA H200" and data["triton"] == "3.6.0"


@pytest.mark.parametrize("changed", [{"gpu": "NVIDIA H100 80GB HBM3"}, {"version": "3.9.0"}, {"source": "src-b"},
                                     {"key": (320, 64, "torch.bfloat16")}, {"key": (640, 64, "torch.float16")}],
                         ids=["gpu", "triton", "source", "key-dtype", "key-shape"])
def test_any_change_is_a_miss(tmp_path, changed):
    choose(tmp_path, FakeTimer())
    timer = FakeTimer()
    assert choose(tmp_path, timer, **changed) == (FAST, True)
    assert timer.calls == 3
    again = FakeTimer()
    choose(tmp_path, again, **changed)
    assert again.calls == 0
    both = FakeTimer()
    choose(tmp_path, both)  # the first entry is still there
    assert both.calls == 0


def test_a_config_no_longer_shipped_is_retuned(tmp_path):
    choose(tmp_path, FakeTimer())
    timer = FakeTimer()
    pruned = [CONFIGS[0], CONFIGS[2]]
    assert choose(tmp_path, timer, configs=pruned) == (CONFIGS[0], True)
    assert timer.calls == 2


def test_failing_configs_lose_and_all_failing_is_an_error(tmp_path):
    timer = FakeTimer(fail=(FAST,))
    assert choose(tmp_path, timer)[0] == CONFIGS[0]
    with pytest.raises(RuntimeError, match="no autotune config"):
        choose(tmp_path / "other", FakeTimer(fail=tuple(CONFIGS)))


def test_committed_table_is_used_when_the_gpu_matches(tmp_path):
    tables = tmp_path / "tables"
    choose(tables.parent / "measured", FakeTimer())  # a measured GPU's file ...
    tables.mkdir()
    (tmp_path / "measured" / "tuning" / "NVIDIA_H200-triton3.6.0.json").rename(tables / "NVIDIA_H200-triton3.6.0.json")
    timer = FakeTimer()
    assert choose(tmp_path / "user", timer, tables_dir=tables) == (FAST, False)  # ... committed: no timing
    other = FakeTimer()
    choose(tmp_path / "user", other, gpu="NVIDIA A100-SXM4-80GB", tables_dir=tables)
    assert other.calls == 3


def test_unreadable_cache_file_is_an_empty_cache(tmp_path):
    (tmp_path / "tuning").mkdir()
    (tmp_path / "tuning" / "NVIDIA_H200-triton3.6.0.json").write_text("{not json")
    timer = FakeTimer()
    assert choose(tmp_path, timer) == (FAST, True) and timer.calls == 3


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TRITONSD_CACHE", str(tmp_path / "a"))
    assert _triton.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("TRITONSD_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _triton.cache_dir() == tmp_path / "xdg" / "tritonsd"


def test_recorded_key_is_the_autotuners_key():
    """The key warmup counts (Launch.tuning_key) is the one the launch path computes (as Triton's Autotuner)."""
    x = torch.empty(2, 320, 16, 16, device="meta", dtype=torch.float16).to(memory_format=torch.channels_last)
    w = torch.empty(640, 320, 3, 3, device="meta", dtype=torch.float16)
    from tritonsd.kernels.dispatch import force

    with _triton.recording() as raw, force("triton"):
        conv.conv2d_triton(x, w, None, 1, 1)
    kernel, args, kwargs = raw[0]
    recorded = variants.record(lambda: conv.conv2d_triton(x, w, None, 1, 1))[0]
    key = _triton.autotune_key(kernel, args, kwargs)
    assert recorded.tuning_key() == key
    named = {**dict(zip(kernel.arg_names, args)), **kwargs}
    assert key[:len(kernel.keys)] == tuple(named[k] for k in kernel.keys)
    assert named["M"] == 2 * 16 * 16 and named["stride_xc"] == 1  # batch and layout are in the key


# ---- the launch path: kernels/_triton.choose_config ----------------------------------------------------------------

KERNEL = "tritonsd.kernels.toy._k"
KEY = (320, "torch.float16")  # N, then the tensor's dtype


class FakeAutotuner(SimpleNamespace):
    """What choose_config reads of a triton Autotuner: configs, its in-memory cache, arg names, key names, and the
    JIT function's module, name and source hash (innermost() returns a non-Autotuner as it is)."""

    def __init__(self):
        super().__init__(configs=CONFIGS, cache={}, arg_names=["X", "N"], keys=["N"], module="tritonsd.kernels.toy",
                         __name__="_k", cache_key="src-a")


ARGS = (torch.empty(4, dtype=torch.float16), 320)


class RecordingTuner:
    """A tuner that returns CONFIGS[1] and counts its calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, autotuner, grid, args, kwargs, key):
        self.calls.append(key)
        return FAST


@pytest.fixture
def gpu(monkeypatch, tmp_path):
    """A pretend H200 (not capturing), the user's cache under tmp_path, no committed tables; returns a setter for
    the capture state."""
    state = {"capturing": False}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: state["capturing"])
    monkeypatch.setenv("TRITONSD_CACHE", str(tmp_path / "user"))
    monkeypatch.setattr(_triton, "TABLES_DIR", tmp_path / "none")
    monkeypatch.setattr(_triton, "_tables", {})
    return state


def store(tmp_path, config, version=None):
    cache = tuning.TuningCache("NVIDIA H200", version, root=tmp_path / "user", tables_dir=None)
    cache.store(KERNEL, "src-a", KEY, _triton.config_to_dict(config), {})


def test_a_miss_outside_tuning_is_left_to_triton(gpu):
    kernel, tuner = FakeAutotuner(), RecordingTuner()
    _triton.choose_config(kernel, (1,), ARGS, {})
    assert kernel.cache == {}  # Triton's autotuner decides (in memory only)
    with _triton.tuning(tuner):
        pass
    _triton.choose_config(kernel, (1,), ARGS, {})
    assert kernel.cache == {} and tuner.calls == []  # the tuner is gone with its block


def test_a_miss_inside_tuning_is_tuned_once(gpu):
    kernel, tuner = FakeAutotuner(), RecordingTuner()
    with _triton.tuning(tuner):
        _triton.choose_config(kernel, (1,), ARGS, {})
        _triton.choose_config(kernel, (1,), ARGS, {})
    assert tuner.calls == [KEY] and kernel.cache == {KEY: FAST}


def test_a_table_hit_needs_no_tuner(gpu, tmp_path):
    store(tmp_path, CONFIGS[2])
    kernel, tuner = FakeAutotuner(), RecordingTuner()
    _triton.choose_config(kernel, (1,), ARGS, {})  # outside tuning() too
    assert kernel.cache == {KEY: CONFIGS[2]}
    other = FakeAutotuner()
    with _triton.tuning(tuner):
        _triton.choose_config(other, (1,), ARGS, {})
    assert other.cache == {KEY: CONFIGS[2]} and tuner.calls == []


def test_a_stored_config_no_longer_shipped_is_a_miss(gpu, tmp_path):
    store(tmp_path, triton.Config({"BLOCK": 32}, num_warps=2, num_stages=1))
    kernel = FakeAutotuner()
    _triton.choose_config(kernel, (1,), ARGS, {})
    assert kernel.cache == {}


def test_a_miss_during_graph_capture_takes_the_first_config(gpu):
    """Nothing may be timed (synchronised) inside a capture: no tuner, and no Triton benchmark either."""
    gpu["capturing"] = True
    kernel, tuner = FakeAutotuner(), RecordingTuner()
    with _triton.tuning(tuner):
        _triton.choose_config(kernel, (1,), ARGS, {})
    assert kernel.cache == {KEY: CONFIGS[0]} and tuner.calls == []


def test_the_tuner_stores_what_a_later_process_finds(gpu, tmp_path):
    timings = {0: 2.0, 1: 1.0, 2: 3.0}
    tuner = tuning.Tuner(time_config=lambda autotuner, grid, args, kwargs, c: timings[CONFIGS.index(c)],
                         root=tmp_path / "user", gpu=lambda: "NVIDIA H200")
    kernel = FakeAutotuner()
    with _triton.tuning(tuner):
        _triton.choose_config(kernel, (1,), ARGS, {})
    assert kernel.cache == {KEY: FAST} and tuner.tuned == 1
    later = FakeAutotuner()
    _triton.choose_config(later, (1,), ARGS, {})  # this process's tables were read before the store ...
    assert later.cache == {}
    _triton._tables.clear()  # ... a new process reads them again
    _triton.choose_config(later, (1,), ARGS, {})
    assert later.cache == {KEY: FAST}


def test_kernels_never_import_compile():
    """kernels/ is below compile/: not even an import inside a function may reach up (it was a cycle)."""
    root = Path(_triton.__file__).resolve().parent
    offenders = []
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}: {n}" for n in names if n.startswith("tritonsd.compile")]
    assert offenders == []
