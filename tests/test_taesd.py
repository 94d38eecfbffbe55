"""TAESD's decoder for live previews (``serve --taesd FILE``): a file laid out as madebyollin's
``taesd_decoder.pth`` / ``.safetensors`` (the decoder is an ``nn.Sequential``; typed here from his ``taesd.py``,
random weights) loads strictly and decodes as his module does, and the preview is webui's TAESD preview of it."""

from __future__ import annotations

import base64
import io
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from tritonsd.model.taesd import TAESDFileError, load_taesd_decoder
from tritonsd.serve.previews import Previews


# ---------------------------------------------------------------- madebyollin/taesd's decoder, as he writes it


def _conv(n_in, n_out, **kwargs):
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class _Clamp(nn.Module):
    def forward(self, x):
        return torch.tanh(x / 3) * 3


class _Block(nn.Module):
    def __init__(self, n_in, n_out):
        super().__init__()
        self.conv = nn.Sequential(_conv(n_in, n_out), nn.ReLU(), _conv(n_out, n_out), nn.ReLU(), _conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x):
        return self.fuse(self.conv(x) + self.skip(x))


def reference_decoder(latent_channels=4):
    return nn.Sequential(
        _Clamp(), _conv(latent_channels, 64), nn.ReLU(),
        _Block(64, 64), _Block(64, 64), _Block(64, 64), nn.Upsample(scale_factor=2), _conv(64, 64, bias=False),
        _Block(64, 64), _Block(64, 64), _Block(64, 64), nn.Upsample(scale_factor=2), _conv(64, 64, bias=False),
        _Block(64, 64), _Block(64, 64), _Block(64, 64), nn.Upsample(scale_factor=2), _conv(64, 64, bias=False),
        _Block(64, 64), _conv(64, 3),
    )


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    return reference_decoder().eval()


def test_safetensors_and_pth_files_load_and_decode_as_the_original(reference, tmp_path):
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    save_file(state, tmp_path / "taesd_decoder.safetensors")
    torch.save(state, tmp_path / "taesd_decoder.pth")
    save_file({f"decoder.{k}": v for k, v in state.items()}, tmp_path / "prefixed.safetensors")
    latent = torch.randn(1, 4, 6, 5)
    with torch.no_grad():
        want = reference(latent)
    assert want.shape == (1, 3, 48, 40)
    for name in ("taesd_decoder.safetensors", "taesd_decoder.pth", "prefixed.safetensors"):
        decoder = load_taesd_decoder(tmp_path / name)
        with torch.no_grad():
            assert torch.equal(decoder(latent), want), name


def test_a_file_that_is_not_a_taesd_decoder_is_one_line(reference, tmp_path):
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    del state["19.bias"]
    save_file(state, tmp_path / "short.safetensors")
    with pytest.raises(TAESDFileError, match="1 missing \\(first '19.bias'\\)"):
        load_taesd_decoder(tmp_path / "short.safetensors")
    save_file({"encoder.weight": torch.zeros(3, 3)}, tmp_path / "other.safetensors")
    with pytest.raises(TAESDFileError, match="not a TAESD decoder") as e:
        load_taesd_decoder(tmp_path / "other.safetensors")
    assert "\n" not in str(e.value)


def test_the_preview_is_webuis_taesd_preview(reference, tmp_path):
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, tmp_path / "d.safetensors")
    previews = Previews(every=1, decoder=load_taesd_decoder(tmp_path / "d.safetensors"))
    latent = torch.randn(2, 4, 4, 4)
    with torch.no_grad():  # webui: decoder(x) * 2 - 1, then * 0.5 + 0.5, clamp, * 255, truncated; a row of two
        x = torch.clamp((torch.cat([reference(latent[i:i + 1]) for i in range(2)]) * 2 - 1) * 0.5 + 0.5, 0, 1)
    want = np.concatenate([(255.0 * np.moveaxis(x[i].numpy(), 0, 2)).astype(np.uint8) for i in range(2)], axis=1)
    assert previews.offer(0, latent, "sd1")
    deadline = time.monotonic() + 30
    while previews.image() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(previews.image()))))
    assert got.shape == (32, 64, 3) and np.array_equal(got, want)


def test_serve_refuses_a_missing_taesd_file(tmp_path, capsys):
    from tritonsd.tools.cli import main

    code = main(["serve", "--checkpoint", "demo:sd1", "--taesd", str(tmp_path / "nope.safetensors"), "--port", "0"])
    assert code == 2 and "--taesd" in capsys.readouterr().err
