"""CLIP tokenizer: exact ids against the fixtures (made by transformers' CLIPTokenizer and open_clip.tokenize),
and odd prompts against expectations computed independently from the vocabulary file or by the cleaning rules."""

from __future__ import annotations

import gzip
import subprocess
import sys
from importlib import resources

import pytest
import torch

from tritonsd.prompt.tokenizer import BOS_ID, EOS_ID, NUM_MERGES, CLIPTokenizer, TokenizerError, get_tokenizer

FLAVORS = ("transformers", "open_clip")


@pytest.fixture(scope="module")
def merge_ids() -> dict[str, int]:
    """Vocabulary id of every merged token, read straight from the gz file: 512 + the merge's rank (the 256 byte
    characters and their 256 ``</w>`` forms come first)."""
    path = resources.files("tritonsd.prompt").joinpath("data", "bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")[1:NUM_MERGES + 1]
    return {"".join(line.split()): 512 + rank for rank, line in enumerate(lines)}


# (reference file, tensor, flavour of the original, pad id)
FIXTURE_TOKENS = [
    ("sd1-tiny", "tokens.input_ids", "transformers", EOS_ID),
    ("sd1-inpaint-tiny", "tokens.input_ids", "transformers", EOS_ID),
    ("sd2v-tiny", "tokens.input_ids", "open_clip", 0),
    ("sdxl-tiny", "tokens.clip_l", "transformers", EOS_ID),
    ("sdxl-tiny", "tokens.open_clip", "open_clip", 0),
]


@pytest.mark.parametrize("name,key,flavor,pad", FIXTURE_TOKENS)
def test_fixture_token_ids_exact(reference, name, key, flavor, pad):
    tensors, meta = reference(name)
    prompts = meta["prompts"]
    ids = CLIPTokenizer(flavor)(prompts, pad_id=pad)
    assert ids.dtype == torch.long
    assert torch.equal(ids, tensors[key])
    # on these prompts the two originals agree, so the other flavour must give the same ids too
    other = CLIPTokenizer(FLAVORS[1 - FLAVORS.index(flavor)])
    assert torch.equal(other(prompts, pad_id=pad), tensors[key])


def test_untruncated_lengths_match_the_original(reference):
    tensors, meta = reference("sdxl-tiny")
    lengths = meta["tensors"]["tokens.clip_l"]["untruncated_lengths"]
    tok = get_tokenizer("transformers")
    assert [len(tok.encode(p)) + 2 for p in meta["prompts"]] == lengths


@pytest.mark.parametrize("flavor", FLAVORS)
def test_single_byte_ids_follow_the_byte_table(flavor):
    # printable bytes '!'..'~' come first in byte order; a lone character is a word end: 256 + position
    tok = CLIPTokenizer(flavor)
    for ch in "a!7z~":
        assert tok.encode(ch) == [256 + ord(ch) - ord("!")]
    assert tok.encode("a") == [320]


@pytest.mark.parametrize("word", ["photo", "horse", "astronaut", "painting", "riding", "night", "square"])
def test_whole_words_are_their_merge(merge_ids, word):
    assert get_tokenizer("transformers").encode(word) == [merge_ids[word + "</w>"]]
    assert get_tokenizer("open_clip").encode(word.upper()) == [merge_ids[word + "</w>"]]


@pytest.mark.parametrize("flavor", FLAVORS)
def test_whitespace_and_case_are_normalised(flavor):
    tok = CLIPTokenizer(flavor)
    assert tok.encode("  A\tPHOTO \n of  a   CAT\r\n ") == tok.encode("a photo of a cat")
    # ftfy: full-width letters and curly apostrophes become ASCII
    assert tok.encode("ＣＡＴ don’t") == tok.encode("cat don't")


def test_html_entities_follow_each_original(merge_ids):
    oc, tf = CLIPTokenizer("open_clip"), CLIPTokenizer("transformers")
    # ftfy unescapes entities itself (both flavours) unless the text contains '<'
    for tok in (oc, tf):
        assert tok.encode("cats &amp;amp; dogs") == tok.encode("cats & dogs")
        assert tok.encode("R&amp;B") == tok.encode("R&B")
    # open_clip / OpenAI CLIP additionally html.unescape twice; transformers' CLIPTokenizer does not
    assert oc.encode("<b>&amp;</b>") == oc.encode("<b>&</b>")
    assert tf.encode("<b>&amp;</b>") != tf.encode("<b>&</b>")
    assert merge_ids["amp</w>"] in tf.encode("<b>&amp;</b>")


def test_special_token_text_per_flavor():
    tf, oc = CLIPTokenizer("transformers"), CLIPTokenizer("open_clip")
    assert tf.encode("<|endoftext|>") == [EOS_ID]
    assert tf.encode("<|STARTOFTEXT|>") == [BOS_ID]
    assert oc.encode("<end_of_text>") == [EOS_ID]
    assert EOS_ID not in oc.encode("<|endoftext|>")
    assert EOS_ID not in tf.encode("<end_of_text>")


@pytest.mark.parametrize("text", ["東京の猫 🐱", "naïve café — ½ ∞", "ünïcödé ‽"])
def test_unicode_round_trips_through_bytes(text):
    tok = get_tokenizer("open_clip")
    ids = tok.encode(text)
    assert ids and all(0 <= i < BOS_ID for i in ids)
    words = tok._pattern.findall(tok.clean(text))  # decoding puts a space after each word
    assert tok.decode(ids) == " ".join(words)


@pytest.mark.parametrize("pad", [EOS_ID, 0])
def test_overlong_prompt_is_truncated_to_75_tokens(merge_ids, pad):
    tok = get_tokenizer("open_clip")
    prompt = "cat " * 100
    ids = tok([prompt, "cat"], pad_id=pad)
    cat = merge_ids["cat</w>"]
    assert ids.shape == (2, 77)
    assert ids[0].tolist() == [BOS_ID] + [cat] * 75 + [EOS_ID]
    assert ids[1].tolist() == [BOS_ID, cat, EOS_ID] + [pad] * 74
    assert tok.truncated_words(prompt) == " ".join(["cat"] * 25)
    assert tok.truncated_words("cat " * 75) == ""
    assert tok.truncated_words("cat " * 76) == "cat"


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t"])
def test_empty_prompt(prompt):
    tok = get_tokenizer("transformers")
    assert tok.encode(prompt) == []
    assert tok([prompt], pad_id=EOS_ID)[0].tolist() == [BOS_ID] + [EOS_ID] * 76
    assert tok([prompt], pad_id=0)[0].tolist() == [BOS_ID, EOS_ID] + [0] * 75
    assert tok.truncated_words(prompt) == ""


def test_single_string_and_custom_length():
    tok = get_tokenizer("open_clip")
    ids = tok("a photo of a cat", pad_id=0, length=5)
    assert ids.shape == (1, 5)
    assert ids[0].tolist() == [BOS_ID] + tok.encode("a photo of a cat")[:3] + [EOS_ID]


def test_bad_input_raises_clear_errors(tmp_path):
    with pytest.raises(TokenizerError, match="flavor"):
        CLIPTokenizer("sentencepiece")
    with pytest.raises(TokenizerError, match="string"):
        get_tokenizer("open_clip").encode(123)
    with pytest.raises(TokenizerError, match="vocabulary"):
        CLIPTokenizer(vocab_path=str(tmp_path / "missing.txt.gz")).encode("a")
    bad = tmp_path / "bad.txt.gz"
    bad.write_bytes(gzip.compress(b"header\na b\n"))
    with pytest.raises(TokenizerError, match="merge list"):
        CLIPTokenizer(vocab_path=str(bad)).encode("a")


def test_vocabulary_is_not_read_at_import():
    code = ("import tritonsd.model.conditioner, tritonsd.prompt.tokenizer as t; "
            "print(t._load_vocab.cache_info().currsize)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0"
