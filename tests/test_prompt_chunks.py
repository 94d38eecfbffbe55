"""Chunking against AUTOMATIC1111's tokenize_line / process_tokens records in the prompt and TI fixtures (token
ids, multipliers, embedding fixes, token counts, encoder input ids: all exact), plus constructed cases."""

from __future__ import annotations

import json

import pytest

from tritonsd.formats.embeddings import load_embeddings
from tritonsd.prompt.chunks import MAX_PROMPT_TOKENS, PromptTooLongError, empty_chunk, model_input_ids, tokenize_prompt
from tritonsd.prompt.tokenizer import BOS_ID, EOS_ID, get_tokenizer

# reference -> [(record key, tokenizer flavour, pad id)]
TOWERS = {
    "prompts-sd1-tiny": [("prompts", "transformers", EOS_ID)],
    "prompts-sd2v-tiny": [("prompts", "open_clip", 0)],
    "prompts-sdxl-tiny": [("clip_l", "transformers", EOS_ID), ("open_clip_g", "open_clip", 0)],
    "ti-sd1-tiny": [("chunks", "transformers", EOS_ID)],
    "ti-sdxl-tiny": [("clip_l", "transformers", EOS_ID), ("open_clip_g", "open_clip", 0)],
}
TI_WIDTHS = {"ti-sd1-tiny": {"clip_l": 32}, "ti-sdxl-tiny": {"clip_l": 32, "clip_g": 32}}


def _records(fixtures, name):
    meta = json.loads((fixtures / f"{name}.reference.json").read_text())
    for case in meta["cases"]:
        for key, flavor, pad in TOWERS[name]:
            for record in case.get(key, []):
                if isinstance(record, dict) and "chunks" in record:
                    yield case["name"], record, flavor, pad


@pytest.mark.parametrize("name", list(TOWERS))
def test_chunks_match_a1111_exactly(fixtures, name):
    db = None
    if name in TI_WIDTHS:
        db, _ = load_embeddings(fixtures / "embeddings", get_tokenizer("transformers"), TI_WIDTHS[name])
    n = 0
    for case, record, flavor, pad in _records(fixtures, name):
        chunks, count = tokenize_prompt(record["prompt"], get_tokenizer(flavor), db)
        assert count == record["tokenize_line_token_count"], case
        assert len(chunks) == record["n_chunks"], case
        for got, want in zip(chunks, record["chunks"]):
            assert got.tokens == want["tokens"], case
            assert got.multipliers == want["multipliers"], case
            assert model_input_ids(got.tokens, EOS_ID, pad) == want["model_input_ids"], case
            fixes = [{"offset": o, "embedding": e.name, "vectors": e.vectors} for o, e in got.fixes]
            assert fixes == want.get("textual_inversion_fixes", []), case
        n += 1
    assert n >= 4


def _word_id(word):
    ids = get_tokenizer("transformers").encode(word)
    assert len(ids) == 1
    return ids[0]


def test_empty_prompt_and_only_break_are_one_padding_chunk():
    tok = get_tokenizer("transformers")
    for text in ("", "BREAK", "  BREAK  "):
        chunks, _ = tokenize_prompt(text, tok)
        assert len(chunks) == 1
        assert chunks[0].tokens == [BOS_ID] + [EOS_ID] * 76
        assert chunks[0].multipliers == [1.0] * 77
    assert tokenize_prompt("", tok)[1] == 0


def test_several_breaks_make_one_chunk_each():
    tok = get_tokenizer("transformers")
    cat, dog = _word_id("cat"), _word_id("dog")
    chunks, count = tokenize_prompt("cat BREAK dog BREAK cat", tok)
    assert [c.tokens[:3] for c in chunks] == [[BOS_ID, cat, EOS_ID], [BOS_ID, dog, EOS_ID], [BOS_ID, cat, EOS_ID]]
    assert count == 75 + 75 + 1


def test_weights_carry_across_chunks():
    tok = get_tokenizer("transformers")
    cat = _word_id("cat")
    chunks, count = tokenize_prompt("(" + "cat " * 80 + ":1.5)", tok)
    assert count == 80 and len(chunks) == 2
    assert chunks[0].tokens == [BOS_ID] + [cat] * 75 + [EOS_ID]
    assert chunks[0].multipliers == [1.0] + [1.5] * 75 + [1.0]
    assert chunks[1].tokens == [BOS_ID] + [cat] * 5 + [EOS_ID] * 71
    assert chunks[1].multipliers == [1.0] + [1.5] * 5 + [1.0] * 71


def test_comma_backtrack_by_hand():
    tok = get_tokenizer("transformers")
    cat, dog, comma = _word_id("cat"), _word_id("dog"), _word_id(",")
    # 60 cats, a comma, 20 dogs: the chunk fills at 75 with 14 dogs after the comma (15 <= 20 back), so the
    # 14 dogs move on; the second chunk holds all 20 dogs
    chunks, count = tokenize_prompt("cat " * 60 + ", " + "dog " * 20, tok)
    assert chunks[0].tokens == [BOS_ID] + [cat] * 60 + [comma] + [EOS_ID] * 15
    assert chunks[1].tokens == [BOS_ID] + [dog] * 20 + [EOS_ID] * 56
    # a comma further back than 20 tokens does not pull anything
    chunks, _ = tokenize_prompt("cat " * 50 + ", " + "dog " * 30, tok)
    assert chunks[0].tokens[1:76] == [cat] * 50 + [comma] + [dog] * 24


def test_prompt_limit_exactly_and_one_over():
    tok = get_tokenizer("transformers")
    chunks, count = tokenize_prompt("cat " * MAX_PROMPT_TOKENS, tok)
    assert count == MAX_PROMPT_TOKENS and len(chunks) == 14
    with pytest.raises(PromptTooLongError) as e:
        tokenize_prompt("cat " * (MAX_PROMPT_TOKENS + 1), tok)
    message = str(e.value)
    assert "\n" not in message and str(MAX_PROMPT_TOKENS + 1) in message and str(MAX_PROMPT_TOKENS) in message


def test_break_spam_is_refused_in_one_line():
    with pytest.raises(PromptTooLongError) as e:
        tokenize_prompt("a BREAK " * 100, get_tokenizer("transformers"))
    assert "\n" not in str(e.value)


def test_emoji_and_unbalanced_brackets_tokenize():
    tok = get_tokenizer("open_clip")
    for text in ["🐱🐶 (((", "[[[ a )", "\\", "((((((((((a))))))))))", "\x00\x07 ctrl"]:
        chunks, _ = tokenize_prompt(text, tok)
        assert chunks and all(len(c.tokens) == 77 == len(c.multipliers) for c in chunks)


def test_open_clip_input_ids_pad_after_first_end():
    chunk = empty_chunk()
    assert model_input_ids(chunk.tokens, EOS_ID, 0) == [BOS_ID, EOS_ID] + [0] * 75
    assert model_input_ids(chunk.tokens, EOS_ID, EOS_ID) == chunk.tokens
