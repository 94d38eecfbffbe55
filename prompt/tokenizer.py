"""CLIP's byte-level BPE tokenizer, as Stable Diffusion's text encoders use it.

Built like OpenAI CLIP's ``simple_tokenizer`` from the shipped ``data/bpe_simple_vocab_16e6.txt.gz``
(MIT, see ``data/LICENSE-CLIP-BPE.txt``): 256 byte characters, their ``</w>`` forms, the first 48,894 merges,
then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407) — 49,408 ids.

Two flavours, matching the two originals Stable Diffusion calls:

* ``"open_clip"`` (SD2 and SDXL's OpenCLIP tower; also OpenAI CLIP's ``clip.tokenize``): text cleaned with
  ``ftfy.fix_text``, ``html.unescape`` twice, whitespace collapsed, lower-cased.
* ``"transformers"`` (SD1 and SDXL's CLIP-L tower: transformers' slow ``CLIPTokenizer``): the same but WITHOUT
  the two ``html.unescape`` calls (only the HTML unescaping ``ftfy.fix_text`` itself does, which it skips for
  text containing ``<``).

They also differ in which literal special-token strings inside a prompt become the special ids:
``<|startoftext|>`` / ``<|endoftext|>`` for transformers (and OpenAI CLIP), ``<start_of_text>`` /
``<end_of_text>`` for open_clip. On ordinary prompts both flavours give identical ids.

The vocabulary is read once, on first use, and shared by every tokenizer instance.
"""

from __future__ import annotations

import functools
import gzip
import html
from dataclasses import dataclass, field
from importlib import resources
from typing import Sequence

import torch

BOS_ID = 49406  # <|startoftext|>
EOS_ID = 49407  # <|endoftext|>
CONTEXT_LENGTH = 77
VOCAB_SIZE = 49408
NUM_MERGES = 49152 - 256 - 2  # CLIP uses this prefix of the 262,144 merges in the file

FLAVORS = ("transformers", "open_clip")
_SPECIAL_TEXT = {
    "transformers": ("<|startoftext|>", "<|endoftext|>"),
    "open_clip": ("<start_of_text>", "<end_of_text>"),
}
_WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


class TokenizerError(ValueError):
    """The tokenizer's vocabulary file is missing or malformed, or it was asked for something impossible."""


@functools.lru_cache(maxsize=None)
def byte_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable character table: printable Latin-1 bytes map to themselves (in byte
    order), the other 68 bytes to U+0100 onwards. The vocabulary lists the 256 characters in this order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + len(table) - len(printable))
    return table


@dataclass
class _Vocab:
    encoder: dict[str, int]
    decoder: dict[int, str]
    ranks: dict[tuple[str, str], int]
    bpe_cache: dict[str, tuple[str, ...]] = field(default_factory=dict)


def default_vocab_path():
    return resources.files(__package__).joinpath("data", "bpe_simple_vocab_16e6.txt.gz")


@functools.lru_cache(maxsize=4)
def _load_vocab(path: str | None = None) -> _Vocab:
    source = default_vocab_path() if path is None else path
    try:
        with (source.open("rb") if path is None else open(source, "rb")) as fh:
            lines = gzip.decompress(fh.read()).decode("utf-8").split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"cannot read the CLIP BPE vocabulary {source}: {exc}") from exc
    merges = [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]  # line 0 is a version header
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise TokenizerError(f"{source} is not CLIP's BPE merge list ({len(merges)} usable merges)")
    chars = list(byte_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>",
                                                                                   "<|endoftext|>"]
    encoder = {t: i for i, t in enumerate(tokens)}
    if len(encoder) != VOCAB_SIZE:
        raise TokenizerError(f"{source} gives {len(encoder)} distinct tokens, expected {VOCAB_SIZE}")
    return _Vocab(encoder=encoder, decoder={i: t for t, i in encoder.items()},
                  ranks={m: r for r, m in enumerate(merges)})


def _bpe(vocab: _Vocab, word: str) -> tuple[str, ...]:
    """Merge the characters of ``word`` (its last one marked ``</w>``) by lowest merge rank until none applies."""
    cached = vocab.bpe_cache.get(word)
    if cached is not None:
        return cached
    parts = [*word[:-1], word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = {(a, b) for a, b in zip(parts, parts[1:])}
        best = min(pairs, key=lambda p: vocab.ranks.get(p, NUM_MERGES))
        if best not in vocab.ranks:
            break
        merged: list[str] = []
        i = 0
        while i < len(parts):
            if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    result = tuple(parts)
    vocab.bpe_cache[word] = result
    return result


class CLIPTokenizer:
    """Prompt -> CLIP token ids. ``encode`` gives the ids without specials; calling the tokenizer gives the
    model's ``[B, 77]`` input: ``[49406, ids[:75], 49407]`` padded with ``pad_id``."""

    def __init__(self, flavor: str = "open_clip", vocab_path: str | None = None):
        if flavor not in FLAVORS:
            raise TokenizerError(f"unknown tokenizer flavor {flavor!r}; expected one of {', '.join(FLAVORS)}")
        self.flavor = flavor
        self.vocab_path = None if vocab_path is None else str(vocab_path)
        bos, eos = _SPECIAL_TEXT[flavor]
        self._specials = {bos: BOS_ID, eos: EOS_ID}

    @property
    def _vocab(self) -> _Vocab:
        return _load_vocab(self.vocab_path)

    @functools.cached_property
    def _pattern(self):
        import regex

        specials = "|".join(regex.escape(s) for s in self._specials)
        return regex.compile(specials + "|" + _WORD_PATTERN, regex.IGNORECASE)

    def clean(self, text: str) -> str:
        """The original's text normalisation, before splitting into words."""
        import ftfy
        import regex

        text = ftfy.fix_text(text)
        if self.flavor == "open_clip":
            text = html.unescape(html.unescape(text))
        return regex.sub(r"\s+", " ", text).strip().lower()

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without start / end tokens and without truncation."""
        if not isinstance(text, str):
            raise TokenizerError(f"a prompt must be a string, got {type(text).__name__}")
        vocab = self._vocab
        byte_chars = byte_to_unicode()
        ids: list[int] = []
        for word in self._pattern.findall(self.clean(text)):
            special = self._specials.get(word)
            if special is not None:
                ids.append(special)
                continue
            word = "".join(byte_chars[b] for b in word.encode("utf-8"))
            ids.extend(vocab.encoder[piece] for piece in _bpe(vocab, word))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Ids back to (cleaned) text; word ends become spaces."""
        vocab = self._vocab
        from_char = {c: b for b, c in byte_to_unicode().items()}
        chars = "".join(vocab.decoder[int(i)] for i in ids if int(i) not in (BOS_ID, EOS_ID))
        text = bytes(from_char[c] for c in chars).decode("utf-8", errors="replace")
        return text.replace("</w>", " ").strip()

    def truncated_words(self, text: str, length: int = CONTEXT_LENGTH) -> str:
        """The part of ``text`` (as decoded tokens) that does not fit into ``length`` positions; '' if all fits."""
        ids = self.encode(text)
        return self.decode(ids[length - 2:]) if len(ids) > length - 2 else ""

    def __call__(self, prompts: str | Sequence[str], pad_id: int, length: int = CONTEXT_LENGTH) -> torch.Tensor:
        """[B, length] int64: start token, the first ``length - 2`` ids, end token, then ``pad_id``."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if length < 2:
            raise TokenizerError(f"context length {length} leaves no room for the start and end tokens")
        out = torch.full((len(prompts), length), int(pad_id), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids = [BOS_ID, *self.encode(prompt)[:length - 2], EOS_ID]
            out[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


@functools.lru_cache(maxsize=None)
def get_tokenizer(flavor: str = "open_clip") -> CLIPTokenizer:
    """A shared tokenizer of the given flavour (the vocabulary itself is loaded on first use)."""
    return CLIPTokenizer(flavor)
