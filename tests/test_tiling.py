"""Tiling (seamless textures, issue 28): every UNet and VAE convolution pads circularly for a run, as
AUTOMATIC1111's ``apply_circular`` does; ``Tiling: True`` in the infotext, read back by ``from_infotext`` /
``--from-png``; the same bytes from Python, the CLI and batch (the server's door: tests/test_serve_api.py).

The seamlessness check: with every convolution circular the networks have no border, so rolling their input
rolls their output (by a multiple of the UNet's total stride, 8 latent cells, for the sampler loop; by any
amount, times 8 pixels, for the decoder). With zero padding the same comparison fails, so the check can fail."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from PIL import Image

import tritonsd
from tritonsd.kernels import dispatch
from tritonsd.model.layers import Conv2d, circular_padding
from tritonsd.sampler.settings import GenerationSettings, SettingsError, fields_from_infotext
from tritonsd.testing.reference import relative_error
from tritonsd.tools.cli import main

SMALL = dict(steps=2, width=64, height=64)
UNET_STRIDE = 8  # sd1-tiny's channel_mult has 4 levels: 3 stride-2 downsamples


@pytest.fixture(scope="module")
def pipe(fixtures):
    return tritonsd.load(fixtures / "sd1-tiny.safetensors", device="cpu", text_heads=2)


def padding_modes(pipe) -> set[str]:
    return {m.padding_mode for m in pipe.model.modules() if isinstance(m, Conv2d)}


# ---------------------------------------------------------------- the per-run switch


def test_circular_padding_is_scoped_to_the_block():
    net = torch.nn.Sequential(Conv2d(4, 4, 3, padding=1), torch.nn.Sequential(Conv2d(4, 4, 3, padding=1)))
    x = torch.randn(1, 4, 5, 6)
    zeros = net(x)
    with circular_padding(net):
        assert [m.padding_mode for m in net.modules() if isinstance(m, Conv2d)] == ["circular"] * 2
        wrapped = net(x)
        with circular_padding(net, False):  # nested: the inner block's mode, then the outer's again
            assert torch.equal(net(x), zeros)
        assert torch.equal(net(x), wrapped)
    assert [m.padding_mode for m in net.modules() if isinstance(m, Conv2d)] == ["zeros"] * 2
    assert not torch.equal(wrapped, zeros)
    with pytest.raises(RuntimeError), circular_padding(net):
        raise RuntimeError("a failed run")
    assert [m.padding_mode for m in net.modules() if isinstance(m, Conv2d)] == ["zeros"] * 2


def test_a_tiling_run_leaves_the_model_as_it_found_it(pipe):
    images = pipe("a brick wall", seed=3, tiling=True, **SMALL)
    assert padding_modes(pipe) == {"zeros"}
    plain = pipe("a brick wall", seed=3, **SMALL)
    assert images[0].tobytes() != plain[0].tobytes()
    assert padding_modes(pipe) == {"zeros"}


def test_tiling_must_be_a_bool():
    with pytest.raises(SettingsError, match="tiling"):
        GenerationSettings(prompt="x", tiling="yes").check()


# ---------------------------------------------------------------- seamless: no border anywhere


def _sampled(pipe, tiling: bool, roll: int):
    """Latents after the Pipeline's sampler loop (euler: no noise drawn in the loop), the start rolled by
    ``roll`` latent columns."""
    s = pipe.settings(prompt="a brick wall", seed=3, steps=2, width=128, height=64, sampler="euler", tiling=tiling)
    latents = pipe.prepare_latents(s)
    latents = dataclasses.replace(latents, x=latents.x.roll(roll, dims=-1))  # [1, 4, 8, 16] latent
    return pipe.denoise(latents, pipe.encode(s), s)


def test_sampler_loop_with_tiling_has_no_border(pipe):
    for tiling, check in ((True, lambda e: e <= 1e-5), (False, lambda e: e > 1e-2)):
        x = _sampled(pipe, tiling, 0)
        rolled = _sampled(pipe, tiling, UNET_STRIDE)
        err = relative_error(rolled, x.roll(UNET_STRIDE, dims=-1))
        assert check(err), f"tiling={tiling}: rolled start vs rolled result, relative error {err:.3g}"


def test_decoded_tiling_image_has_no_border(pipe):
    """The decoded image of a latent rolled by 3 cells is the image rolled by 24 pixels: the image tiles."""
    x = _sampled(pipe, True, 0)
    for tiling, check in ((True, lambda e: e <= 1e-5), (False, lambda e: e > 1e-2)):
        image = pipe.decode(x, tiling=tiling)
        err = relative_error(pipe.decode(x.roll(3, dims=-1), tiling=tiling), image.roll(24, dims=-1))
        assert check(err), f"tiling={tiling}: relative error {err:.3g}"
    assert padding_modes(pipe) == {"zeros"}


def test_triton_convolutions_have_no_border_either(pipe, monkeypatch):
    """The VAE decoder with every convolution on the Triton kernel (interpreted on the CPU; the other ops on
    their references, as the interpreter's group norm alone is slow) and tiling on gives the torch reference's
    image, rolled input and all."""
    from tritonsd.kernels import attention, group_norm

    for module, name in ((attention, "attention"), (group_norm, "group_norm")):
        monkeypatch.setattr(module, f"{name}_triton", getattr(module, f"{name}_reference"))
    z = torch.randn(1, 4, 2, 3, generator=torch.Generator().manual_seed(0))
    want = pipe.decode(z, tiling=True)
    with dispatch.force("triton"):
        got = pipe.decode(z, tiling=True)
        rolled = pipe.decode(z.roll(1, dims=-1), tiling=True)
    assert relative_error(got, want) <= 1e-4
    assert relative_error(rolled, got.roll(8, dims=-1)) <= 1e-4
    assert relative_error(got, pipe.decode(z)) > 1e-2  # the wrap-around changes the image (the check can fail)


# ---------------------------------------------------------------- the infotext


def test_infotext_writes_tiling_as_a1111_and_reads_it_back(pipe):
    [image] = pipe("a brick wall", seed=3, tiling=True, **SMALL)
    text = image.info["parameters"]
    # webui v1.10: Schedule type follows Sampler; RNG (nv: webui's "NV") then Tiling after the model, in that order
    assert text.endswith("Model: sd1-tiny, RNG: NV, Tiling: True")
    assert fields_from_infotext(text)[0]["tiling"] is True
    again = pipe.from_infotext(text)
    assert again.tiling is True
    [copy] = pipe(**{f.name: getattr(again, f.name) for f in dataclasses.fields(again)})
    assert copy.tobytes() == image.tobytes() and copy.info["parameters"] == text
    [plain] = pipe("a brick wall", seed=3, **SMALL)
    assert "Tiling" not in plain.info["parameters"]
    assert pipe.from_infotext(plain.info["parameters"]).tiling is False


def test_malformed_tiling_value_is_left_out_with_a_note():
    fields, notes = fields_from_infotext("x\nSteps: 2, Seed: 1, Size: 64x64, Tiling: maybe")
    assert "tiling" not in fields and any("Tiling" in n for n in notes)
    assert fields_from_infotext("x\nSteps: 2, Seed: 1, Tiling: False")[0]["tiling"] is False


# ---------------------------------------------------------------- the doors: Python, CLI, batch


def _written(capsys) -> list[Path]:
    return [Path(p) for p in capsys.readouterr().out.split()]


def test_cli_python_and_batch_give_the_same_bytes(pipe, fixtures, tmp_path, capsys):
    want = pipe.save(pipe("a brick wall", seed=3, tiling=True, **SMALL), tmp_path / "py")[0].read_bytes()
    args = ["generate", "--checkpoint", str(fixtures / "sd1-tiny.safetensors"), "--text-heads", "2", "--device",
            "cpu", "--quiet"]
    assert main([*args, "--prompt", "a brick wall", "--seed", "3", "--steps", "2", "--width", "64", "--height",
                 "64", "--tiling", "--out", str(tmp_path / "cli")]) == 0
    [cli_png] = _written(capsys)
    assert cli_png.read_bytes() == want
    # --from-png reproduces it; --no-tiling overrides the infotext's Tiling: True
    assert main([*args, "--from-png", str(cli_png), "--out", str(tmp_path / "again")]) == 0
    [again] = _written(capsys)
    assert again.read_bytes() == want
    assert main([*args, "--from-png", str(cli_png), "--no-tiling", "--out", str(tmp_path / "off")]) == 0
    [off] = _written(capsys)
    with Image.open(off) as im:
        assert "Tiling" not in im.info["parameters"]
    assert off.read_bytes() != want
    # batch's tiling field (a batch of one, as pipe(...) runs it), beside a job that does not tile
    report = tritonsd.batch(['{"id": "t", "prompt": "a brick wall", "seed": 3, "tiling": true, "steps": 2, '
                             '"width": 64, "height": 64}',
                             '{"id": "p", "prompt": "a brick wall", "seed": 3, "steps": 2, "width": 64, '
                             '"height": 64}'], tmp_path / "batch", pipe=pipe)
    assert sorted(report.written) == ["p", "t"]
    assert (tmp_path / "batch" / "t.png").read_bytes() == want
    assert (tmp_path / "batch" / "p.png").read_bytes() == off.read_bytes()


def test_batch_never_puts_tiling_and_plain_jobs_in_one_unet_batch():
    from tritonsd.batch import make_units, read_jobs

    jobs, bad = read_jobs(['{"id": "a", "tiling": true}', '{"id": "b"}', '{"id": "c", "tiling": false}',
                           '{"id": "d", "tiling": true}'])
    assert not bad and [j.settings.tiling for j in jobs] == [True, False, False, True]
    assert [[j.id for j in u] for u in make_units(jobs, 4)] == [["a", "d"], ["b", "c"]]
    assert [type(j).from_dict(j.to_dict()).settings.tiling for j in jobs] == [True, False, False, True]  # to Ray


def test_batch_refuses_a_non_bool_tiling(tmp_path):
    from tritonsd.batch import read_jobs

    jobs, rejected = read_jobs(['{"id": "a", "tiling": "yes"}'])
    assert not jobs and "tiling" in rejected[0].error
