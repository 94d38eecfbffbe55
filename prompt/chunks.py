"""A parsed prompt as 77-token chunks with per-token multipliers, as AUTOMATIC1111's ``sd_hijack_clip.tokenize_line``.

Each ``[text, weight]`` fragment of ``parse_prompt_attention`` is tokenized on its own (no start / end tokens);
the ids go into chunks of 75, each later framed as ``[start, 75 ids or end-padding, end]``:

* a ``BREAK`` marker closes the current chunk (padding it);
* comma backtrack: when a chunk is full and the next token is not a comma, the tokens after the chunk's last
  comma move to the next chunk if that comma is at most ``comma_backtrack`` (20) tokens back;
* a textual-inversion embedding's name is replaced by ``vectors`` placeholder ids (0) carrying the fragment's
  weight, recorded as a fix ``(offset in the chunk's 75, embedding)``; an embedding that does not fit in the
  current chunk starts the next one;
* the empty prompt is one chunk of start + 76 end tokens.

``process_tokens``' OpenCLIP rule (ids after the first end token become the pad id 0) is ``model_input_ids``.
A prompt may hold at most ``MAX_PROMPT_TOKENS`` tokens after parsing; more is a ``PromptTooLongError``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

from tritonsd.prompt.parser import is_break, parse_prompt_attention
from tritonsd.prompt.tokenizer import BOS_ID, EOS_ID

CHUNK_LENGTH = 75  # prompt tokens per chunk; + start and end = 77
COMMA_ID = 267  # ",</w>" in CLIP's vocabulary (both tokenizers)
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack default
MAX_PROMPT_TOKENS = 1000  # tokens after parsing (embedding vectors included); 975 = 13 full chunks
MAX_CHUNKS = 32  # guards against BREAK spam; 1,000 tokens never need more than 14 chunks without BREAK


class PromptTooLongError(ValueError):
    """A prompt beyond the token limit. One line, with the count."""


class EmbeddingLookup(Protocol):
    def find_at(self, tokens: Sequence[int], offset: int) -> tuple[Any, int]:
        """(embedding, number of name tokens) starting at ``tokens[offset]``, or (None, 0)."""


@dataclass
class PromptChunk:
    tokens: list[int] = field(default_factory=list)  # 77 once closed
    multipliers: list[float] = field(default_factory=list)
    fixes: list[tuple[int, Any]] = field(default_factory=list)  # (offset among the 75, embedding)


def empty_chunk(id_start: int = BOS_ID, id_end: int = EOS_ID) -> PromptChunk:
    return PromptChunk([id_start] + [id_end] * (CHUNK_LENGTH + 1), [1.0] * (CHUNK_LENGTH + 2))


def tokenize_prompt(prompt: str, tokenizer, embeddings: EmbeddingLookup | None = None, *,
                    emphasis: bool = True, comma_backtrack: int = COMMA_BACKTRACK, id_start: int = BOS_ID,
                    id_end: int = EOS_ID, max_tokens: int = MAX_PROMPT_TOKENS) -> tuple[list[PromptChunk], int]:
    """(chunks, token_count) of one prompt; ``tokenizer.encode(text)`` gives ids without special tokens.

    token_count is A1111's: 75 per closed chunk plus the length of the last one. Raises PromptTooLongError when
    more than ``max_tokens`` prompt tokens (or more than MAX_CHUNKS chunks) would be needed.
    """
    parsed = parse_prompt_attention(prompt) if emphasis else [[prompt, 1.0]]
    tokenized = [tokenizer.encode(text) for text, _ in parsed]
    total = sum(len(t) for t, (text, w) in zip(tokenized, parsed) if not is_break(text, w))
    if total > max_tokens:
        raise PromptTooLongError(f"the prompt has {total} tokens after parsing; the limit is {max_tokens}")

    chunks: list[PromptChunk] = []
    chunk = PromptChunk()
    token_count = 0
    last_comma = -1
    placed = 0

    def next_chunk(is_last: bool = False) -> None:
        nonlocal chunk, token_count, last_comma
        token_count += len(chunk.tokens) if is_last else CHUNK_LENGTH
        to_add = CHUNK_LENGTH - len(chunk.tokens)
        if to_add > 0:
            chunk.tokens += [id_end] * to_add
            chunk.multipliers += [1.0] * to_add
        chunk.tokens = [id_start] + chunk.tokens + [id_end]
        chunk.multipliers = [1.0] + chunk.multipliers + [1.0]
        last_comma = -1
        chunks.append(chunk)
        if len(chunks) > MAX_CHUNKS:
            raise PromptTooLongError(f"the prompt needs more than {MAX_CHUNKS} chunks of 75 tokens")
        chunk = PromptChunk()

    for tokens, (text, weight) in zip(tokenized, parsed):
        if is_break(text, weight):
            next_chunk()
            continue
        position = 0
        while position < len(tokens):
            token = tokens[position]
            if token == COMMA_ID:
                last_comma = len(chunk.tokens)
            elif (comma_backtrack != 0 and len(chunk.tokens) == CHUNK_LENGTH and last_comma != -1
                  and len(chunk.tokens) - last_comma <= comma_backtrack):
                cut = last_comma + 1
                moved_tokens, moved_mults = chunk.tokens[cut:], chunk.multipliers[cut:]
                chunk.tokens, chunk.multipliers = chunk.tokens[:cut], chunk.multipliers[:cut]
                next_chunk()
                chunk.tokens, chunk.multipliers = moved_tokens, moved_mults
            if len(chunk.tokens) == CHUNK_LENGTH:
                next_chunk()

            embedding, name_length = embeddings.find_at(tokens, position) if embeddings else (None, 0)
            if embedding is None:
                chunk.tokens.append(token)
                chunk.multipliers.append(weight)
                position += 1
                placed += 1
                continue
            vectors = int(embedding.vectors)
            if len(chunk.tokens) + vectors > CHUNK_LENGTH:
                next_chunk()
            chunk.fixes.append((len(chunk.tokens), embedding))
            chunk.tokens += [0] * vectors
            chunk.multipliers += [weight] * vectors
            position += name_length
            placed += vectors
            if placed > max_tokens:
                raise PromptTooLongError(f"the prompt has more than {max_tokens} tokens after parsing "
                                         f"(embedding vectors included); the limit is {max_tokens}")

    if chunk.tokens or not chunks:
        next_chunk(is_last=True)
    return chunks, token_count


def model_input_ids(chunk_tokens: Sequence[int], id_end: int, id_pad: int) -> list[int]:
    """``process_tokens``: with a pad id other than the end id (OpenCLIP: 0), every id after the first end token
    becomes the pad id."""
    ids = list(chunk_tokens)
    if id_end != id_pad and id_end in ids:
        first = ids.index(id_end)
        ids[first + 1:] = [id_pad] * (len(ids) - first - 1)
    return ids


def batch_chunks(prompts: Sequence[str], tokenizer, embeddings: EmbeddingLookup | None = None,
                 **kwargs) -> list[list[PromptChunk]]:
    """The chunks of each prompt (identical prompts tokenized once), as ``process_texts``."""
    cache: dict[str, list[PromptChunk]] = {}
    out = []
    for prompt in prompts:
        if prompt not in cache:
            cache[prompt] = tokenize_prompt(prompt, tokenizer, embeddings, **kwargs)[0]
        out.append(cache[prompt])
    return out


__all__ = ["CHUNK_LENGTH", "COMMA_ID", "MAX_PROMPT_TOKENS", "PromptChunk", "PromptTooLongError", "batch_chunks",
           "empty_chunk", "model_input_ids", "tokenize_prompt"]
