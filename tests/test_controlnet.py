"""ControlNet against the fixtures (README-controlnet.md): the original lllyasviel/ControlNet code's residuals,
controlled UNet outputs and whole demo runs, and sd-webui-controlnet's hooked UNet call per control mode and
guidance step, recomputed from both file forms (.pth, .safetensors) as ``tritonsd parity`` does; at odd latent
sizes the ControlNet and the controlled UNet against a literal transcription of ``cldm.py`` / ``hook.py``'s
loops; and a control that controls, through ``pipe(...)``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tritonsd.control import apply as C
from tritonsd.model.controlnet import ControlNet, load_controlnet
from tritonsd.model.layers import timestep_embedding
from tritonsd.sampler.control import ControlUnit
from tritonsd.testing import groups as G
from tritonsd.testing.reference import load_reference, relative_error

FP32_BOUND = 1e-4
FORMS = ("controlnet-sd1-tiny.pth", "controlnet-sd1-tiny.safetensors")
CANNY_NAMES = ("canny.",)  # the canny group: control/preprocess's canny (the doors of issue 23)


def _recompute(pipe, fixtures, name: str, form: str | None = None, only=None):
    path = fixtures / f"{name}.reference.safetensors"
    ref, meta = load_reference(path)
    if form is not None:
        meta = {**meta, "controlnet_file": form}
    ctx = G.Recompute(pipe, ref, meta, torch.device("cpu"), reference=path)
    out = {}
    with torch.no_grad():
        for group, names in G.group_names(ref, meta).items():
            if group == "canny" or (only is not None and group not in only):
                continue
            out.update(G.recompute_group(ctx, group, names))
    return ref, meta, out, ctx


def _check_all(ref, meta, out, groups) -> int:
    checked = 0
    for name, stored in ref.items():
        if name.split(".", 1)[0] not in groups or G.is_input(name, meta):
            continue
        if name not in out:
            assert name.endswith(CANNY_NAMES), f"{name} was not recomputed"
            continue
        got = out[name]
        assert tuple(got.shape) == tuple(stored.shape), name
        if stored.dtype == torch.uint8:
            assert (got.to(torch.int16) - stored.to(torch.int16)).abs().max() <= 1, name
        elif stored.is_floating_point():
            assert relative_error(got, stored) <= FP32_BOUND, (name, relative_error(got, stored))
        else:
            assert torch.equal(got, stored), name
        checked += 1
    return checked


def test_original_code_references_from_both_file_forms(pipes, fixtures):
    pipe = pipes("sd1-tiny")
    for form in FORMS:
        ref, meta, out, _ = _recompute(pipe, fixtures, "controlnet-sd1-tiny", form)
        assert _check_all(ref, meta, out, {"direct", "demo", "demo_guess"}) >= 40


def test_webui_references_from_both_file_forms(pipes, fixtures):
    pipe = pipes("sd1-tiny")
    for form in FORMS:
        ref, meta, out, ctx = _recompute(pipe, fixtures, "webui-controlnet-sd1-tiny", form)
        assert _check_all(ref, meta, out, {"webui"}) == 12
        # the stopped steps are the plain UNet, the active ones Balanced, exactly as the reference says
        assert torch.equal(out["webui.eps.guidance_step1"], out["webui.eps.plain"])
        assert torch.equal(out["webui.eps.guidance_step8"], out["webui.eps.plain"])
        assert torch.equal(out["webui.eps.guidance_step7"], out["webui.eps.balanced"])
        assert all(c["pass"] for c in ctx.checks)


def test_the_two_forms_hold_the_same_weights(pipes, fixtures):
    _, _, _, ctx = _recompute(pipes("sd1-tiny"), fixtures, "controlnet-sd1-tiny", only={"direct"})
    assert [c["name"] for c in ctx.checks] == ["controlnet_file.safetensors"] and ctx.checks[0]["pass"]


# ---------------------------------------------------------------- odd latent sizes, against literal loops


def _cldm_forward(net: ControlNet, x, hint, t, context):
    """lllyasviel ``cldm.ControlNet.forward``, line by line, over the network's own modules."""
    emb = net.time_embed(timestep_embedding(t, net.config.unet.model_channels))
    guided_hint = net.hint_features(hint)
    outs, h = [], x
    for module, zero_conv in zip(net.input_blocks, net.zero_convs):
        if guided_hint is not None:
            h = module(h, F.silu(emb), context)
            h = h + guided_hint
            guided_hint = None
        else:
            h = module(h, F.silu(emb), context)
        outs.append(zero_conv[0](h))
    h = net.middle_block(h, F.silu(emb), context)
    outs.append(net.middle_block_out[0](h))
    return outs


def _aligned_adding(base, x):
    """hook.py ``aligned_adding`` (no channel alignment)."""
    if isinstance(x, float):
        return base if x == 0.0 else base + x
    if x.shape[-2] > 1 or x.shape[-1] > 1:
        if base.shape[-2:] != x.shape[-2:]:
            x = F.interpolate(x, size=base.shape[-2:], mode="nearest")
    return base + x


def _hooked_unet(unet, x, t, context, control):
    """hook.py's hooked ``forward`` (U-Net encoder, middle, decoder with ``th.cat``), over the UNet's modules."""
    emb = F.silu(unet.time_embed(timestep_embedding(t, unet.cfg.model_channels)))
    control = list(control)
    hs, h = [], x
    for module in unet.input_blocks:
        h = module(h, emb, context)
        hs.append(h)
    h = unet.middle_block(h, emb, context)
    h = _aligned_adding(h, control.pop())
    for module in unet.output_blocks:
        skip = _aligned_adding(hs.pop(), control.pop())
        if h.shape[-2:] != skip.shape[-2:]:  # TorchHijackForUnet.cat
            h = F.interpolate(h, skip.shape[-2:], mode="nearest")
        h = module(torch.cat([h, skip], dim=1), emb, context)
    return unet.out[2](unet.out[0](h, silu=True))


def _odd_inputs(seed: int, h: int = 10, w: int = 6, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, h, w, generator=g), torch.rand(1, 3, 8 * h, 8 * w, generator=g),
            torch.tensor([617.375] * batch), torch.randn(batch, 77, 32, generator=g))


def test_odd_latent_sizes_against_the_original_loops(models, fixtures):
    model = models("sd1-tiny")
    unet = model.model.diffusion_model
    net = load_controlnet(fixtures / FORMS[0], unet)
    with torch.no_grad():
        for h, w in ((10, 6), (5, 7), (9, 9)):
            x, hint, t, context = _odd_inputs(h * 31 + w, h, w)
            residuals = net(x, t, context, hint=hint)
            expected = _cldm_forward(net, x, hint, t, context)
            assert [r.shape for r in residuals] == [e.shape for e in expected]
            assert all(torch.equal(r, e) for r, e in zip(residuals, expected))
            scales = C.control_scales(0.7, "My prompt is more important", len(residuals))
            control = [r * s for r, s in zip(residuals, scales)]
            got = unet(x, t, context, control=control)
            want = _hooked_unet(unet, x, t, context, control)
            assert relative_error(got, want) <= 1e-6
            assert relative_error(got, unet(x, t, context)) > 1e-3  # the control changed it


def test_residuals_of_another_size_are_resized_as_aligned_adding_does(models):
    unet = models("sd1-tiny").model.diffusion_model
    x, _, t, context = _odd_inputs(5, 8, 8)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        skips_shapes = []
        h = x
        emb = F.silu(unet.time_embed(timestep_embedding(t, unet.cfg.model_channels)))
        for module in unet.input_blocks:
            h = module(h, emb, context)
            skips_shapes.append(h.shape)
        mid = unet.middle_block(h, emb, context).shape
        # residuals at twice the size of their skips (a 1x1 one is broadcast, never resized)
        control = [torch.randn(s[0], s[1], 2 * s[2], 2 * s[3], generator=g) for s in skips_shapes]
        control.append(torch.randn(mid[0], mid[1], 1, 1, generator=g))
        got = unet(x, t, context, control=control)
        want = _hooked_unet(unet, x, t, context, control)
    assert relative_error(got, want) <= 1e-6


# ---------------------------------------------------------------- a control that controls


def test_a_control_changes_the_pixels_and_a_zero_weight_changes_nothing(pipes, fixtures, reference):
    pipe = pipes("sd1-tiny")
    ref, _ = reference("controlnet-sd1-tiny")
    hint = ref["canny.control"]
    fields = dict(prompt="a red circle", seed=7, steps=3, width=128, height=64, sampler="euler")
    plain = pipe.generate(pipe.settings(**fields))
    unit = ControlUnit(fixtures / FORMS[1], image=hint)
    controlled = pipe.generate(pipe.settings(controls=(unit,), **fields))
    zero = pipe.generate(pipe.settings(controls=(ControlUnit(fixtures / FORMS[1], image=hint, weight=0.0),), **fields))
    assert (controlled - plain).abs().max() > 0.05
    assert torch.equal(zero, plain)


def test_pipe_call_takes_units_and_loads_each_file_once(pipes, fixtures, reference):
    pipe = pipes("sd1-tiny")
    ref, _ = reference("controlnet-sd1-tiny")
    hint = ref["canny.control"]
    net = pipe.controlnet(fixtures / FORMS[0])
    units = [ControlUnit(fixtures / FORMS[0], image=hint, weight=0.5),
             ControlUnit(fixtures / FORMS[0], image=hint.flip(-1), control_mode="control")]
    images = pipe("a red circle", controls=units, seed=1, steps=2, width=128, height=64, sampler="dpmpp_2m")
    assert len(images) == 1 and images[0].size == (128, 64)
    assert pipe.controlnet(fixtures / FORMS[0]) is net and pipe.controlnet(str(fixtures / FORMS[0])) is net


# ---------------------------------------------------------------- groups as a reference JSON would describe them


def _odd_reference(tmp_path, fixtures, tensors: dict, meta: dict):
    """A reference of ``tensors`` with ``meta`` in ``tmp_path``, the ControlNet file beside it."""
    (tmp_path / FORMS[1]).symlink_to(fixtures / FORMS[1])
    path = tmp_path / "odd.reference.safetensors"
    return path, {"controlnet_file": FORMS[1], **meta}


def _recompute_groups(pipe, ref, meta, path):
    ctx = G.Recompute(pipe, ref, meta, torch.device("cpu"), reference=path)
    out = {}
    with torch.no_grad():
        for group, names in G.group_names(ref, meta).items():
            out.update(G.recompute_group(ctx, group, names))
    return out, ctx


def test_an_odd_group_is_recomputed_from_what_it_holds(pipes, fixtures, tmp_path):
    """``odd``: x 10x6 latent, hint 80x48, the residuals and a mid-only / scaled eps of the original's
    ControlledUnetModel loop, expected from the literal loops above."""
    pipe = pipes("sd1-tiny")
    unet = pipe.model.model.diffusion_model
    net = load_controlnet(fixtures / FORMS[1], unet)
    x, hint, t, context = _odd_inputs(17)
    hint = torch.cat([hint, hint.flip(-1)])
    t = torch.tensor([980, 250])
    with torch.no_grad():
        residuals = _cldm_forward(net, x, hint, t, context)
        scales = [0.5 * (0.825 ** float(12 - i)) for i in range(13)]
        eps = _hooked_unet(unet, x, t, context, [r * s for r, s in zip(residuals, scales)])
    tensors = {"odd.x": x, "odd.hint": hint, "odd.t": t, "odd.context": context, "odd.eps.guess0p5": eps,
               **{f"odd.control.{i:02d}": r for i, r in enumerate(residuals)}}
    meta = {"tensors": {"odd.x": {"produced_by": "torch.randn(...)"},
                        "odd.eps.guess0p5": {"control_scales": scales, "only_mid_control": False}}}
    path, meta = _odd_reference(tmp_path, fixtures, tensors, meta)
    out, _ = _recompute_groups(pipe, tensors, meta, path)
    assert {n for n in tensors if not G.is_input(n, meta)} <= set(out)
    for name in tensors:
        if not G.is_input(name, meta):
            assert relative_error(out[name], tensors[name]) <= 1e-6, name


def test_a_webui_odd_group_is_recomputed_from_what_it_holds(pipes, fixtures, tmp_path):
    """``webui_odd``: the hooked UNet call of each mode at a 10x6 latent, expected from hook.py's formulas and
    the literal loops: marked prompts, cond_mark, soft scales, the uncond rows without control."""
    pipe = pipes("sd1-tiny")
    unet = pipe.model.model.diffusion_model
    net = load_controlnet(fixtures / FORMS[1], unet)
    g = torch.Generator().manual_seed(23)
    x, hint = torch.randn(2, 4, 10, 6, generator=g), torch.rand(1, 3, 80, 48, generator=g)
    cond, uncond = torch.randn(2, 77, 32, generator=g), torch.randn(2, 77, 32, generator=g)
    x_in, t_in = torch.cat([x, x]), torch.full((4,), 421.5)
    context = torch.cat([cond, uncond])
    cond_mark = torch.tensor([1.0, 1.0, 0.0, 0.0])[:, None, None, None]
    weight = 0.65
    tensors = {"webui_odd.x": x, "webui_odd.hint": hint, "webui_odd.cond": cond, "webui_odd.uncond": uncond}
    entries = {}
    with torch.no_grad():
        control = _cldm_forward(net, x_in, hint, t_in, context)
        for mode, soft, cfg in (("Balanced", False, False), ("My prompt is more important", True, False),
                                ("ControlNet is more important", True, True)):
            c = [r * cond_mark for r in control] if cfg else control
            scales = [weight * (0.825 ** float(12 - i)) for i in range(13)] if soft else [weight] * 13
            name = f"webui_odd.eps.{mode.split()[0].lower()}"
            tensors[name] = _hooked_unet(unet, x_in, t_in, context, [r * s for r, s in zip(c, scales)])
            entries[name] = {"control_mode": mode, "weight": weight}
        # no unit: total_controlnet_embedding stays [0.0] * 13
        tensors["webui_odd.eps.plain"] = _hooked_unet(unet, x_in, t_in, context, [0.0] * 13)
    meta = {"t": 421.5, "weight": weight, "tensors": {"webui_odd.x": {"produced_by": "torch.randn(...)"},
                                                      **entries}}
    path, meta = _odd_reference(tmp_path, fixtures, tensors, meta)
    out, _ = _recompute_groups(pipe, tensors, meta, path)
    assert torch.equal(out["webui_odd.cond_mark"], cond_mark.flatten())
    assert out["webui_odd.context_in"].shape == (4, 78, 32)
    for name in tensors:
        if not G.is_input(name, meta):
            assert relative_error(out[name], tensors[name]) <= 1e-6, name
    plain = tensors["webui_odd.eps.plain"]
    assert torch.allclose(out["webui_odd.eps.controlnet"][2:], plain[2:], rtol=0, atol=1e-6)
    # a JSON that states t and the weight only through the stored t_in and the produced_by text
    sparse = {"controlnet_file": FORMS[1], "tensors": {
        "webui_odd.x": {"produced_by": "torch.randn(...)"},
        **{n: {"control_mode": e["control_mode"], "produced_by": f"hooked UNet, weight {weight}"}
           for n, e in entries.items()}}}
    again, _ = _recompute_groups(pipe, {**tensors, "webui_odd.t_in": t_in}, sparse, path)
    assert all(torch.equal(again[n], out[n]) for n in entries)


def test_a_second_file_form_with_other_weights_is_recomputed_too(pipes, fixtures, tmp_path):
    """Where the .safetensors does not hold the .pth's float32 values, its outputs are checked as well: a form
    made 1 % off fails rows that the .pth alone passes."""
    from safetensors.torch import save_file

    from tritonsd.formats.controlnet_file import read_controlnet

    weights = read_controlnet(fixtures / FORMS[0]).weights
    save_file({f"control_model.{k}": (v * 1.01).contiguous() for k, v in weights.items()},
              str(tmp_path / "off.safetensors"))
    (tmp_path / FORMS[0]).symlink_to(fixtures / FORMS[0])
    name = "webui-controlnet-sd1-tiny"
    ref, meta = load_reference(fixtures / f"{name}.reference.safetensors")
    path = tmp_path / f"{name}.reference.safetensors"
    for forms, passes in (({"pth": FORMS[0]}, True), ({"pth": FORMS[0], "safetensors": "off.safetensors"}, False)):
        out, ctx = _recompute_groups(pipes("sd1-tiny"), ref, {**meta, "controlnet_file": forms}, path)
        err = relative_error(out["webui.eps.balanced"], ref["webui.eps.balanced"])
        assert (err <= FP32_BOUND) == passes, err
    notes = {c["name"]: c["note"] for c in ctx.checks}
    assert "recomputed too" in notes["controlnet_file.safetensors"]


def test_img2img_unit_without_image_takes_the_init_image(pipes, fixtures):
    pipe = pipes("sd1-tiny")
    init = torch.linspace(-1, 1, 3 * 64 * 128).reshape(1, 3, 64, 128)
    fields = dict(prompt="a red circle", seed=5, steps=3, width=128, height=64, sampler="euler", init_image=init,
                  strength=0.75)
    implicit = pipe.generate(pipe.settings(controls=(ControlUnit(fixtures / FORMS[1]),), **fields))
    # the extension takes webui's init image as an 8-bit picture: the same picture given as the unit's image
    picture = ((init[0].permute(1, 2, 0) + 1) / 2 * 255).round().to(torch.uint8).numpy()  # [H, W, 3]
    explicit = pipe.generate(pipe.settings(controls=(ControlUnit(fixtures / FORMS[1], image=picture),), **fields))
    plain = pipe.generate(pipe.settings(**fields))
    assert torch.equal(implicit, explicit) and (implicit - plain).abs().max() > 1e-3


def test_an_inpainting_model_feeds_the_controlnet_its_latent_channels(pipes, fixtures):
    """A 9-channel UNet with a 4-channel ControlNet: the ControlNet sees x[:, :4] (the extension's inpaint-model
    workaround)."""
    pipe = pipes("sd1-inpaint-tiny")
    g = torch.Generator().manual_seed(2)
    init, mask = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1, (torch.rand(1, 1, 64, 64, generator=g) > 0.5).float()
    fields = dict(prompt="a red circle", seed=5, steps=2, width=64, height=64, sampler="euler", init_image=init,
                  mask=mask)
    unit = ControlUnit(fixtures / FORMS[1], image=torch.rand(1, 3, 64, 64, generator=g))
    controlled = pipe.generate(pipe.settings(controls=(unit,), **fields))
    plain = pipe.generate(pipe.settings(**fields))
    assert torch.isfinite(controlled).all() and (controlled - plain).abs().max() > 1e-3


def test_a_loaded_controlnet_elsewhere_is_refused_in_one_line(pipes, fixtures):
    from tritonsd.model.controlnet import ControlNetError

    pipe = pipes("sd1-tiny")
    half = load_controlnet(fixtures / FORMS[1], pipe.model.model.diffusion_model, dtype=torch.float16)
    with pytest.raises(ControlNetError, match="move it"):
        pipe.controlnet(half)


def test_only_masked_inpainting_feeds_the_units_the_cut_init_image(pipes, fixtures):
    """"Only masked": a unit without an image takes the init image as sent, cut to the masked region as the unit's
    own image is (the extension's ``try_crop_image_with_a1111_mask``), not the filled image the model starts from:
    the same picture given as the unit's image gives the same pixels."""
    from PIL import Image

    pipe = pipes("sd1-tiny")
    rng = np.random.RandomState(8)
    init = rng.randint(0, 256, size=(128, 128, 3)).astype(np.uint8)
    mask = np.zeros((128, 128), np.uint8)
    mask[40:80, 30:90] = 255
    fields = dict(prompt="a red circle", seed=5, steps=2, width=64, height=64, sampler="euler",
                  init_image=Image.fromarray(init), mask=Image.fromarray(mask), inpaint_full_res=True,
                  inpainting_fill=0)
    implicit = pipe.generate(pipe.settings(controls=(ControlUnit(fixtures / FORMS[1]),), **fields))
    explicit = pipe.generate(pipe.settings(controls=(ControlUnit(fixtures / FORMS[1], image=init),), **fields))
    plain = pipe.generate(pipe.settings(**fields))
    assert torch.equal(implicit, explicit) and (implicit - plain).abs().max() > 1e-3
