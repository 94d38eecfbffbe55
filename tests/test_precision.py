"""Half precision around the model: the VAE decode guard (float32 retry, warned once), device and dtype
resolution with one-line errors, and float32 statistics in the norm / attention paths for float16 and bfloat16
inputs (torch references, and the Triton kernels under the interpreter)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from tritonsd.kernels import dispatch
from tritonsd.devices import DeviceError, DTypeError, resolve_device, resolve_dtype
from tritonsd.model.load import load_model
from tritonsd.model.vae_guard import VAEDecodeGuard, VAEDecodeNaNWarning
from tritonsd.sampler.vae_io import decode_clamped
from tritonsd.testing.reference import relative_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # Triton on CPU tensors needs the interpreter (no GPU)

# bounds for one op on half-precision inputs against float64 (float16 rounding of the output is ~5e-4)
HALF_BOUND = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


class OverflowVAE(nn.Module):
    """A decoder whose activation exceeds float16's range (as the SD VAE's can): NaN in float16, fine in float32."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(6.0e4))  # representable in float16 (max 65504)
        self.calls: list[torch.dtype] = []

    def decode(self, z):
        self.calls.append(self.gain.dtype)
        h = z.to(self.gain.dtype) * self.gain  # 6e4 * z: inf in float16 where |z| > 1.09
        return (h - h.mean()) / self.gain  # inf - inf: NaN


def collect_warnings(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, [w for w in caught if issubclass(w.category, VAEDecodeNaNWarning)]


def test_guard_retries_nan_in_float32_and_warns_once():
    vae = OverflowVAE().half()
    guard = VAEDecodeGuard(vae)
    z = torch.randn(1, 4, 2, 2) + 3
    assert not torch.isfinite(vae.decode(z)).all()  # the fake really fails in float16
    vae.calls.clear()
    out, caught = collect_warnings(lambda: guard.decode(z))
    assert vae.calls == [torch.float16] and guard.float32_vae().calls[-1] == torch.float32  # (the copy keeps
    # the list it was copied with)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    expected = (z - z.mean())  # the float32 computation, independently
    assert torch.allclose(out, expected, atol=1e-5)
    assert len(caught) == 1 and str(caught[0].message) == "VAE decode produced NaN in float16; retried in float32"
    out2, caught2 = collect_warnings(lambda: guard.decode(z))
    assert torch.equal(out, out2) and caught2 == [] and guard.retries == 2
    assert vae.gain.dtype == torch.float16  # the model itself is left in half precision


def test_guard_leaves_finite_and_float32_results_alone():
    z = torch.randn(1, 4, 2, 2) * 1e-3  # small enough for float16
    vae16 = OverflowVAE().half()
    vae16.gain.data.fill_(1.0)
    out, caught = collect_warnings(lambda: VAEDecodeGuard(vae16).decode(z))
    assert out.dtype == torch.float16 and caught == [] and vae16.calls == [torch.float16]
    vae32 = OverflowVAE()
    vae32.gain.data.fill_(float("inf"))  # float32 NaN: nothing to retry with, the caller's check reports it
    out, caught = collect_warnings(lambda: VAEDecodeGuard(vae32).decode(z))
    assert torch.isnan(out).all() and caught == [] and vae32.calls == [torch.float32]


def test_decode_clamped_scales_clamps_and_warns_once_per_guard():
    vae = OverflowVAE().half()
    guard = VAEDecodeGuard(vae)
    z = torch.randn(1, 4, 2, 2) + 3
    out, caught = collect_warnings(lambda: [decode_clamped(guard, 0.5, z) for _ in range(2)])
    zh = (z / 0.5).half().float()  # the latents reach the VAE in its dtype
    decoded = zh - zh.mean()
    assert torch.allclose(out[0], torch.clamp((decoded + 1) / 2, 0, 1), atol=1e-5)
    assert len(caught) == 1 and guard.retries == 2


def test_guard_on_the_real_vae(fixtures):
    """The tiny VAE in float16 with a decoder input conv pushed past float16's range: NaN, then the retry
    equals the float32 decode of the same (float16-valued) weights."""
    model = load_model(fixtures / "sd1-tiny.safetensors", fixtures / "sd1-tiny.yaml", text_heads=2)
    vae = model.first_stage_model.half()  # the fixture's weights are float16 values: an exact cast
    vae.decoder.conv_in.weight.data.mul_(4096)
    z = torch.randn(1, 4, 2, 2) / model.config.scale_factor
    with torch.no_grad():
        assert not torch.isfinite(vae.decode(z / model.config.scale_factor)).all()
        out, caught = collect_warnings(lambda: VAEDecodeGuard(vae).decode(z / model.config.scale_factor))
        expected = vae.float().decode(z.float() / model.config.scale_factor)
    assert len(caught) == 1 and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert torch.equal(out, expected)


# ---------------------------------------------------------------- device / dtype


def test_resolve_device_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError) as e:
        resolve_device("cuda")
    message = str(e.value)
    assert "\n" not in message and "torch.cuda.is_available() is False" in message and "'cuda'" in message
    assert isinstance(e.value, RuntimeError)
    with pytest.raises(DeviceError, match="cuda:1"):
        resolve_device("cuda:1")
    assert resolve_device("auto") == torch.device("cpu") == resolve_device(None) == resolve_device("CPU")


def test_load_model_on_missing_cuda_fails_first(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="is_available"):  # before the (missing) file is even read
        load_model(tmp_path / "absent.safetensors", device="cuda", dtype=torch.float16)


def test_resolve_device_bad_names():
    for name in ("gpu0", "tpu", "mps"):
        with pytest.raises(DeviceError, match=repr(name)):
            resolve_device(name)


def test_resolve_dtype():
    assert resolve_dtype("fp16") is torch.float16 and resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype(torch.float32) is torch.float32 and resolve_dtype("FP32") is torch.float32
    with pytest.raises(DTypeError, match="fp8"):
        resolve_dtype("fp8")
    with pytest.raises(DTypeError):
        resolve_dtype(torch.int8)


# ---------------------------------------------------------------- float32 statistics on half inputs


def offset_input(shape, dtype, offset=200.0, seed=0):
    """Values around a large mean: naive half-precision sums of x and x^2 lose the variance entirely."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) + offset).to(DEVICE, dtype)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_group_norm_statistics_in_float32(backend, dtype):
    x = offset_input((2, 64, 8, 8), dtype)
    w, b = torch.randn(64).to(DEVICE, dtype), torch.randn(64).to(DEVICE, dtype)
    ref = torch.nn.functional.group_norm(x.double(), 32, w.double(), b.double(), 1e-5)
    with dispatch.force(backend):
        out = dispatch.group_norm(x, w, b, 32, 1e-5)
    assert out.dtype == dtype
    assert relative_error(out.double().cpu(), ref.cpu()) <= HALF_BOUND[dtype]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_layer_norm_statistics_in_float32(backend, dtype):
    x = offset_input((2, 16, 320), dtype)
    w, b = torch.randn(320).to(DEVICE, dtype), torch.randn(320).to(DEVICE, dtype)
    ref = torch.nn.functional.layer_norm(x.double(), (320,), w.double(), b.double(), 1e-5)
    with dispatch.force(backend):
        out = dispatch.layer_norm(x, w, b, 1e-5)
    assert out.dtype == dtype
    assert relative_error(out.double(), ref) <= HALF_BOUND[dtype]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attention_scores_do_not_overflow(backend, dtype):
    """q.k^T of 40-wide heads at |q|, |k| ~ 60 exceeds float16's range before the 1/sqrt(D) scale (the SD 2.x
    fp16 NaN): scores and softmax must be float32."""
    g = torch.Generator().manual_seed(1)
    heads, d = 2, 40
    q = (torch.randn(1, 32, heads * d, generator=g) * 60).to(DEVICE, dtype)
    k = q.clone()  # aligned keys: the largest scores, |q|^2 ~ 1.4e5
    v = torch.randn(1, 32, heads * d, generator=g).to(DEVICE, dtype)
    qh, kh, vh = (t.double().reshape(1, 32, heads, d).transpose(1, 2) for t in (q, k, v))
    probs = torch.softmax(qh @ kh.transpose(-1, -2) / d ** 0.5, dim=-1)
    ref = (probs @ vh).transpose(1, 2).reshape(1, 32, heads * d)  # [B, H, N, D] -> [B, N, H*D]
    with dispatch.force(backend):
        out = dispatch.attention(q, k, v, heads)
    assert torch.isfinite(out).all()
    assert relative_error(out.double(), ref) <= HALF_BOUND[dtype]


# ---------------------------------------------------------------- CUDA only: whole model in half precision


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="half-precision model runs need a GPU")
@pytest.mark.parametrize("dtype,bound", [(torch.float16, 1e-2), (torch.bfloat16, 5e-2)])
def test_half_model_close_to_float32_cuda(fixtures, dtype, bound):
    path, yaml = fixtures / "sd1-tiny.safetensors", fixtures / "sd1-tiny.yaml"
    m32 = load_model(path, yaml, text_heads=2, device="cuda")
    mh = load_model(path, yaml, text_heads=2, device="cuda", dtype=dtype)
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(2, 4, 16, 16, generator=g).cuda(), torch.randn(2, 77, 32, generator=g).cuda()
    t = torch.tensor([999.0, 20.0], device="cuda")
    with torch.no_grad():
        assert relative_error(mh.apply_model(x, t, c).float(), m32.apply_model(x, t, c)) <= bound
        z = x[:1]
        image = VAEDecodeGuard(mh.first_stage_model).decode(z / mh.config.scale_factor)
        assert relative_error(image.float(), m32.decode_first_stage(z)) <= bound
