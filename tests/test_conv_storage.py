"""Convolution weights live in ONE storage, the model's own parameter, in the conv kernel's layout (issue 21).

The Triton conv kernel reads a [C_out, C_in, KH, KW] weight stored in [KH, KW, C_in, C_out] memory order. The
model's ``Conv2d`` holds its weight that way from load on, so the kernel is launched on the parameter itself: a
LoRA switch (``copy_`` into the parameter) is what the next launch, or a captured CUDA graph's replay, reads.
Here (CPU: Triton's interpreter; the launch recorder stands for a captured graph, which keeps the tensors it was
launched with): the conv launches get the parameters' storage before and after a LoRA switch; switching
none -> A -> B -> none gives a freshly loaded model's UNet output at each point; the checkpoint round trip
(``state_dict()``, ``tritonsd merge``) gives contiguous tensors in the original layout. The CUDA-graph version
of the switch is ``tests/test_lora_pipeline.py::test_switching_under_cuda_graphs_captures_once``.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import tritonsd
from tritonsd.formats.checkpoint import read_checkpoint
from tritonsd.formats.keys import normalize_keys
from tritonsd.kernels import _triton, dispatch
from tritonsd.kernels import attention, conv, geglu, group_norm, layer_norm
from tritonsd.lora.apply import LoraSpec, LoraState
from tritonsd.model import layers
from tritonsd.model.load import load_model
from tritonsd.model.sd import build_model, load_weights_
from tritonsd.testing.reference import relative_error
from tritonsd.tools.merge import merge_checkpoint, normalized_to_file_keys

from float_bounds import Reductions, reorder_bound
from kernel_checks import DEVICE

CHECKPOINT = "sd1-tiny.safetensors"
LORA = "lora-sd1-tiny.safetensors"
UNET = "model.diffusion_model."
SWITCH_BOUND = 1e-5  # relative, switched model vs a freshly loaded one with the same LoRAs
LORA_B_WEIGHT = -0.6  # LoRA B: the fixture at another (negative) weight


def load_pipe(fixtures):
    return tritonsd.load(fixtures / CHECKPOINT, text_heads=2, kernels="triton", device=DEVICE, dtype="fp32")


@pytest.fixture(scope="module")
def pipe(fixtures):
    return load_pipe(fixtures)


def unet_inputs(pipe):
    g = torch.Generator().manual_seed(21)
    x = torch.randn(1, 4, 8, 8, generator=g)
    context = torch.randn(1, 77, pipe.config.unet.context_dim, generator=g)
    return x.to(DEVICE), torch.tensor([500.0], device=DEVICE), context.to(DEVICE)


def run_unet(pipe) -> torch.Tensor:
    with dispatch.force(pipe.kernels), torch.no_grad():
        return pipe.model.apply_model(*unet_inputs(pipe))


def conv_launch_weights(pipe) -> list[torch.Tensor]:
    """The weight argument of every conv kernel launch of one UNet call (recorded, not run)."""
    with _triton.recording() as launches:
        run_unet(pipe)
    kernels = (conv._conv2d_kernel, conv._conv2d_norm_kernel, conv._conv2d_stats_kernel,
               conv._conv2d_norm_stats_kernel, conv._conv2d_split_kernel)  # every entry of the one conv kernel
    return [args[1] for kernel, args, _ in launches if kernel in kernels]


def unet_conv_weights(pipe) -> dict[str, torch.nn.Parameter]:
    return {f"{UNET}{name}.weight": m.weight for name, m in pipe.model.model.diffusion_model.named_modules()
            if isinstance(m, layers.Conv2d)}


@pytest.fixture
def only_convs_on_triton(monkeypatch):
    """The other ops on their torch references: the interpreter's group norm alone takes ~30 s per UNet call.
    The conv kernel, the one reading the weights under test, still runs."""
    for module, kernel, reference in ((attention, "attention_triton", "attention_reference"),
                                      (group_norm, "group_norm_triton", "group_norm_reference"),
                                      (layer_norm, "layer_norm_triton", "layer_norm_reference"),
                                      (geglu, "geglu_triton", "geglu_reference")):
        monkeypatch.setattr(module, kernel, getattr(module, reference))


# ---------------------------------------------------------------- the layout, from load on


def test_every_conv_weight_is_loaded_in_the_kernel_layout(pipe):
    convs = [m.weight for m in pipe.model.modules() if isinstance(m, layers.Conv2d)]
    assert len(convs) > 100  # UNet and VAE
    for w in convs:
        assert conv.has_kernel_layout(w)
        c_out, c_in, kh, kw = w.shape
        if kh > 1:  # [KH, KW, C_in, C_out] memory order
            assert w.stride() == (1, c_out, kw * c_in * c_out, c_in * c_out)


def test_loading_lays_out_on_the_files_side(fixtures, monkeypatch):
    """``load_weights_`` hands each conv weight over already in the kernel layout: the Conv2d's own repack after
    an assigning load (its fallback for other loaders) never runs."""
    raw = normalize_keys(read_checkpoint(fixtures / CHECKPOINT)).weights
    reference = load_model(fixtures / CHECKPOINT, text_heads=2, kernel_layout=True)
    with torch.device("meta"):
        model = build_model(reference.config)

    def refuse(weight):
        raise AssertionError("a conv weight was repacked after the load")

    monkeypatch.setattr(layers, "to_kernel_layout", refuse)
    load_weights_(model, fixtures / CHECKPOINT, raw, torch.float32, torch.device("cpu"), kernel_layout=True)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert p.stride() == q.stride() and torch.equal(p, q), name


def test_a_model_for_the_torch_reference_uses_the_files_tensors_uncopied(fixtures):
    """Without the kernel layout (the CPU's default: only ``F.conv2d`` runs there), every parameter of a load in
    the file's dtype IS the file's tensor (mapped, never copied: issue 28's start-up), conv weights included,
    and the model's output is the kernel-layout model's up to the order of its sums."""
    raw = normalize_keys(read_checkpoint(fixtures / CHECKPOINT)).weights
    laid_out = load_model(fixtures / CHECKPOINT, text_heads=2, kernel_layout=True)
    with torch.device("meta"):
        model = build_model(laid_out.config)
    load_weights_(model, fixtures / CHECKPOINT, raw, torch.float32, torch.device("cpu"), kernel_layout=False)
    convs = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, layers.Conv2d)}
    params = dict(model.named_parameters())
    assert len(convs) > 100 and all(params[k].is_contiguous() for k in convs)  # [C_out, C_in, KH, KW] as stored
    # self-attention's q / k / v are copied into one stacked storage (one GEMM: tests/test_qkv_storage.py); the
    # rest is the file's own tensors
    stacked = {k for k in params if k.endswith(("attn1.to_q.weight", "attn1.to_k.weight", "attn1.to_v.weight"))}
    assert len(stacked) >= 6 and all(params[k].equal(raw[k]) for k in stacked)
    assert all(p.data_ptr() == raw[name].data_ptr() for name, p in params.items() if name not in stacked)
    x, t, context = (v.cpu() for v in unet_inputs(laid_out))
    with torch.no_grad(), Reductions(model).record() as sums:
        mapped = model.apply_model(x, t, context)
    with torch.no_grad():
        copied = laid_out.apply_model(x, t, context)
    # the same sums in another order at most: oneDNN blocks a convolution's sums by where its operands lie (a
    # mapped weight sits where the file puts it, here 4 bytes off a 16-byte boundary, a copy 64-byte aligned):
    # bit-equal on the CPUs of earlier runs, 2.4e-7 apart in a 1x1 conv on an AMD EPYC with AVX-512
    scale = copied.abs().max()
    assert (mapped - copied).abs().max() <= reorder_bound(sums.lengths) * scale


def test_the_default_layout_follows_where_the_conv_kernel_runs(fixtures):
    """``load_model`` lays conv weights out for the kernel on CUDA or while Triton is forced, not for the CPU's
    torch reference."""
    def laid_out(model) -> list[bool]:
        return [conv.has_kernel_layout(m.weight) for m in model.modules()
                if isinstance(m, layers.Conv2d) and m.weight.shape[0] > 1 and m.weight.shape[1] > 1]

    assert not any(laid_out(load_model(fixtures / CHECKPOINT, text_heads=2, device="cpu")))
    with dispatch.force("triton"):
        assert all(laid_out(load_model(fixtures / CHECKPOINT, text_heads=2, device="cpu")))
    with dispatch.force("torch"):
        assert not any(laid_out(load_model(fixtures / CHECKPOINT, text_heads=2, device="cpu")))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_cuda_load_lays_out_on_the_device(fixtures):
    model = load_model(fixtures / CHECKPOINT, text_heads=2, device="cuda")
    reference = load_model(fixtures / CHECKPOINT, text_heads=2, kernel_layout=True)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert p.is_cuda and p.stride() == q.stride() and torch.equal(p.cpu(), q), name


def test_other_ways_of_building_keep_or_get_the_layout(fixtures):
    """Built on the CPU then loaded by copying (no assign), or loaded by assigning contiguous tensors: the same
    layout, the same weights."""
    reference = load_model(fixtures / CHECKPOINT, text_heads=2, kernel_layout=True)
    raw = normalize_keys(read_checkpoint(fixtures / CHECKPOINT)).weights
    copied = build_model(reference.config)
    copied.load_state_dict(raw, strict=True)
    with torch.device("meta"):
        assigned = build_model(reference.config)
    assigned.load_state_dict({k: v.contiguous() for k, v in raw.items()}, strict=True, assign=True)
    for model in (copied, assigned):
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            assert p.stride() == q.stride() and torch.equal(p, q), name


# ---------------------------------------------------------------- the kernel reads the parameters' storage


def test_conv_launches_read_the_parameters_storage_across_a_lora_switch(pipe, fixtures):
    params = unet_conv_weights(pipe)
    name_of = {w.data_ptr(): name for name, w in params.items()}
    storages = {p.untyped_storage().data_ptr() for p in pipe.model.parameters()}
    before = conv_launch_weights(pipe)
    # every UNet conv once (forced Triton: the 4-channel conv_in too), each on its own parameter's memory
    assert sorted(name_of[w.data_ptr()] for w in before) == sorted(params)
    assert all(w.untyped_storage().data_ptr() in storages for w in before)
    values_before = [w.detach().clone() for w in before]
    try:
        pipe.set_loras([(fixtures / LORA, 1.0)])
        after = conv_launch_weights(pipe)
        assert [w.data_ptr() for w in after] == [w.data_ptr() for w in before]
        assert all(w.untyped_storage().data_ptr() in storages for w in after)
        # what the launches before the switch were given (what a captured graph replays) holds the LoRA's weights
        changed = {name_of[w.data_ptr()] for w, old in zip(before, values_before) if not torch.equal(w, old)}
        pristine = pipe._lora_state.pristine
        assert changed == {name for name in params if name in pristine} and len(changed) >= 10
        for name in changed:
            assert pristine[name].stride() == params[name].stride()  # the pristine copy keeps the layout
    finally:
        pipe.set_loras([])
    assert all(torch.equal(w, old) for w, old in zip(before, values_before)), "restored in the same storage"


@pytest.mark.slow  # whole-model runs with the conv kernel on Triton's interpreter, 40 s
def test_lora_switches_give_a_fresh_models_output(fixtures, only_convs_on_triton):
    """none -> A -> B -> none on one pipeline, against a freshly loaded model with the same LoRAs at each point
    (the switched pipeline's first output is a fresh model's with none)."""
    lora_sets = {"A": [(fixtures / LORA, 1.0)], "B": [(fixtures / LORA, LORA_B_WEIGHT)]}
    fresh = {}
    for name, loras in lora_sets.items():
        model = load_pipe(fixtures)
        model.set_loras(loras)
        fresh[name] = run_unet(model)
        del model
    switched = load_pipe(fixtures)
    fresh["none"] = run_unet(switched)
    # the LoRAs change the output far beyond the bound (the check could fail)
    assert relative_error(fresh["A"], fresh["none"]) > 1e-3 and relative_error(fresh["B"], fresh["A"]) > 1e-3
    for name in ("A", "B", "none"):
        switched.set_loras(lora_sets.get(name, []))
        err = relative_error(run_unet(switched), fresh[name])
        assert err <= SWITCH_BOUND, f"after switching to {name}: relative error {err:.3g}"


# ---------------------------------------------------------------- the checkpoint round trip


def test_state_dict_is_contiguous_in_the_original_layout(fixtures, tmp_path):
    model = load_model(fixtures / CHECKPOINT, text_heads=2)
    LoraState(model).apply([LoraSpec(fixtures / LORA, 0.8)])
    state = model.state_dict()
    assert all(t.is_contiguous() for t in state.values())
    original = normalize_keys(read_checkpoint(fixtures / CHECKPOINT)).weights
    params = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for key, t in state.items():
        assert t.shape == original[key].shape and torch.equal(t, params[key]), key
    # no copies, except self-attention's q / k / v: views of one shared storage (tests/test_qkv_storage.py)
    shared = {k for k in state if k.endswith(("attn1.to_q.weight", "attn1.to_k.weight", "attn1.to_v.weight"))}
    assert len(shared) >= 6
    assert all(state[k].data_ptr() == params[k].data_ptr() for k in state if params[k].is_contiguous()
               and k not in shared)
    path = tmp_path / "state.safetensors"
    save_file(state, str(path))  # safetensors refuses non-contiguous tensors
    reloaded = load_model(path, fixtures / "sd1-tiny.yaml", text_heads=2)
    for (name, p), q in zip(reloaded.named_parameters(), model.parameters()):
        assert p.stride() == q.stride() and torch.equal(p, q), name
    assert model.state_dict(keep_vars=True)[f"{UNET}out.2.weight"] is params[f"{UNET}out.2.weight"]


def test_merge_writes_the_original_layout(fixtures, tmp_path):
    """``tritonsd merge``'s conv tensors are the in-place LoRA's weights, stored in [C_out, C_in, KH, KW] order."""
    out = tmp_path / "merged.safetensors"
    merge_checkpoint(fixtures / CHECKPOINT, [LoraSpec(fixtures / LORA, 0.8)], out)
    merged = load_file(str(out))  # tensors rebuilt from the file's bytes, in their stored order
    model = load_model(fixtures / CHECKPOINT, text_heads=2)
    LoraState(model).apply([LoraSpec(fixtures / LORA, 0.8)])
    file_key = normalized_to_file_keys(read_checkpoint(fixtures / CHECKPOINT))
    convs = {f"{name}.weight": m.weight for name, m in model.named_modules() if isinstance(m, layers.Conv2d)}
    original = read_checkpoint(fixtures / CHECKPOINT)
    changed = 0
    for key, w in convs.items():
        stored = merged[file_key[key]]
        assert stored.is_contiguous() and stored.shape == w.shape and torch.equal(stored, w), key
        changed += not torch.equal(stored, original[file_key[key]])
    assert changed >= 10
