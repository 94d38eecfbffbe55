"""What the Triton launchers share: interpreter detection, config choice, argument checks, and :func:`launch`
(recording launches, and the lookup of autotune keys in the persistent tuning tables; the tuner that fills
them lives in ``compile/tuning.py`` and plugs in through :func:`tuning`).

``TRITON_INTERPRET=1`` is read by ``triton.jit`` when a kernel is decorated, i.e. when a kernel module is
imported; the launchers read it at the same moment so that the interpreter (CPU tensors, numpy semantics) and
the compiled path (CUDA tensors) never get mixed up.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import inspect
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class KernelArgumentError(ValueError):
    """Arguments a kernel (and its reference) cannot take: wrong ranks, mismatched shapes or dtypes."""


class KernelDeviceError(RuntimeError):
    """A Triton kernel was asked to run on tensors it cannot reach (CPU tensors without the interpreter)."""


AUTOTUNE = os.environ.get("TRITONSD_AUTOTUNE", "1") != "0"  # 0: the first shipped config only (tests, checks)


def configs(tuned: list[triton.Config], interpreted: triton.Config) -> list[triton.Config]:
    """The autotune candidates; the single ``interpreted`` one under the interpreter (tuning it is pointless);
    with ``TRITONSD_AUTOTUNE=0`` (read at import, like ``TRITON_INTERPRET``) the first shipped config alone, so
    correctness runs on a GPU compile one binary per kernel variant instead of one per config."""
    if INTERPRET:
        return [interpreted]
    return tuned if AUTOTUNE else tuned[:1]


def is_recording() -> bool:
    """Whether launches are being recorded (:func:`recording`): meta tensors then stand for CUDA ones."""
    return _recorder.get() is not None


def check_device(*tensors: torch.Tensor | None) -> None:
    """Compiled kernels need CUDA tensors; the interpreter needs CPU tensors. While launches are recorded
    (:func:`recording`), meta tensors stand for CUDA ones."""
    recording_now = _recorder.get() is not None
    for t in tensors:
        if t is None or (recording_now and t.is_meta):
            continue
        if INTERPRET and t.is_cuda:
            raise KernelDeviceError("TRITON_INTERPRET=1 is set, but the tensors are on CUDA; unset it to run "
                                    "the compiled kernels")
        if not INTERPRET and not t.is_cuda:
            raise KernelDeviceError(f"the Triton kernels need CUDA tensors (got a {t.device} tensor); set "
                                    "TRITON_INTERPRET=1 before importing tritonsd to run them on the CPU")


def _version(text: str) -> tuple[int, ...]:
    """``3.6.0`` / ``3.9.0+git1234`` -> (3, 6, 0)."""
    return tuple(int(part) for part in re.findall(r"\d+", text.split("+")[0])[:3])


TRITON_VERSION = _version(triton.__version__)


def shipped(rows: list[tuple], since: dict[tuple, tuple[int, ...]],
            version: tuple[int, ...] = TRITON_VERSION) -> list[tuple]:
    """The config rows to ship with triton ``version`` (default: the installed one): a row listed in ``since``
    only from that (major, minor) on. For configs whose compiled code (registers, spills) differs between
    releases; order is kept (the first row is the untuned default)."""
    return [r for r in rows if version >= since.get(r, ())]


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: full IEEE float32 for float32 inputs (TF32 would cost ~1e-3 relative error)."""
    return "ieee" if dtype == torch.float32 else "tf32"


_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def dot_dtype(dtype: torch.dtype):
    """The dtype tl.dot operands are cast to: the input's own dtype (a no-op cast), except bfloat16 under the
    interpreter, whose bfloat16 tl.dot returns garbage (triton 3.9): there the tiles are multiplied as the
    float32 values they hold, which is exact."""
    if INTERPRET and dtype == torch.bfloat16:
        return tl.float32
    return _TL_DTYPES[dtype]


@triton.jit
def round_bf16_by_bits(x):
    """float32 ``x`` rounded to the nearest bfloat16 (ties to even), kept as float32. Triton 3.9's interpreter
    truncates float32 -> bfloat16 casts (the GPU rounds to nearest): kernels that round an intermediate to
    bfloat16 in a prologue (what the unfused op would store) use this under the interpreter
    (:func:`rounds_bf16_by_bits`), so both round alike."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


def rounds_bf16_by_bits(dtype: torch.dtype) -> bool:
    """Whether a prologue's rounding to ``dtype`` must go through :func:`round_bf16_by_bits`."""
    return INTERPRET and dtype == torch.bfloat16


def next_power_of_2(n: int) -> int:
    return triton.next_power_of_2(n)


# ---- the GPU's size and name: how many programs fill one wave (split-K convolution, kernels/conv.py), and whose
# tuning tables decide fused or apart (:func:`runs_apart`)

RECORDING_SMS = 132  # an H100's SMs: the GPU assumed while launches are recorded without one (check-compile, plan)
_assumed_sms: contextvars.ContextVar[int] = contextvars.ContextVar("tritonsd_assumed_sms", default=RECORDING_SMS)
_assumed_name: contextvars.ContextVar[str | None] = contextvars.ContextVar("tritonsd_assumed_gpu", default=None)
_properties: dict[int, Any] = {}  # CUDA device index -> its properties (SMs, name), read once per device


def cuda_properties(device: torch.device):
    """``torch.cuda.get_device_properties`` of a CUDA ``device``, read once per device (launchers ask often)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _properties:
        _properties[index] = torch.cuda.get_device_properties(index)
    return _properties[index]


@contextlib.contextmanager
def assume_gpu(sms: int, name: str | None = None) -> Iterator[int]:
    """Off the GPU, the launchers act for a GPU of ``sms`` SMs named ``name`` (``torch.cuda.get_device_name``'s
    text): while launches are recorded (:func:`recording`) they size their grids for its SMs, and its tuning
    tables say where a fused launch runs apart (``tritonsd bench plan --gpu``: the named GPU's)."""
    sms_token, name_token = _assumed_sms.set(int(sms)), _assumed_name.set(name)
    try:
        yield sms
    finally:
        _assumed_sms.reset(sms_token)
        _assumed_name.reset(name_token)


def sm_count(device: torch.device) -> int | None:
    """The streaming multiprocessors of ``device`` (read once per CUDA device); the assumed GPU's while
    launches are recorded (:func:`assume_gpu`); None on the CPU (the interpreter runs programs one by one)."""
    if device.type == "cuda":
        return cuda_properties(device).multi_processor_count
    if device.type == "meta" and is_recording():
        return _assumed_sms.get()
    return None


# ---- launching: every launcher goes through launch(), so that launches can be recorded (to know which kernel
# variants a model needs, without a GPU) and autotuned keys looked up in the persistent tuning tables.

_recorder: contextvars.ContextVar[list | None] = contextvars.ContextVar("tritonsd_launch_recorder", default=None)


@contextlib.contextmanager
def recording() -> Iterator[list[tuple[Any, tuple, dict]]]:
    """Record the launches made inside the block as (kernel, args, kwargs) instead of running them; the
    launchers then accept meta tensors, so a whole model can be walked on the meta device."""
    launches: list[tuple[Any, tuple, dict]] = []
    token = _recorder.set(launches)
    try:
        yield launches
    finally:
        _recorder.reset(token)


# A tuner: (autotuner, grid, args, kwargs, key) -> the config to use for that key (compile/tuning.py's Tuner
# times every config and stores the winner); its optional ``choose_way(choice, source, key, ways)`` picks fused or
# apart (:func:`runs_apart`). Plugged in by tuning(), as the recorder is by recording().
Tuner = Callable[[Any, Any, tuple, dict, tuple], triton.Config]

_tuner: contextvars.ContextVar[Tuner | None] = contextvars.ContextVar("tritonsd_tuner", default=None)


@contextlib.contextmanager
def tuning(tuner: Tuner) -> Iterator[Tuner]:
    """Inside the block, an autotune key found in no tuning table is handed to ``tuner`` (outside a CUDA-graph
    capture); outside it, such a key is left to Triton's own autotuner."""
    token = _tuner.set(tuner)
    try:
        yield tuner
    finally:
        _tuner.reset(token)


def launch(kernel, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``, or record it (see :func:`recording`). An autotuned kernel's key is first
    looked up in the persistent tuning tables (:func:`tuned_config`), then given to the tuner of :func:`tuning`."""
    launches = _recorder.get()
    if launches is not None:
        launches.append((kernel, args, kwargs))
        return
    if not INTERPRET and isinstance(kernel, triton.runtime.Autotuner):
        choose_config(kernel, grid, args, kwargs)
    kernel[grid](*args, **kwargs)


def choose_config(autotuner, grid, args: tuple, kwargs: dict) -> None:
    """Fill the autotuner's in-memory cache for this launch's key, so that Triton never benchmarks a key the
    tables (or the tuner) know. During a CUDA-graph capture nothing may synchronise or time: a key that no
    table holds then takes the first config (the graph's warm-up step normally tuned every key already)."""
    key = autotune_key(autotuner, args, kwargs)
    if len(autotuner.configs) < 2 or key in autotuner.cache:
        return
    config = tuned_config(autotuner, key)
    if config is None:
        if torch.cuda.is_current_stream_capturing():
            config = autotuner.configs[0]
        elif (tuner := _tuner.get()) is not None:
            config = tuner(autotuner, grid, args, kwargs, key)
    if config is not None:
        autotuner.cache[key] = config


# ---- the persistent tuning tables (read here; compile/tuning.py times configs and writes the user's file) ---------
#
# Entries live in ``$TRITONSD_CACHE`` (else ``$XDG_CACHE_HOME/tritonsd``, else ``~/.cache/tritonsd``), one JSON
# file per (GPU name, triton version) under ``tuning/``; inside it, per kernel, per source hash (the JIT's
# ``cache_key``: a changed kernel is a new entry), per autotune key, the winning config and the timings. Tables
# measured on known GPUs are committed under ``kernels/data/tuned/`` and consulted after the user's cache. A
# stored config that is no longer shipped is a miss (so pruning the config list invalidates it).

TABLES_DIR = Path(__file__).resolve().parent / "data" / "tuned"


def cache_dir() -> Path:
    if os.environ.get("TRITONSD_CACHE"):
        return Path(os.environ["TRITONSD_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tritonsd"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_") or "unknown"


def config_to_dict(config: triton.Config) -> dict:
    return {"kwargs": dict(config.kwargs), "num_warps": config.num_warps, "num_stages": config.num_stages}


def match_config(configs: Sequence[triton.Config], stored: dict) -> triton.Config | None:
    """The shipped config equal to a stored one, or None (no longer shipped)."""
    for c in configs:
        if config_to_dict(c) == stored:
            return c
    return None


def key_repr(key: tuple) -> str:
    return json.dumps([str(k) if not isinstance(k, (int, float, bool)) or k is None else k for k in key])


def read_entries(path: Path | None) -> dict:
    """A tuning file's entries; an absent or unreadable file is empty (the tables are only ever a speed-up)."""
    try:
        data = json.loads(path.read_text())
        return data.get("entries", {}) if isinstance(data, dict) else {}
    except (OSError, ValueError, AttributeError):
        return {}


class TuningTables:
    """Winners per (kernel, source hash, key) for one GPU name and triton version: the user's file, then the
    committed table."""

    def __init__(self, gpu: str, triton_version: str | None = None, root: Path | None = None,
                 tables_dir: Path | None = TABLES_DIR):
        self.gpu = gpu
        self.triton_version = triton_version or triton.__version__
        name = f"{_slug(gpu)}-triton{_slug(self.triton_version)}.json"
        self.path = (root or cache_dir()) / "tuning" / name
        self.table = tables_dir / name if tables_dir is not None else None
        self._data = read_entries(self.path)
        self._committed = read_entries(self.table)

    def lookup(self, kernel: str, source: str, key: tuple) -> dict | None:
        k = None  # the key's text, made only when a table holds this kernel's source (a launch asks every time)
        for entries in (self._data, self._committed):
            keys = entries.get(kernel, {}).get(source)
            if keys:
                k = k or key_repr(key)
                if (hit := keys.get(k)) is not None:
                    return hit
        return None


def innermost(kernel):
    """The JIT (or interpreted) function under an autotuner / heuristics wrapper."""
    fn = kernel
    while isinstance(fn, (triton.runtime.Autotuner, triton.runtime.Heuristics)):
        fn = fn.fn
    return fn


def source_hash(kernel) -> str:
    """The JIT's hash of the kernel's source and what it calls: a changed kernel is a new entry. (Under the
    interpreter, which has no JIT: a hash of the kernel function's own source.)"""
    fn = innermost(kernel)
    if hasattr(fn, "cache_key"):
        return fn.cache_key
    return hashlib.sha256(inspect.getsource(fn.fn).encode()).hexdigest()


def kernel_name(kernel) -> str:
    fn = innermost(kernel)
    if hasattr(fn, "module"):
        return f"{fn.module}.{fn.__name__}"
    return f"{fn.fn.__module__}.{fn.fn.__name__}"  # the interpreter's InterpretedFunction


def autotune_key(autotuner, args: tuple, kwargs: dict) -> tuple:
    """The key ``triton.runtime.Autotuner.run`` computes (key arguments' values, then tensors' dtypes)."""
    named = {**dict(zip(autotuner.arg_names, args)), **kwargs}
    named = {k: v for k, v in named.items() if k in autotuner.arg_names}
    key = [named[k] for k in autotuner.keys if k in named]
    key += [str(v.dtype) for v in named.values() if hasattr(v, "dtype")]
    return tuple(key)


_tables: dict[str, TuningTables] = {}  # per GPU name, read once per process


def tables_for(gpu: str) -> TuningTables:
    if gpu not in _tables:
        _tables[gpu] = TuningTables(gpu)
    return _tables[gpu]


def tuned_config(autotuner, key: tuple) -> triton.Config | None:
    """The config the tuning tables hold for this key on the current GPU, if still shipped; else None."""
    hit = tables_for(torch.cuda.get_device_name()).lookup(kernel_name(autotuner), source_hash(autotuner), key)
    return match_config(autotuner.configs, hit["config"]) if hit is not None else None


# ---- fused or apart: a fusion saves launches and bytes, but for some shapes the vendor library's GEMM is faster
# than the fused Triton tile by more. The tuner times both ways once per (GPU, triton version, kernel source, key)
# and stores the faster under "<kernel>.fused_or_apart" ({"way": "fused" | "apart"}); without an entry, fused.

FUSED, APART = "fused", "apart"


def gpu_name(device: torch.device) -> str | None:
    """Whose tuning tables decide for ``device``: the CUDA device's name, else the GPU of :func:`assume_gpu`."""
    return cuda_properties(device).name if device.type == "cuda" else _assumed_name.get()


def runs_apart(kernel, key: tuple, device: torch.device, ways: dict[str, Callable[[], Any]]) -> bool:
    """Whether this launch of the fused ``kernel`` (its own ``key``) should run as the unfused launches it replaces.

    ways: {FUSED: call, APART: call}, each running the whole computation one way, for the tuner to time. A key
    missing from the tables is timed by the tuner of :func:`tuning` (outside a capture and a recording) and then
    stored; without a tuner it runs fused."""
    gpu = gpu_name(device)
    if gpu is None:
        return False
    choice, source = f"{kernel_name(kernel)}.fused_or_apart", source_hash(kernel)
    hit = tables_for(gpu).lookup(choice, source, key)
    if hit is not None:
        return hit["config"].get("way") == APART
    choose = getattr(_tuner.get(), "choose_way", None)
    if choose is None or _recorder.get() is not None or (device.type == "cuda"
                                                          and torch.cuda.is_current_stream_capturing()):
        return False
    return choose(choice, source, key, ways) == APART
