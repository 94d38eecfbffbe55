import pytest
import torch
from PIL import Image

from tritonsd.sampler import infotext as png

from a1111 import parse_infotext


def test_infotext_reads_back_with_a1111_parser():
    info = png.Infotext("a cat, on a mat", "blurry", 20, "DPM++ 2M Karras", 7.5, 1234, 512, 768,
                        "abcdef0123", "v1-5-pruned-emaonly")
    fields = parse_infotext(info.render())
    assert fields["Prompt"] == "a cat, on a mat"
    assert fields["Negative prompt"] == "blurry"
    assert fields["Steps"] == "20"
    assert fields["Sampler"] == "DPM++ 2M Karras"
    assert fields["CFG scale"] == "7.5"
    assert fields["Seed"] == "1234"
    assert fields["Size"] == "512x768"
    assert fields["Model hash"] == "abcdef0123"
    assert fields["Model"] == "v1-5-pruned-emaonly"


def test_empty_negative_prompt_has_no_line():
    text = png.Infotext("", "", 10, "Euler", 1.0, 0, 64, 64, "0" * 10, "m").render()
    assert "Negative prompt" not in text
    assert text.split("\n")[0] == ""


def test_model_hash_is_sha256_prefix(tmp_path):
    import hashlib

    f = tmp_path / "m.bin"
    f.write_bytes(b"tritonsd" * 1000)
    from tritonsd.formats.hashes import model_hash

    assert model_hash(f) == hashlib.sha256(b"tritonsd" * 1000).hexdigest()[:10]


def test_write_png_roundtrip_and_deterministic(tmp_path):
    g = torch.Generator().manual_seed(0)
    image = png.to_pil(torch.rand(3, 24, 40, generator=g))
    a = png.write_png(tmp_path / "a.png", image, "hello\nSteps: 1")
    b = png.write_png(tmp_path / "b.png", image, "hello\nSteps: 1")
    assert a.read_bytes() == b.read_bytes()
    assert png.read_parameters(a) == "hello\nSteps: 1"
    with Image.open(a) as im:
        assert im.size == (40, 24) and im.mode == "RGB"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png"]  # no temporary left


def test_to_pil_truncates_like_original():
    x = torch.tensor([0.0, 0.5, 1.0, 1.5, -1.0]).view(1, 1, 5).expand(3, 1, 5)
    import numpy as np

    assert np.asarray(png.to_pil(x))[0, :, 0].tolist() == [0, 127, 255, 255, 0]


def test_failed_write_leaves_nothing(tmp_path):
    class Broken:
        def save(self, *a, **k):
            raise OSError("disk full")

    with pytest.raises(OSError):
        png.write_png(tmp_path / "x.png", Broken(), "p")
    assert list(tmp_path.iterdir()) == []


def test_written_png_is_not_private(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        path = png.write_png(tmp_path / "p.png", png.to_pil(torch.rand(3, 4, 4)), "p")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
