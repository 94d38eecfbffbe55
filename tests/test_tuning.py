"""The persistent tuning cache: store, lookup in a later "process" (a new TuningCache on the same directory),
and invalidation by GPU name, triton version, kernel source and key, with a fake timer (no GPU)."""

from __future__ import annotations

import json

import pytest
import torch
import triton

from tritonsd.kernels import conv
from tritonsd.compile import tuning, variants

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
    assert tuning.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("TRITONSD_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tuning.cache_dir() == tmp_path / "xdg" / "tritonsd"


def test_recorded_key_is_the_autotuners_key():
    """The key warmup counts (Launch.tuning_key) is the one the launch path computes (as Triton's Autotuner)."""
    x = torch.empty(2, 320, 16, 16, device="meta", dtype=torch.float16).to(memory_format=torch.channels_last)
    w = torch.empty(640, 320, 3, 3, device="meta", dtype=torch.float16)
    from tritonsd.kernels import _triton
    from tritonsd.kernels.dispatch import force

    with _triton.recording() as raw, force("triton"):
        conv.conv2d_triton(x, w, None, 1, 1)
    kernel, args, kwargs = raw[0]
    recorded = variants.record(lambda: conv.conv2d_triton(x, w, None, 1, 1))[0]
    key = tuning.autotune_key(kernel, args, kwargs)
    assert recorded.tuning_key() == key
    named = {**dict(zip(kernel.arg_names, args)), **kwargs}
    assert key[:len(kernel.keys)] == tuple(named[k] for k in kernel.keys)
    assert named["M"] == 2 * 16 * 16 and named["stride_xc"] == 1  # batch and layout are in the key
