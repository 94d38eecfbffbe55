"""Reading checkpoints: both containers, the lightning-style pickles, refusal of code-running pickles, clear errors
for broken files, and key normalisation."""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import pickle
import struct
import sys
import types

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tritonsd.formats.checkpoint import CheckpointError, read_checkpoint
from tritonsd.formats.keys import normalize_keys


def _digest(path) -> tuple[str, int]:
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


def _single_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# --------------------------------------------------------------------------------------------------------------
# The fixtures


def test_safetensors_and_ckpt_hold_the_same_weights(fixtures):
    st = read_checkpoint(fixtures / "sd1-tiny.safetensors")
    ck = read_checkpoint(fixtures / "sd1-tiny.ckpt")
    assert st.keys() == ck.keys()
    assert len(st) == 684 + 244 + 37 + 12  # the README's key counts: UNet, VAE, text (with position_ids), schedule
    unet_key = "model.diffusion_model.input_blocks.0.0.weight"
    assert st[unet_key].dtype == torch.float32 and ck[unet_key].dtype == torch.float16  # per the README
    assert ck["alphas_cumprod"].dtype == torch.float32
    for k in st:  # the README: float16 values upcast to float32 are bit-identical
        assert torch.equal(st[k], ck[k].to(st[k].dtype)), k


def test_reading_never_modifies_the_file(fixtures, tmp_path):
    for name in ("sd2v-tiny.safetensors", "sd2v-tiny.ckpt"):
        copy = tmp_path / name
        copy.write_bytes((fixtures / name).read_bytes())
        before = _digest(copy)
        read_checkpoint(copy)
        assert _digest(copy) == before


def test_mixed_dtypes_are_kept_per_tensor(tmp_path):
    path = tmp_path / "mixed.safetensors"
    tensors = {"a": torch.randn(3, 4), "b": torch.randn(5).half(), "c": torch.randn(2, 2).bfloat16(),
               "d": torch.arange(7)}
    save_file(tensors, str(path))
    out = read_checkpoint(path)
    assert {k: v.dtype for k, v in out.items()} == {k: v.dtype for k, v in tensors.items()}
    assert all(torch.equal(out[k], tensors[k]) for k in tensors)


def test_bare_dict_ckpt_and_nested_state_dict(tmp_path):
    weights = {"model.diffusion_model.x": torch.randn(3), "first_stage_model.y": torch.randn(2)}
    bare = tmp_path / "bare.ckpt"
    torch.save(weights, bare)
    assert read_checkpoint(bare).keys() == weights.keys()
    wrapped = tmp_path / "wrapped.ckpt"
    torch.save({"state_dict": {**weights, "state_dict": {"inner": torch.zeros(1)}}, "epoch": 3}, wrapped)
    assert read_checkpoint(wrapped).keys() == weights.keys()


# --------------------------------------------------------------------------------------------------------------
# Lightning-style pickles: the released .ckpt files reference ModelCheckpoint, numpy.core.multiarray.scalar,
# numpy.dtype and _codecs.encode (Hugging Face pickle scans). Build one the same way, with stand-ins registered
# under those module names while saving.


class _ModelCheckpointStandIn:
    """Pickles as pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint (while _register has put a module
    of that name in sys.modules)."""

    def __init__(self):
        self.monitor = "val/loss_simple_ema"
        self.best_model_path = "/logs/checkpoints/last.ckpt"
        self.best_model_score = torch.tensor(0.1234)


def _numpy_scalar_stand_in(dtype, raw):  # the shape of numpy.core.multiarray.scalar's pickled call
    return np.frombuffer(raw, dtype=dtype)[0]


_ModelCheckpointStandIn.__module__ = "pytorch_lightning.callbacks.model_checkpoint"
_ModelCheckpointStandIn.__qualname__ = "ModelCheckpoint"
_numpy_scalar_stand_in.__module__ = "numpy.core.multiarray"
_numpy_scalar_stand_in.__qualname__ = "scalar"


class _NumpyScalar:
    """Pickles as numpy.core.multiarray.scalar(numpy.dtype('int64'), <bytes via _codecs.encode>), as numpy 1.x
    did for a numpy integer."""

    def __init__(self, value: int):
        self.value = value

    def __reduce__(self):
        return _numpy_scalar_stand_in, (np.dtype("int64"), struct.pack("<q", self.value))


def _register(monkeypatch, obj) -> None:
    """Put a module named ``obj.__module__`` (and its parents) holding ``obj`` into sys.modules, so pickle can
    name ``obj`` by that path."""
    parts = obj.__module__.split(".")
    for i in range(1, len(parts) + 1):
        mod_name = ".".join(parts[:i])
        if mod_name not in sys.modules or i == len(parts):
            monkeypatch.setitem(sys.modules, mod_name, types.ModuleType(mod_name))
    setattr(sys.modules[obj.__module__], obj.__qualname__, obj)


def _lightning_ckpt(path, weights, monkeypatch) -> None:
    with monkeypatch.context() as m:
        _register(m, _ModelCheckpointStandIn)
        _register(m, _numpy_scalar_stand_in)
        callback = _ModelCheckpointStandIn()
        obj = {
            "epoch": 6, "global_step": _NumpyScalar(840000), "pytorch-lightning_version": "1.4.2",
            "state_dict": weights,
            # lightning 1.x keyed callback states by the callback class; an instance for good measure
            "callbacks": {_ModelCheckpointStandIn: {"best_model_score": _NumpyScalar(7)}, "instance": callback},
        }
        torch.save(obj, path)
    data = path.read_bytes()
    for ref in (b"pytorch_lightning.callbacks.model_checkpoint", b"numpy.core.multiarray", b"_codecs", b"numpy"):
        assert ref in data, ref  # the pickle really references the released files' globals


def test_lightning_checkpoint_loads_and_extras_are_dropped(tmp_path, monkeypatch):
    weights = {"model.diffusion_model.out.2.bias": torch.randn(4), "first_stage_model.quant_conv.bias": torch.randn(8)}
    path = tmp_path / "lightning.ckpt"
    _lightning_ckpt(path, weights, monkeypatch)
    assert "pytorch_lightning" not in sys.modules  # nothing of lightning exists here ...
    out = read_checkpoint(path)  # ... and the allowlisted names still load, as placeholders
    assert out.keys() == weights.keys()
    assert all(torch.equal(out[k], weights[k]) for k in weights)


def test_plain_weights_only_load_refuses_the_lightning_file(tmp_path, monkeypatch):
    """The allowlist is what makes the lightning file load (and it is scoped: torch's default stays strict)."""
    path = tmp_path / "lightning.ckpt"
    _lightning_ckpt(path, {"model.diffusion_model.a": torch.zeros(1)}, monkeypatch)
    read_checkpoint(path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)


class _SystemCall:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _Exec:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


@pytest.mark.parametrize("payload", [_SystemCall, _Exec])
@pytest.mark.parametrize("where", ["top", "inside_state_dict", "inside_allowed_callback"])
def test_code_running_pickle_is_refused(tmp_path, monkeypatch, payload, where):
    marker = tmp_path / "marker"
    evil = payload(marker)
    path = tmp_path / "evil.ckpt"
    if where == "top":
        torch.save(evil, path)
    elif where == "inside_state_dict":
        torch.save({"state_dict": {"model.diffusion_model.a": torch.zeros(2), "b": evil}}, path)
    else:
        with monkeypatch.context() as m:
            _register(m, _ModelCheckpointStandIn)
            callback = _ModelCheckpointStandIn()
            callback.monitor = evil
            torch.save({"state_dict": {"model.diffusion_model.a": torch.zeros(2)}, "callbacks": [callback]}, path)
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(path)
    msg = _single_line(e)
    assert "evil.ckpt" in msg and "refused" in msg
    assert ("system" in msg) if payload is _SystemCall else ("exec" in msg)
    assert not marker.exists()


# --------------------------------------------------------------------------------------------------------------
# Broken files


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(tmp_path / "nope.safetensors")
    assert "nope.safetensors" in _single_line(e) and "no such file" in str(e.value)


@pytest.mark.parametrize("name", ["sd2v-tiny.safetensors", "sd2v-tiny.ckpt"])
@pytest.mark.parametrize("keep", [5, 4000, 0.5, 0.999])
def test_truncated_files(fixtures, tmp_path, name, keep):
    data = (fixtures / name).read_bytes()
    n = keep if isinstance(keep, int) else int(len(data) * keep)
    path = tmp_path / name
    path.write_bytes(data[:n])
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(path)
    msg = _single_line(e)
    assert name in msg and "truncated" in msg


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
@pytest.mark.parametrize("content", ["random", "text"])
def test_not_a_checkpoint(tmp_path, suffix, content):
    path = tmp_path / f"junk{suffix}"
    if content == "random":
        path.write_bytes(torch.randint(0, 256, (5000,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
                         .numpy().tobytes())
    else:
        path.write_text("model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n" * 20)
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(path)
    assert f"junk{suffix}" in _single_line(e)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.ckpt"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        read_checkpoint(path)


def _write_safetensors(path, header: dict, data: bytes, header_len: int | None = None) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)


@pytest.mark.parametrize("lie, expect", [
    ({"data_offsets": [0, 64]}, "outside"),  # offsets beyond the data section
    ({"data_offsets": [8, 4]}, "outside"),  # end before begin
    ({"shape": [4, 4]}, "needs 64 bytes"),  # shape needs more bytes than the offsets span
    ({"dtype": "Q7"}, "unsupported dtype"),
    ({"shape": [-1]}, "bad shape"),
])
def test_lying_safetensors_header(tmp_path, lie, expect):
    entry = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16], **lie}
    path = tmp_path / "liar.safetensors"
    _write_safetensors(path, {"w": entry}, bytes(16))
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(path)
    msg = _single_line(e)
    assert "liar.safetensors" in msg and expect in msg


def test_lying_safetensors_header_length(tmp_path):
    path = tmp_path / "liar.safetensors"
    _write_safetensors(path, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(16),
                       header_len=10_000)
    with pytest.raises(CheckpointError, match="exceeds the file size"):
        read_checkpoint(path)


def test_safetensors_header_not_json(tmp_path):
    path = tmp_path / "liar.safetensors"
    path.write_bytes(struct.pack("<Q", 6) + b"{oops}" + bytes(10))
    with pytest.raises(CheckpointError, match="not JSON"):
        read_checkpoint(path)


# --------------------------------------------------------------------------------------------------------------
# Key normalisation


def test_normalize_drops_the_extras_and_reports_them(fixtures):
    raw = read_checkpoint(fixtures / "sd1-tiny.safetensors")
    extras = {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(7, dtype=torch.int32),
              "denoiser.sigmas": torch.ones(1000), "logvar": torch.zeros(1000), "lvlb_weights": torch.ones(1000)}
    norm = normalize_keys({**raw, **extras})
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model."))
               for k in norm.weights)
    assert len(norm.weights) == 684 + 244 + 36  # the README's counts, position_ids dropped
    ignored = {k for keys in norm.ignored.values() for k in keys}
    assert ignored == (raw.keys() - norm.weights.keys()) | extras.keys()
    assert len(ignored) == 1 + 12 + len(extras)
    assert torch.equal(norm.alphas_cumprod, raw["alphas_cumprod"])


def test_normalize_maps_the_older_sd1_text_layout(fixtures):
    raw = read_checkpoint(fixtures / "sd1-tiny.safetensors")
    old = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
           for k, v in raw.items()}
    assert not any(".text_model." in k for k in old)
    new, ref = normalize_keys(old), normalize_keys(raw)
    assert new.weights.keys() == ref.weights.keys()
    assert new.renamed == 36


def test_normalize_maps_sd2_in_sgm_naming(fixtures):
    raw = read_checkpoint(fixtures / "sd2v-tiny.safetensors")
    sgm = {k.replace("cond_stage_model.model.", "conditioner.embedders.0.model."): v for k, v in raw.items()}
    assert normalize_keys(sgm).weights.keys() == normalize_keys(raw).weights.keys()
