"""Textual inversion against AUTOMATIC1111 (ti-{sd1,sdxl}-tiny with the embeddings/ folder): which files load or
are skipped, their hashes, the conditionings (within FP32_BOUND) and the TI hashes infotext; plus file formats
and bad files the fixtures lack."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from _prompt_models import tiny_model
from conftest import FP32_BOUND
from tritonsd.formats.embeddings import EmbeddingError, load_embedding_file, load_embeddings, ti_hashes
from tritonsd.prompt.encode import encode_prompts, load_model_embeddings
from tritonsd.prompt.tokenizer import get_tokenizer
from tritonsd.testing.reference import relative_error

CASES = [("sd1-tiny", "ti-sd1-tiny"), ("sdxl-tiny", "ti-sdxl-tiny")]


@pytest.mark.parametrize("model_name, ref_name", CASES)
def test_loading_matches_a1111(fixtures, reference, model_name, ref_name):
    _, meta = reference(ref_name)
    db, messages = load_model_embeddings(tiny_model(fixtures, model_name), fixtures / "embeddings")
    assert db.expected_shape == meta["expected_shape"]
    assert set(db.embeddings) == set(meta["embeddings_loaded"])
    assert set(db.skipped) == set(meta["embeddings_skipped_shape_mismatch"])
    for name, info in meta["embeddings_loaded"].items():
        e = db.embeddings[name]
        assert (e.vectors, e.shape, e.hash, e.shorthash) == (info["vectors"], info["shape"], info["hash"],
                                                             info["shorthash"])
        assert db.find_at(info["name_token_ids"], 0) == (e, len(info["name_token_ids"]))
    assert len(messages) == len(meta["embeddings_skipped_shape_mismatch"])
    for name in meta["embeddings_skipped_shape_mismatch"]:
        line = next(m for m in messages if name in m)
        assert "\n" not in line and "width" in line


@pytest.mark.parametrize("model_name, ref_name", CASES)
def test_conditionings_and_hashes_match_a1111(fixtures, reference, model_name, ref_name):
    tensors, meta = reference(ref_name)
    model = tiny_model(fixtures, model_name)
    db, _ = load_model_embeddings(model, fixtures / "embeddings")
    assert len(meta["cases"]) == 4
    for case in meta["cases"]:
        if model_name == "sdxl-tiny":
            out = encode_prompts(model, case["prompts"], embeddings=db, width=case["width"],
                                 height=case["height"])
            pairs = [(out.context, tensors[f"{case['name']}.crossattn"]),
                     (out.vector, tensors[f"{case['name']}.vector"])]
        else:
            out = encode_prompts(model, case["prompts"], embeddings=db)
            pairs = [(out.context, tensors[case["tensors"][0]])]
        for got, ref in pairs:
            assert got.shape == ref.shape, case["name"]
            err = relative_error(got, ref)
            assert err < FP32_BOUND, f"{case['name']}: {err}"
        assert out.ti_hashes == case["infotext_TI_hashes"], case["name"]


def test_embedding_changes_the_conditioning_only_where_used(fixtures):
    model = tiny_model(fixtures, "sd1-tiny")
    db, _ = load_model_embeddings(model, fixtures / "embeddings")
    with_db = encode_prompts(model, ["a red ball"], embeddings=db).context
    without = encode_prompts(model, ["a red ball"]).context
    assert torch.equal(with_db, without)
    assert encode_prompts(model, ["a red ball"], embeddings=db).ti_hashes == ""


def test_diffusers_and_single_tensor_formats(tmp_path):
    torch.save({"<inkwash>": torch.full((32,), 0.5)}, tmp_path / "inkwash.bin")
    save_file({"whatever": torch.ones(4, 32, dtype=torch.float16)}, str(tmp_path / "fourvec.safetensors"))
    save_file({"clip_l": torch.ones(2, 32), "clip_g": torch.ones(2, 48)}, str(tmp_path / "xl.safetensors"))
    ink = load_embedding_file(tmp_path / "inkwash.bin")
    assert (ink.name, ink.vectors, ink.shape) == ("inkwash", 1, 32)
    assert ink.vec.dtype == torch.float32 and torch.equal(ink.vec, torch.full((1, 32), 0.5))
    four = load_embedding_file(tmp_path / "fourvec.safetensors")
    assert (four.vectors, four.shape) == (4, 32)
    db, messages = load_embeddings(tmp_path, get_tokenizer("transformers"), {"clip_l": 32, "clip_g": 48})
    assert set(db.embeddings) == {"xl"} and set(db.skipped) == {"inkwash", "fourvec"}
    assert len(messages) == 2
    # an SDXL file whose widths sum right but split wrong is skipped too
    db2, messages2 = load_embeddings(tmp_path, get_tokenizer("transformers"), {"clip_l": 48, "clip_g": 32})
    assert "xl" in db2.skipped and len(messages2) == 3


def test_bad_files_are_skipped_with_one_line(tmp_path):
    (tmp_path / "garbage.pt").write_bytes(b"\x80\x04not a pickle at all")
    (tmp_path / "trunc.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    torch.save({"string_to_param": {"*": torch.ones(2, 32), "#": torch.ones(2, 32)}}, tmp_path / "two.pt")
    torch.save({"a": "text only"}, tmp_path / "notens.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "bad\x1bname.pt").write_bytes(b"junk")
    db, messages = load_embeddings(tmp_path, get_tokenizer("transformers"), {"clip_l": 32})
    assert not db.embeddings
    assert len(messages) == 5  # the empty file is ignored, as A1111
    for line in messages:
        assert "\n" not in line and "\x1b" not in line


def test_malicious_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"string_to_param": {"*": Evil()}}, tmp_path / "evil.pt")
    with pytest.raises(EmbeddingError, match="refused"):
        load_embedding_file(tmp_path / "evil.pt")


def test_ti_hashes_accumulate_as_a1111(fixtures):
    db, _ = load_embeddings(fixtures / "embeddings", get_tokenizer("transformers"), {"clip_l": 32})
    a, b = db.embeddings["tiny-style"], db.embeddings["lowpolyx"]
    # a second encoder call puts its entries before the value so far
    assert ti_hashes([[a], [b, a]]) == (f"lowpolyx: {b.shorthash}, tiny-style: {a.shorthash}, "
                                        f"tiny-style: {a.shorthash}")
    assert ti_hashes([[], []]) == ""
