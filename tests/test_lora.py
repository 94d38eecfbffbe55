"""LoRA on the model side: webui's merged weights (fixtures, SD1 and SDXL incl. the OpenCLIP in_proj stacking),
LoRA / LoCon / LoHa / LoKr files made here with the expected change computed independently (numpy, float64,
from the formulas of webui's network_*.py), the name mapping, in-place switching (clear is bit-exact, a failed
apply changes nothing), and bad input: another family, a truncated file, unmatched modules."""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tritonsd.lora.apply import LoraSpec, LoraState, LoraWarning, recompute_lora_reference
from tritonsd.formats.lora_file import LoraError, addnet_hash, read_lora
from tritonsd.lora.keys import LayerIndex
from tritonsd.model.load import load_model
from tritonsd.testing.reference import relative_error

BOUND = 1e-5  # the bound for merged weights


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def assert_bit_identical(model, saved, what):
    changed = [k for k, v in model.named_parameters() if not torch.equal(v, saved[k])]
    assert not changed, f"{what}: {len(changed)} weights differ (e.g. {changed[:2]})"


def f64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).numpy()


# ---------------------------------------------------------------- webui's merged weights (fixtures)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_merged_weights_match_webui(models, reference, fixtures, family):
    model = models(f"{family}-tiny")
    ref, meta = reference(f"lora-{family}-tiny")
    lora = fixtures / f"lora-{family}-tiny.safetensors"
    out = recompute_lora_reference(model, ref, meta, lora)
    assert sorted(out) == sorted(ref), "every merged.<key> of the reference is recomputed"
    worst = max((relative_error(out[k], ref[k]), k) for k in ref)
    assert worst[0] <= BOUND, f"{worst[1]}: relative error {worst[0]:.3g}"
    if family == "sdxl":
        stacked = [k for k in ref if k.endswith(".attn.in_proj_weight")]
        assert stacked and all(k.startswith("merged.conditioner.embedders.1.model.") for k in stacked)

    saved = snapshot(model)
    state = LoraState(model)
    try:
        report = state.apply([LoraSpec(lora, 0.7)])
        params = dict(model.named_parameters())
        changed = {k for k in params if not torch.equal(params[k], saved[k])}
        assert changed == {k[len("merged."):] for k in ref}, "exactly the reference's weights change"
        for k in ref:
            err = relative_error(params[k[len("merged."):]], ref[k])
            assert err <= BOUND, f"{k} applied in place: relative error {err:.3g}"
        assert report.weights_changed == len(ref)
        assert report.loras[0]["unmatched"] == 0 and report.loras[0]["matched"] == meta["n_webui_modules_matched"]
        assert report.pristine_bytes == sum(saved[k[len("merged."):]].numel() * 4 for k in ref)
    finally:
        state.clear()
    assert_bit_identical(model, saved, "after clear")


# ---------------------------------------------------------------- files made here, expected deltas in float64


def _rng_tensors(seed, **shapes):
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(s, generator=g) * 0.3).to(torch.float16) for k, s in shapes.items()}


def _expected_lora(t, alpha, rank, weight_shape):
    up = f64(t["up"]).reshape(f64(t["up"]).shape[0], -1)
    down = f64(t["down"]).reshape(f64(t["down"]).shape[0], -1)
    return (up @ down).reshape(weight_shape) * (alpha / rank if alpha is not None else 1.0)


def _cp(t, wa, wb):
    """lyco_helpers.make_weight_cp: sum_ij t[i,j,k,l] wa[i,o] wb[j,n] -> [o, n, k, l]."""
    return np.einsum("ijkl,io,jn->onkl", t, wa, wb)


UNET = "model.diffusion_model."
TE = "cond_stage_model.transformer.text_model.encoder.layers."


def synthetic_modules():
    """(kohya module name, our weight key, tensors to save, expected delta for multiplier 1 in float64)."""
    cases = []
    # plain LoRA on a text linear and a U-Net linear, with and without alpha
    t = _rng_tensors(1, up=(128, 4), down=(4, 32))
    cases.append(("lora_te_text_model_encoder_layers_1_mlp_fc1", TE + "1.mlp.fc1.weight",
                  {"lora_up.weight": t["up"], "lora_down.weight": t["down"], "alpha": torch.tensor(3.0)},
                  _expected_lora(t, 3.0, 4, (128, 32)), "te"))
    t = _rng_tensors(2, up=(64, 2), down=(2, 64))
    cases.append(("lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn1_to_q",
                  UNET + "output_blocks.5.1.transformer_blocks.0.attn1.to_q.weight",
                  {"lora_up.weight": t["up"], "lora_down.weight": t["down"]},
                  _expected_lora(t, None, 2, (64, 64)), "unet"))
    # LoCon 3x3 (resnet conv2 of the middle block: mid_block_resnets_1 -> middle_block.2)
    t = _rng_tensors(3, up=(64, 4, 1, 1), down=(4, 64, 3, 3))
    cases.append(("lora_unet_mid_block_resnets_1_conv2", UNET + "middle_block.2.out_layers.3.weight",
                  {"lora_up.weight": t["up"], "lora_down.weight": t["down"], "alpha": torch.tensor(1.0)},
                  _expected_lora(t, 1.0, 4, (64, 64, 3, 3)), "unet"))
    # LoCon with lora_mid (CP): einsum over mid [r, r, 3, 3]
    t = _rng_tensors(4, up=(64, 3, 1, 1), down=(3, 64, 1, 1), mid=(3, 3, 3, 3))
    mid_delta = np.einsum("nmkl,in,mj->ijkl", f64(t["mid"]), f64(t["up"])[:, :, 0, 0], f64(t["down"])[:, :, 0, 0])
    cases.append(("lora_unet_up_blocks_1_upsamplers_0_conv", UNET + "output_blocks.5.2.conv.weight",
                  {"lora_up.weight": t["up"], "lora_down.weight": t["down"], "lora_mid.weight": t["mid"],
                   "alpha": torch.tensor(1.5)}, mid_delta * 0.5, "unet"))
    # LoHa, linear
    t = _rng_tensors(5, w1a=(32, 4), w1b=(4, 32), w2a=(32, 4), w2b=(4, 32))
    hada = (f64(t["w1a"]) @ f64(t["w1b"])) * (f64(t["w2a"]) @ f64(t["w2b"]))
    cases.append(("lora_te_text_model_encoder_layers_0_self_attn_out_proj", TE + "0.self_attn.out_proj.weight",
                  {"hada_w1_a": t["w1a"], "hada_w1_b": t["w1b"], "hada_w2_a": t["w2a"], "hada_w2_b": t["w2b"],
                   "alpha": torch.tensor(2.0)}, hada * 0.5, "te"))
    # LoHa, 3x3 conv with CP tensors t1 / t2 (down_blocks_1 resnets_0 conv1: input_blocks.4.0.in_layers.2)
    t = _rng_tensors(6, w1a=(2, 64), w1b=(2, 32), w2a=(2, 64), w2b=(2, 32), t1=(2, 2, 3, 3), t2=(2, 2, 3, 3))
    hada_cp = _cp(f64(t["t1"]), f64(t["w1a"]), f64(t["w1b"])) * _cp(f64(t["t2"]), f64(t["w2a"]), f64(t["w2b"]))
    cases.append(("lora_unet_down_blocks_1_resnets_0_conv1", UNET + "input_blocks.4.0.in_layers.2.weight",
                  {"hada_w1_a": t["w1a"], "hada_w1_b": t["w1b"], "hada_w2_a": t["w2a"], "hada_w2_b": t["w2b"],
                   "hada_t1": t["t1"], "hada_t2": t["t2"]}, hada_cp, "unet"))
    # LoKr: full w1, w2 = a @ b (dim from w2_b, alpha applies)
    t = _rng_tensors(7, w1=(4, 4), w2a=(8, 2), w2b=(2, 32))
    kron = np.kron(f64(t["w1"]), f64(t["w2a"]) @ f64(t["w2b"]))
    cases.append(("lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_ff_net_2",
                  UNET + "input_blocks.2.1.transformer_blocks.0.ff.net.2.weight",
                  {"lokr_w1": t["w1"], "lokr_w2_a": t["w2a"], "lokr_w2_b": t["w2b"], "alpha": torch.tensor(1.0)},
                  kron * 0.5, "unet"))
    # LoKr on a 3x3 conv: w1 = a @ b, w2 from CP t2 (down_blocks_0 downsampler: input_blocks.3.0.op)
    t = _rng_tensors(8, w1a=(4, 1), w1b=(1, 4), w2a=(2, 8), w2b=(2, 8), t2=(2, 2, 3, 3))
    w1 = f64(t["w1a"]) @ f64(t["w1b"])
    w2 = _cp(f64(t["t2"]), f64(t["w2a"]), f64(t["w2b"]))  # [8, 8, 3, 3]
    kron4 = np.einsum("ab,cdkl->acbdkl", w1, w2).reshape(32, 32, 3, 3)
    cases.append(("lora_unet_down_blocks_0_downsamplers_0_conv", UNET + "input_blocks.3.0.op.weight",
                  {"lokr_w1_a": t["w1a"], "lokr_w1_b": t["w1b"], "lokr_w2_a": t["w2a"], "lokr_w2_b": t["w2b"],
                   "lokr_t2": t["t2"], "alpha": torch.tensor(4.0)}, kron4 * 2.0, "unet"))
    return cases


def write_lora(path, modules: dict[str, dict[str, torch.Tensor]], metadata=None):
    save_file({f"{m}.{p}": t.clone() for m, parts in modules.items() for p, t in parts.items()}, str(path),
              metadata=metadata)
    return path


def test_synthetic_lora_locon_loha_lokr(models, tmp_path):
    model = models("sd1-tiny")
    cases = synthetic_modules()
    path = write_lora(tmp_path / "mixed.safetensors", {name: parts for name, _, parts, _, _ in cases})
    saved = snapshot(model)
    te_mult, unet_mult = 0.6, -1.3
    state = LoraState(model)
    try:
        report = state.apply([LoraSpec(path, te_mult, unet_mult)])
        params = dict(model.named_parameters())
        for name, key, _, delta, tower in cases:
            expected = f64(saved[key]) + (te_mult if tower == "te" else unet_mult) * delta
            err = relative_error(params[key], torch.from_numpy(expected))
            assert err <= BOUND, f"{name}: relative error {err:.3g}"
        assert report.weights_changed == len(cases) and report.loras[0]["matched"] == len(cases)
        touched = {k for k in params if not torch.equal(params[k], saved[k])}
        assert touched == {key for _, key, _, _, _ in cases}
    finally:
        state.clear()
    assert_bit_identical(model, saved, "after clear")


def test_sd2_openclip_qkv_rows_and_mlp(models, tmp_path):
    """SD2's one OpenCLIP tower: q / k / v deltas land in their thirds of in_proj_weight, out_proj and the MLP
    in their own weights (lora_te_ names converted for SD2)."""
    model = models("sd2v-tiny")
    prefix = "lora_te_text_model_encoder_layers_1_"
    modules, expected = {}, {}
    attn = "cond_stage_model.model.transformer.resblocks.1."
    for i, (part, key) in enumerate([("self_attn_q_proj", None), ("self_attn_k_proj", None),
                                     ("self_attn_v_proj", None), ("self_attn_out_proj", "attn.out_proj.weight"),
                                     ("mlp_fc2", "mlp.c_proj.weight")]):
        out_features, in_features = (32, 128) if part == "mlp_fc2" else (32, 32)
        t = _rng_tensors(20 + i, up=(out_features, 2), down=(2, in_features))
        modules[prefix + part] = {"lora_up.weight": t["up"], "lora_down.weight": t["down"],
                                  "alpha": torch.tensor(1.0)}
        delta = _expected_lora(t, 1.0, 2, (out_features, in_features))
        if key is None:  # rows i*32 .. (i+1)*32 of in_proj_weight [96, 32]
            expected.setdefault(attn + "attn.in_proj_weight", np.zeros((96, 32)))[i * 32:(i + 1) * 32] = delta
        else:
            expected[attn + key] = delta
    path = write_lora(tmp_path / "sd2.safetensors", modules)
    saved = snapshot(model)
    state = LoraState(model)
    try:
        state.apply([LoraSpec(path, 0.9, 0.1)])  # text tower: the te multiplier
        params = dict(model.named_parameters())
        for key, delta in expected.items():
            err = relative_error(params[key], torch.from_numpy(f64(saved[key]) + 0.9 * delta))
            assert err <= BOUND, f"{key}: relative error {err:.3g}"
        assert {k for k in params if not torch.equal(params[k], saved[k])} == set(expected)
    finally:
        state.clear()
    assert_bit_identical(model, saved, "after clear")


def test_two_loras_add_in_order_and_switch_in_place(models, fixtures, tmp_path):
    model = models("sd1-tiny")
    cases = synthetic_modules()
    second = write_lora(tmp_path / "second.safetensors", {n: p for n, _, p, _, _ in cases})
    first = fixtures / "lora-sd1-tiny.safetensors"
    saved = snapshot(model)
    ptrs = {k: v.data_ptr() for k, v in model.named_parameters()}
    state = LoraState(model)
    try:
        state.apply([LoraSpec(second, 1.0)])
        state.apply([LoraSpec(first, 0.7), LoraSpec(second, 0.5, 0.25)])
        both = snapshot(model)
        state.apply([LoraSpec(first, 0.7)])
        only_first = snapshot(model)
        state.clear()
        fresh = LoraState(model)
        fresh.apply([LoraSpec(first, 0.7)])
        assert_bit_identical(model, only_first, "a switch equals a fresh apply")
        fresh.clear()
    finally:
        state.clear()
    assert {k: v.data_ptr() for k, v in model.named_parameters()} == ptrs, "no Parameter was reassigned"
    # LoRA 1 then LoRA 2, each term independent (float64)
    lora1 = read_lora(first).modules["lora_te_text_model_encoder_layers_1_mlp_fc1"]
    r = lora1["lora_down.weight"].shape[0]
    d1 = (f64(lora1["lora_up.weight"]) @ f64(lora1["lora_down.weight"])) * (lora1["alpha"].item() / r)
    d2 = cases[0][3]
    key = TE + "1.mlp.fc1.weight"
    expected = f64(saved[key]) + 0.7 * d1 + 0.5 * d2
    assert relative_error(both[key], torch.from_numpy(expected)) <= BOUND
    assert_bit_identical(model, saved, "after clear")


def test_inpainting_conv_in_delta_is_zero_padded(models, tmp_path):
    model = models("sd1-inpaint-tiny")
    t = _rng_tensors(9, up=(32, 4, 1, 1), down=(4, 4, 3, 3))
    path = write_lora(tmp_path / "conv_in.safetensors",
                      {"lora_unet_conv_in": {"lora_up.weight": t["up"], "lora_down.weight": t["down"]}})
    key = UNET + "input_blocks.0.0.weight"
    before = dict(model.named_parameters())[key].detach().clone()
    assert before.shape[1] == 9
    state = LoraState(model)
    try:
        state.apply([LoraSpec(path, 0.8)])
        after = dict(model.named_parameters())[key]
        assert torch.equal(after[:, 4:], before[:, 4:]), "mask / masked-image channels unchanged"
        expected = f64(before[:, :4]) + 0.8 * _expected_lora(t, None, 4, (32, 4, 3, 3))
        assert relative_error(after[:, :4], torch.from_numpy(expected)) <= BOUND
    finally:
        state.clear()


def test_half_precision_weights_are_rounded_once(fixtures):
    half = load_model(fixtures / "sd1-tiny.safetensors", fixtures / "sd1-tiny.yaml", text_heads=2,
                      dtype=torch.float16)
    lora = read_lora(fixtures / "lora-sd1-tiny.safetensors")
    module = lora.modules["lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj"]
    key = UNET + "middle_block.1.transformer_blocks.0.ff.net.0.proj.weight"
    w16 = dict(half.named_parameters())[key].detach().clone()
    r = module["lora_down.weight"].shape[0]
    delta = 0.7 * (f64(module["lora_up.weight"]) @ f64(module["lora_down.weight"])) * (module["alpha"].item() / r)
    exact = f64(w16) + delta
    state = LoraState(half)
    state.apply([LoraSpec(fixtures / "lora-sd1-tiny.safetensors", 0.7)])
    merged = dict(half.named_parameters())[key].detach()
    assert merged.dtype == torch.float16
    # one rounding: within half an fp16 ulp of the exact sum, plus the float32 sum's own error (two roundings,
    # the delta to fp16 first, reach a whole ulp)
    half_ulp = 0.5 * np.spacing(np.abs(exact).astype(np.float16)).astype(np.float64)
    float32_error = 2 * np.finfo(np.float32).eps * (np.abs(f64(w16)) + np.abs(delta))
    excess = (np.abs(f64(merged) - exact) - half_ulp - float32_error).max()
    assert excess <= 0, f"more than half an ulp from the exact merge ({excess:.3g})"
    rounded_twice = (w16.float() + torch.from_numpy(delta).half().float()).half()
    assert (np.abs(f64(rounded_twice) - exact) - half_ulp - float32_error).max() > 0, "the check can tell"
    state.clear()
    assert torch.equal(dict(half.named_parameters())[key], w16)


# ---------------------------------------------------------------- names


@pytest.mark.parametrize("module, expected", [
    ("lora_unet_conv_in", UNET + "input_blocks.0.0.weight"),
    ("lora_unet_conv_out", UNET + "out.2.weight"),
    ("lora_unet_time_embedding_linear_2", UNET + "time_embed.2.weight"),
    ("lora_unet_down_blocks_1_resnets_0_conv_shortcut", UNET + "input_blocks.4.0.skip_connection.weight"),
    ("lora_unet_down_blocks_2_attentions_1_proj_in", UNET + "input_blocks.8.1.proj_in.weight"),
    ("lora_unet_mid_block_resnets_1_time_emb_proj", UNET + "middle_block.2.emb_layers.1.weight"),
    ("lora_unet_up_blocks_0_upsamplers_0_conv", UNET + "output_blocks.2.1.conv.weight"),
    ("lora_unet_up_blocks_3_resnets_2_conv1", UNET + "output_blocks.11.0.in_layers.2.weight"),
    ("lora_unet_input_blocks_4_1_proj_in", UNET + "input_blocks.4.1.proj_in.weight"),  # original names
    ("lora_te_text_model_encoder_layers_1_self_attn_v_proj", TE + "1.self_attn.v_proj.weight"),
    ("lora_te1_text_model_encoder_layers_0_mlp_fc2", TE + "0.mlp.fc2.weight"),  # webui's SD1 fallback
    ("lora_unet_down_blocks_9_attentions_0_proj_in", None),
    ("lora_te2_text_model_encoder_layers_0_mlp_fc1", None),
])
def test_sd1_names(models, module, expected):
    target = LayerIndex(dict(models("sd1-tiny").named_parameters())).resolve(module)
    assert (target.param if target else None) == expected


def test_openclip_names(models):
    sd2 = LayerIndex(dict(models("sd2v-tiny").named_parameters()))
    attn = "cond_stage_model.model.transformer.resblocks.1.attn."
    q = sd2.resolve("lora_te_text_model_encoder_layers_1_self_attn_k_proj")
    assert (q.param, q.rows, q.is_text) == (attn + "in_proj_weight", (1, 3), True)
    assert sd2.resolve("lora_te_text_model_encoder_layers_1_self_attn_out_proj").param == attn + "out_proj.weight"
    assert sd2.resolve("lora_te_text_model_encoder_layers_0_mlp_fc2").param == \
        "cond_stage_model.model.transformer.resblocks.0.mlp.c_proj.weight"
    xl = LayerIndex(dict(models("sdxl-tiny").named_parameters()))
    v = xl.resolve("lora_te2_text_model_encoder_layers_2_self_attn_v_proj")
    assert (v.param, v.rows) == ("conditioner.embedders.1.model.transformer.resblocks.2.attn.in_proj_weight", (2, 3))
    assert xl.resolve("lora_te1_text_model_encoder_layers_2_mlp_fc1").param == \
        "conditioner.embedders.0.transformer.text_model.encoder.layers.2.mlp.fc1.weight"
    assert not xl.resolve("lora_unet_input_blocks_4_1_proj_in").is_text


# ---------------------------------------------------------------- bad input: one line, nothing changes


def test_failed_apply_changes_nothing(models, fixtures, tmp_path):
    model = models("sd1-tiny")
    good = fixtures / "lora-sd1-tiny.safetensors"
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-1000])
    # a file whose first modules fit and whose last one has the wrong shape
    t = _rng_tensors(10, up=(32, 4), down=(4, 32))
    parts = {"lora_up.weight": t["up"], "lora_down.weight": t["down"]}  # [32, 32]: fits q_proj, not fc1
    wrong = write_lora(tmp_path / "wrong_shape.safetensors", {
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj": parts,
        "lora_te_text_model_encoder_layers_0_mlp_fc1": parts,
    })
    state = LoraState(model)
    try:
        state.apply([LoraSpec(good, 0.7)])
        applied = snapshot(model)
        held = state.pristine_bytes
        for bad, needle in [(truncated, "truncated"), (fixtures / "lora-sdxl-tiny.safetensors", "SDXL"),
                            (wrong, "shape"), (tmp_path / "missing.safetensors", "no such file")]:
            with pytest.raises(LoraError, match=needle) as e:
                state.apply([LoraSpec(good, 0.3), LoraSpec(bad, 1.0)])
            assert "\n" not in str(e.value)
            assert_bit_identical(model, applied, f"after a failed apply ({bad.name})")
            assert state.pristine_bytes == held
    finally:
        state.clear()


def test_another_family_unet_only_is_refused(models, fixtures, tmp_path):
    """An SDXL U-Net-only file (no text-encoder names to tell) on SD1: its shapes do not fit."""
    xl = read_lora(fixtures / "lora-sdxl-tiny.safetensors")
    unet_only = {m: p for m, p in xl.modules.items() if m.startswith("lora_unet")}
    path = write_lora(tmp_path / "xl_unet.safetensors", unet_only)
    with pytest.raises(LoraError, match="another model"):
        LoraState(models("sd1-tiny")).apply([LoraSpec(path, 1.0)])


def test_unmatched_modules_warn_with_a_count(models, fixtures, tmp_path):
    model = models("sd1-tiny")
    lora = read_lora(fixtures / "lora-sd1-tiny.safetensors")
    extra = {f"lora_unet_nowhere_{i}": lora.modules["lora_unet_mid_block_resnets_0_time_emb_proj"] for i in range(3)}
    path = write_lora(tmp_path / "partly.safetensors", {**lora.modules, **extra})
    state = LoraState(model)
    try:
        with pytest.warns(LoraWarning, match="3 of 64 modules match no weight"):
            report = state.apply([LoraSpec(path, 0.7)])
        assert report.loras[0]["unmatched"] == 3 and report.loras[0]["matched"] == 61
        assert len(report.warnings) == 1 and "lora_unet_nowhere_0" in report.warnings[0]
    finally:
        state.clear()
    nothing = write_lora(tmp_path / "nothing.safetensors", extra)
    with pytest.raises(LoraError, match="none of its 3 modules"):
        state.apply([LoraSpec(nothing, 1.0)])


def test_unsupported_and_malformed_files(tmp_path):
    not_lora = tmp_path / "plain.safetensors"
    save_file({"weight": torch.zeros(2)}, str(not_lora))
    with pytest.raises(LoraError, match="not named <module>.<part>"):
        read_lora(not_lora)
    with pytest.raises(LoraError, match="only .safetensors"):
        read_lora(tmp_path / "old.pt")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(LoraError, match="not JSON"):
        read_lora(garbage)


def test_unsupported_module_type_is_an_error(models, tmp_path):
    path = write_lora(tmp_path / "ia3.safetensors",
                      {"lora_te_text_model_encoder_layers_0_mlp_fc1": {"weight": torch.ones(128)}})
    with pytest.raises(LoraError, match="IA3 modules are not supported"):
        LoraState(models("sd1-tiny")).apply([LoraSpec(path, 1.0)])


# ---------------------------------------------------------------- hashes


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_addnet_hash(fixtures, family):
    path = fixtures / f"lora-{family}-tiny.safetensors"
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    assert addnet_hash(path) == hashlib.sha256(data[8 + n:]).hexdigest()
    # kohya writes the same hash into the file's metadata (sshs_model_hash) when it saves
    assert addnet_hash(path) == read_lora(path).metadata["sshs_model_hash"]


def test_lora_hashes_infotext(fixtures):
    from a1111 import parse_infotext
    from tritonsd.formats.lora_file import lora_hashes_value
    from tritonsd.sampler.infotext import quote

    raw = lora_hashes_value([("lora-sd1-tiny", "3718a40f15e6"), ("odd:name,x", "0123456789ab")])
    assert raw == "lora-sd1-tiny: 3718a40f15e6, oddnamex: 0123456789ab"
    value = quote(raw)
    assert value == '"lora-sd1-tiny: 3718a40f15e6, oddnamex: 0123456789ab"'
    parsed = parse_infotext(f"a cat\nSteps: 20, Lora hashes: {value}, Version: x")
    assert parsed["Lora hashes"] == value and parsed["Version"] == "x"


def test_same_loras_again_is_a_no_op_until_the_file_changes(models, fixtures, tmp_path, monkeypatch):
    import os

    from tritonsd.lora import apply as L

    path = tmp_path / "copy.safetensors"
    path.write_bytes((fixtures / "lora-sd1-tiny.safetensors").read_bytes())
    model = models("sd1-tiny")
    saved = snapshot(model)
    state = LoraState(model)
    try:
        first = state.apply([LoraSpec(path, 0.7)])
        applied = snapshot(model)
        reads = []
        real_read = L.read_lora
        monkeypatch.setattr(L, "read_lora", lambda p: reads.append(p) or real_read(p))
        assert state.apply([LoraSpec(path, 0.7)]) is first and reads == []
        state.apply([LoraSpec(path, 0.5)])  # another multiplier: recomputed
        assert len(reads) == 1
        state.apply([LoraSpec(path, 0.7)])
        assert_bit_identical(model, applied, "back to 0.7")
        os.utime(path, ns=(1, 1))  # the file changed on disk: read again
        state.apply([LoraSpec(path, 0.7)])
        assert len(reads) == 3
    finally:
        state.clear()
    assert_bit_identical(model, saved, "after clear")
