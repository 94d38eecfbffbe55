"""A1111 noise: the NV (Philox) numbers and ImageRNG against rng-philox (webui's own rng_philox.py / rng.py),
and the cpu / gpu sources and errors."""

from __future__ import annotations

import pytest
import torch

from tritonsd.sampler.rng import ImageRNG, PhiloxGenerator, RNGError, check_source, randn, slerp

NV_BOUND = 1e-6


def _shape(text):
    return tuple(int(x) for x in text.split("x"))


def test_philox_draws_match_a1111(reference):
    tensors, _ = reference("rng-philox")
    checked = 0
    for key, ref in tensors.items():
        parts = key.split(".")
        if parts[0] == "philox":
            g = PhiloxGenerator(int(parts[1][len("seed"):]))
            got = g.randn(_shape(parts[2]))
            if key.endswith(".draw2"):
                got = g.randn(_shape(parts[2]))
            got = torch.from_numpy(got)
        elif parts[0] == "rng" and parts[1] == "randn":
            got = randn(int(parts[2][len("seed"):]), (4, 32, 32), source="nv")
        elif parts[0] == "rng" and parts[1] == "randn_without_seed":
            g = PhiloxGenerator(int(parts[2][len("seed"):]))
            g.randn((4, 32, 32))
            got = torch.from_numpy(g.randn((4, 32, 32)))
        else:
            continue
        assert got.shape == ref.shape and got.dtype == torch.float32, key
        assert (got - ref).abs().max().item() <= NV_BOUND, key
        checked += 1
    assert checked == 24


def test_rng_philox_docstring_example():
    # the example in A1111's rng_philox.py docstring (printed with numpy's 8 digits)
    expected = torch.tensor([[-0.92466259, -0.42534415, -2.6438457, 0.14518388],
                             [-0.12086647, -0.57972564, -0.62285122, -0.32838709],
                             [-1.07454231, -0.36314407, -1.67105067, 2.26550497]])
    got = torch.from_numpy(PhiloxGenerator(0).randn((3, 4)))
    assert (got - expected).abs().max().item() < 1e-6


@pytest.mark.parametrize("seed", [0, 1, 42, 4294967295])
def test_image_rng_first_and_next_match_a1111(reference, seed):
    tensors, _ = reference("rng-philox")
    rng = ImageRNG((4, 32, 32), [seed, seed + 1], source="nv")
    first, second = rng.next(), rng.next()
    assert (first - tensors[f"ImageRNG.seeds{seed}+1.first"]).abs().max().item() <= NV_BOUND
    assert (second - tensors[f"ImageRNG.seeds{seed}+1.next"]).abs().max().item() <= NV_BOUND


def test_variation_seed_matches_a1111(reference):
    tensors, _ = reference("rng-philox")
    rng = ImageRNG((4, 32, 32), [42, 43], subseeds=[1234, 1235], subseed_strength=0.3, source="nv")
    ref = tensors["ImageRNG.seeds42+1.subseeds1234+1.strength0.3.first"]
    assert (rng.next() - ref).abs().max().item() <= NV_BOUND


def test_variation_strength_ends_by_hand():
    a = randn(5, (4, 8, 8))
    b = randn(9, (4, 8, 8))
    assert torch.allclose(slerp(0.0, a, b), a, atol=1e-5)
    assert torch.allclose(slerp(1.0, a, b), b, atol=1e-5)
    # strength 0 leaves the seed's noise untouched (the subseed is not even drawn)
    assert torch.equal(ImageRNG((4, 8, 8), [5], subseeds=[9], subseed_strength=0.0).first()[0], a)


def test_image_i_has_seed_plus_i():
    batch = ImageRNG((4, 8, 8), [7, 8, 9]).first()
    for i in range(3):
        assert torch.equal(batch[i], randn(7 + i, (4, 8, 8)))


def test_cpu_source_is_the_torch_cpu_generator():
    rng = ImageRNG((4, 8, 8), [3, 4], source="cpu")
    first = rng.next()
    expected = [torch.randn((4, 8, 8), generator=torch.Generator("cpu").manual_seed(s)) for s in (3, 4)]
    assert torch.equal(first, torch.stack(expected))
    g = torch.Generator("cpu").manual_seed(3)
    torch.randn((4, 8, 8), generator=g)
    assert torch.equal(rng.next()[0], torch.randn((4, 8, 8), generator=g))


def test_seed_resize_pastes_the_centre():
    rng = ImageRNG((4, 8, 8), [11], seed_resize_from_h=32, seed_resize_from_w=32)
    got = rng.first()[0]
    small = randn(11, (4, 4, 4))
    assert torch.equal(got[:, 2:6, 2:6], small)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_gpu_source_is_refused_without_cuda():
    with pytest.raises(RNGError) as e:
        check_source("gpu")
    assert "\n" not in str(e.value) and "nv" in str(e.value)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nv_equals_cuda_randn():
    torch.manual_seed(42)
    cuda = torch.randn((4, 64, 64), device="cuda").cpu()
    assert (cuda - randn(42, (4, 64, 64), source="nv")).abs().max().item() <= NV_BOUND
    assert torch.equal(randn(42, (4, 64, 64), source="gpu"), cuda)


def test_bad_seeds_and_sources_are_one_line():
    for bad in (-1, 2 ** 64, 1.5, "7", True):
        with pytest.raises(RNGError) as e:
            ImageRNG((4, 8, 8), [bad])
        assert "\n" not in str(e.value)
    with pytest.raises(RNGError):
        check_source("tpu")
    with pytest.raises(RNGError):
        ImageRNG((4, 8), [1])
