"""Self-attention's q, k and v projections as ONE GEMM (issue 22, item 8): to_q / to_k / to_v weights are views of
one [3 * inner, dim] storage, from build, load (copying or assigning), ``.to()``, through a LoRA switch, and
``state_dict()`` gives them as tensors of their own (a file cannot hold shared storage)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from tritonsd.kernels import _triton, dispatch, linear
from tritonsd.lora.apply import LoraSpec, LoraState
from tritonsd.model.layers import stack_rows_, stacked_rows
from tritonsd.model.load import load_model
from tritonsd.model.unet import CrossAttention
from tritonsd.testing.reference import relative_error

from kernel_checks import DEVICE

CHECKPOINT = "sd1-tiny.safetensors"
LORA = "lora-sd1-tiny.safetensors"


def self_attentions(model) -> dict[str, CrossAttention]:
    return {name: m for name, m in model.named_modules() if isinstance(m, CrossAttention) and m.fused_qkv}


def assert_stacked(attn: CrossAttention) -> None:
    q, k, v = attn.to_q.weight, attn.to_k.weight, attn.to_v.weight
    fused = stacked_rows([q, k, v])
    assert fused is not None
    assert fused.data_ptr() == q.data_ptr() and k.data_ptr() == q.data_ptr() + q.numel() * q.element_size()
    assert torch.equal(fused, torch.cat([q, k, v]))


def random_attention(seed: int, dim=32, heads=2) -> CrossAttention:
    attn = CrossAttention(dim, dim, heads, dim // heads, fused_qkv=True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return attn


def test_built_stacked_and_cross_attention_is_not():
    attn = random_attention(0)
    assert_stacked(attn)
    cross = CrossAttention(32, 24, 2, 16, fused_qkv=True)  # k and v read the context: nothing to stack
    assert not cross.fused_qkv


def test_stacked_rows_refuses_separate_or_reordered_weights():
    a, b, c = (torch.randn(3, 4) for _ in range(3))
    assert stacked_rows([a, b, c]) is None
    buf = torch.randn(9, 4)
    assert stacked_rows([buf[0:3], buf[3:6], buf[6:9]]) is not None
    assert stacked_rows([buf[3:6], buf[0:3], buf[6:9]]) is None  # order matters: q, k, v
    ps = [torch.nn.Parameter(t) for t in (a, b, c)]
    ids = [id(p) for p in ps]
    stack_rows_(ps)
    assert [id(p) for p in ps] == ids and stacked_rows(ps) is not None
    assert torch.equal(ps[1], b)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_one_gemm_equals_three_projections(backend, batch):
    attn = random_attention(batch).to(DEVICE)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(batch, 11, 32, generator=g).to(DEVICE)
    r = torch.randn(batch, 11, 32, generator=g).to(DEVICE)
    with torch.no_grad(), dispatch.force(backend):
        got = attn(x, residual=r)
        attn.fused_qkv = False  # the three projections apart
        ref = attn(x, residual=r)
    assert relative_error(got, ref) <= 1e-5


def test_one_launch_for_q_k_v():
    attn = random_attention(1)
    x = torch.randn(2, 11, 32)
    with _triton.recording() as launches, dispatch.force("triton"), torch.no_grad():
        attn(x)
    gemms = [args for kernel, args, _ in launches if kernel is linear._linear_kernel]
    assert len(gemms) == 2  # q/k/v in one, the out-projection
    assert gemms[0][1].shape == (96, 32) and gemms[0][1].data_ptr() == attn.to_q.weight.data_ptr()


@pytest.mark.parametrize("how", ["to-float64", "half", "load-assign", "load-copy"])
def test_stacked_again_after_to_and_loads(how):
    attn = random_attention(2)
    params = [attn.to_q.weight, attn.to_k.weight, attn.to_v.weight]
    values = [p.detach().clone() for p in params]
    if how == "to-float64":
        attn = attn.to(torch.float64)
    elif how == "half":
        attn = attn.half()
    else:
        state = {k: v.clone() + 1.0 for k, v in attn.state_dict().items()}
        attn.load_state_dict(state, assign=how == "load-assign")
        values = [state[f"to_{n}.weight"] for n in "qkv"]
    assert_stacked(attn)
    for p, v in zip((attn.to_q.weight, attn.to_k.weight, attn.to_v.weight), values):
        assert torch.equal(p, v.to(p.dtype))
    if how != "load-assign":  # the Parameter objects survive (LoraState holds them)
        assert [id(p) for p in params] == [id(attn.to_q.weight), id(attn.to_k.weight), id(attn.to_v.weight)]


def test_state_dict_gives_tensors_of_their_own(tmp_path):
    attn = random_attention(3)
    state = attn.state_dict()
    ptrs = {state[f"to_{n}.weight"].untyped_storage().data_ptr() for n in "qkv"}
    assert len(ptrs) == 3
    save_file(state, str(tmp_path / "attn.safetensors"))  # refuses tensors sharing memory
    assert attn.state_dict(keep_vars=True)["to_k.weight"] is attn.to_k.weight


def test_loaded_model_and_lora_switch_write_the_shared_storage(fixtures):
    """A model loaded for the Triton kernels (assigning load) is stacked; a LoRA switch writes into the shared rows
    (the fused GEMM sees it) and the pristine weights come back in the same storage."""
    model = load_model(fixtures / CHECKPOINT, text_heads=2, kernel_layout=True)
    attns = self_attentions(model)
    assert len(attns) >= 2
    for attn in attns.values():
        assert_stacked(attn)
    ptrs = {name: a.to_q.weight.data_ptr() for name, a in attns.items()}
    before = {name: stacked_rows([a.to_q.weight, a.to_k.weight, a.to_v.weight]).clone() for name, a in attns.items()}
    state = LoraState(model)
    state.apply([LoraSpec(fixtures / LORA, 1.0)])
    changed = 0
    for name, a in attns.items():
        assert_stacked(a)
        assert a.to_q.weight.data_ptr() == ptrs[name]
        changed += not torch.equal(stacked_rows([a.to_q.weight, a.to_k.weight, a.to_v.weight]), before[name])
    assert changed >= 1
    state.clear()
    for name, a in attns.items():
        assert torch.equal(stacked_rows([a.to_q.weight, a.to_k.weight, a.to_v.weight]), before[name])


def test_pickles_and_deep_copies_stacked(tmp_path):
    """torch.save / copy.deepcopy of a module keep working (no lambdas among its hooks) and keep the rows stacked."""
    import copy

    attn = random_attention(4)
    torch.save(attn, tmp_path / "attn.pt")
    loaded = torch.load(tmp_path / "attn.pt", weights_only=False)
    for a in (loaded, copy.deepcopy(attn)):
        assert_stacked(a)
        assert torch.equal(a.to_v.weight, attn.to_v.weight)
