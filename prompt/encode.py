"""Encoding a batch of prompts as AUTOMATIC1111 (v1.10.1) does: weights, long prompts, BREAK, clip skip, TI.

``encode_prompts(model, prompts, ...)`` is the one entry point; per text tower it follows
``sd_hijack_clip.FrozenCLIPEmbedderWithCustomWordsBase.forward``:

* each prompt becomes 77-token chunks (``prompt_chunks``); the batch is padded with empty chunks to the longest;
* chunk i of every prompt is encoded together, with textual-inversion vectors written over the token embeddings
  of their placeholders (``EmbeddingsWithFixes``), then emphasis "Original": ``z * multipliers``, rescaled so the
  mean over the whole chunk batch is unchanged (so prompts encoded together affect each other's scale);
* the chunks are concatenated on the token axis: ``[B, 77 * k, C]``.

Towers (they are driven by attribute path, the checkpoint key layout of ``model.text``; this module repeats the
few forward lines it needs so that it can splice in embedding vectors and pick the clip-skip layer):

* SD1 CLIP-L: ``final_layer_norm(hidden_states[-clip_skip])`` (clip skip 1 = the last layer);
* SD2 OpenCLIP: the configured layer then ``ln_final``; clip skip ignored, as A1111;
* SDXL: CLIP-L ``hidden_states[layer_idx]`` and OpenCLIP-G's penultimate features, concatenated on channels
  (``crossattn``); ``vector`` = OpenCLIP's pooled output of the FIRST chunk + the size / crop embeddings of the
  conditioner's other embedders; a negative batch whose prompts are all empty gets zero text features (A1111's
  ``force_zero_negative_prompt``); clip skip ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from tritonsd.formats.embeddings import Embedding, EmbeddingDatabase, load_embeddings, ti_hashes
from tritonsd.prompt.chunks import PromptChunk, batch_chunks, empty_chunk, model_input_ids
from tritonsd.prompt.parser import prompt_schedule, schedule_index
from tritonsd.prompt.tokenizer import BOS_ID, EOS_ID

OPEN_CLIP_PAD_ID = 0
SDXL_AESTHETIC = {False: 6.0, True: 2.5}  # A1111's refiner high / low aesthetic score defaults


class PromptEncodeError(ValueError):
    """A request the encoders cannot serve (bad clip skip, towers disagreeing on length). One line."""


@dataclass
class Conditioning:
    """``context``: [B, 77k, C] (SDXL: crossattn). ``vector``: SDXL's [B, adm], else None.
    ``used_embeddings``: per encoder call (tower) the embeddings its prompts used, for ``ti_hashes``."""

    context: torch.Tensor
    vector: torch.Tensor | None = None
    used_embeddings: list[list[Embedding]] = field(default_factory=list)

    @property
    def ti_hashes(self) -> str:
        return ti_hashes(self.used_embeddings)


# --------------------------------------------------------------------------------------------------------------
# Towers


def _tower_kind(embedder) -> str:
    name = type(embedder).__name__
    if hasattr(embedder, "transformer") and hasattr(embedder.transformer, "text_model"):
        return "clip"
    if hasattr(embedder, "model") and hasattr(embedder.model, "ln_final"):
        return "open_clip_pooled" if name == "FrozenOpenCLIPEmbedder2" or hasattr(embedder, "pooled_dim") \
            else "open_clip"
    raise PromptEncodeError(f"unsupported text encoder {name}")


def _splice(x: torch.Tensor, fixes: Sequence[Sequence[tuple[int, Embedding]]], key: str) -> torch.Tensor:
    """EmbeddingsWithFixes: row r's fixes (offset, embedding) overwrite x[r, offset+1 : offset+1+n]."""
    if not any(fixes):
        return x
    x = x.clone()
    for row, row_fixes in enumerate(fixes):
        for offset, embedding in row_fixes:
            vec = embedding.vectors_for(key).to(device=x.device, dtype=x.dtype)
            n = min(x.shape[1] - offset - 1, vec.shape[0])
            x[row, offset + 1:offset + 1 + n] = vec[:n]
    return x


def _clip_hidden(embedder, tokens: torch.Tensor, fixes, key: str, index: int) -> torch.Tensor:
    """transformers' ``hidden_states[index]`` of CLIPTextModel (0 = embeddings), with TI vectors spliced in."""
    tm = embedder.transformer.text_model
    x = _splice(tm.embeddings.token_embedding(tokens), fixes, key)
    x = x + tm.embeddings.position_embedding.weight[:tokens.shape[1]]  # [B, N, W]
    for layer in tm.encoder.layers[:index]:
        x = layer(x)
    return x


def _open_clip_blocks(embedder, tokens: torch.Tensor, fixes, key: str, blocks: int) -> torch.Tensor:
    m = embedder.model
    x = _splice(m.token_embedding(tokens), fixes, key)
    x = x + m.positional_embedding[:tokens.shape[1]]  # [B, N, W]
    for block in m.transformer.resblocks[:blocks]:
        x = block(x)
    return x


@dataclass
class _Tower:
    embedder: object
    kind: str  # "sd1_clip" | "sdxl_clip" | "open_clip" | "open_clip_pooled"
    key: str  # TI vector key
    clip_skip: int = 1

    @property
    def id_pad(self) -> int:
        return OPEN_CLIP_PAD_ID if self.kind.startswith("open") else EOS_ID

    @property
    def tokenizer(self):
        return self.embedder.tokenizer

    def encode(self, tokens: torch.Tensor, fixes) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[B, 77] ids -> (z [B, 77, C], pooled [B, P] or None)."""
        e = self.embedder
        if self.kind == "sd1_clip":
            layers = len(e.transformer.text_model.encoder.layers)
            x = _clip_hidden(e, tokens, fixes, self.key, layers + 1 - self.clip_skip)
            return e.transformer.text_model.final_layer_norm(x), None
        if self.kind == "sdxl_clip":
            if e.layer == "last":
                layers = len(e.transformer.text_model.encoder.layers)
                return e.transformer.text_model.final_layer_norm(_clip_hidden(e, tokens, fixes, self.key,
                                                                              layers)), None
            return _clip_hidden(e, tokens, fixes, self.key, e.layer_idx), None
        layers = len(e.model.transformer.resblocks)
        if self.kind == "open_clip":
            skip = {"last": 0, "penultimate": 1}[e.layer]
            return e.model.ln_final(_open_clip_blocks(e, tokens, fixes, self.key, layers - skip)), None
        x = _open_clip_blocks(e, tokens, fixes, self.key, layers - 1)
        last = e.model.transformer.resblocks[-1](x)
        features = x if e.layer == "penultimate" else last
        return features, e.model.pool(last, tokens)


def text_towers(model, clip_skip: int = 1) -> list[_Tower]:
    """The model's text towers in conditioner order, with their TI vector keys."""
    family = model.config.family
    if family == "sdxl":
        towers = []
        for embedder, key in zip(model.conditioner.embedders, model.conditioner.input_keys):
            if key != "txt":
                continue
            kind = _tower_kind(embedder)
            towers.append(_Tower(embedder, "sdxl_clip" if kind == "clip" else kind,
                                 "clip_l" if kind == "clip" else "clip_g"))
        return towers
    embedder = model.cond_stage_model
    kind = _tower_kind(embedder)
    if kind == "clip":
        layers = len(embedder.transformer.text_model.encoder.layers)
        if not 1 <= int(clip_skip) <= layers + 1:
            raise PromptEncodeError(f"clip skip {clip_skip} is outside 1..{layers + 1} for this {layers}-layer "
                                    f"text encoder")
        return [_Tower(embedder, "sd1_clip", "clip_l", int(clip_skip))]
    return [_Tower(embedder, kind, "clip_l")]  # A1111 ignores clip skip for OpenCLIP


# --------------------------------------------------------------------------------------------------------------
# Encoding


def _emphasis_original(z: torch.Tensor, multipliers: torch.Tensor) -> torch.Tensor:
    """[B, 77, C] x [B, 77] -> [B, 77, C]: weighted, with the batch mean restored."""
    original_mean = z.mean()
    z = z * multipliers.reshape(multipliers.shape + (1,)).expand(z.shape)
    return z * (original_mean / z.mean())


def _encode_tower(tower: _Tower, chunks: list[list[PromptChunk]], emphasis: str = "Original"):
    """(z [B, 77k, C], pooled of chunk 0 or None, embeddings used)."""
    device = next(tower.embedder.parameters()).device
    count = max(len(c) for c in chunks)
    zs, pooled, used = [], None, {}
    for i in range(count):
        batch = [c[i] if i < len(c) else empty_chunk(BOS_ID, EOS_ID) for c in chunks]
        ids = torch.tensor([model_input_ids(c.tokens, EOS_ID, tower.id_pad) for c in batch], device=device)
        fixes = [c.fixes for c in batch]
        for row_fixes in fixes:
            for _offset, embedding in row_fixes:
                used[embedding.name] = embedding
        z, p = tower.encode(ids, fixes)
        if emphasis == "Original":
            mult = torch.tensor([c.multipliers for c in batch], device=device, dtype=z.dtype)
            z = _emphasis_original(z, mult)
        if i == 0:
            pooled = p
        zs.append(z)
    return torch.cat(zs, dim=1), pooled, list(used.values())


def _size_rows(value, batch: int, device, dtype) -> torch.Tensor:
    return torch.tensor(value, device=device, dtype=dtype).reshape(1, -1).repeat(batch, 1)


def encode_prompts(model, prompts: Sequence[str], *, clip_skip: int = 1,
                   embeddings: EmbeddingDatabase | None = None, width: int = 1024, height: int = 1024,
                   is_negative: bool = False, emphasis: bool = True, crop: tuple[int, int] = (0, 0)
                   ) -> Conditioning:
    """Encode ``prompts`` together (one ``forward`` of A1111's conditioning module).

    SD1 / SD2: ``context`` [B, 77k, C]. SDXL: ``context`` = crossattn [B, 77k, C_l + C_g], ``vector`` [B, adm]
    with original = target size (height, width) and ``crop`` (top, left); ``is_negative`` with all prompts empty
    gives zero text features. Prompts of one call share emphasis scaling and chunk count: encode cond and
    uncond separately (A1111's default) unless the caller wants them padded together.
    Raises PromptTooLongError / PromptSyntaxError / PromptEncodeError (all ValueError, one line).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise PromptEncodeError("encode_prompts needs a non-empty list of prompt strings")
    towers = text_towers(model, clip_skip)
    outputs = []
    with torch.no_grad():
        for tower in towers:
            chunks = batch_chunks(prompts, tower.tokenizer, embeddings, emphasis=emphasis)
            outputs.append(_encode_tower(tower, chunks, "Original" if emphasis else "None"))
    used = [o[2] for o in outputs]
    if model.config.family != "sdxl":
        return Conditioning(outputs[0][0], None, used)
    return _sdxl_conditioning(model, prompts, outputs, used, width, height, is_negative, crop)


def _sdxl_conditioning(model, prompts, outputs, used, width, height, is_negative, crop) -> Conditioning:
    lengths = {o[0].shape[1] for o in outputs}
    if len(lengths) != 1:
        raise PromptEncodeError(f"the SDXL text towers split the prompt into different chunk counts "
                                f"({sorted(lengths)} tokens); rephrase the prompt")
    zero = is_negative and all(p == "" for p in prompts)
    crossattn = torch.cat([o[0] for o in outputs], dim=2)
    pooled = [o[1] for o in outputs if o[1] is not None]
    if zero:
        crossattn = torch.zeros_like(crossattn)
        pooled = [torch.zeros_like(p) for p in pooled]
    batch, device, dtype = len(prompts), crossattn.device, crossattn.dtype
    values = {"original_size_as_tuple": (height, width), "crop_coords_top_left": tuple(crop),
              "target_size_as_tuple": (height, width), "aesthetic_score": (SDXL_AESTHETIC[bool(is_negative)],)}
    vector = list(pooled)
    cond = model.conditioner
    for embedder, key in zip(cond.embedders, cond.input_keys):
        if key == "txt":
            continue
        if key not in values:
            raise PromptEncodeError(f"unsupported SDXL conditioner input {key!r}")
        rows = _size_rows(values[key], batch, device, torch.float32)
        vector.append(embedder(rows).to(device=device, dtype=dtype))
    return Conditioning(crossattn, torch.cat(vector, dim=1), used)


@dataclass
class ScheduledConditioning:
    """One prompt's editing schedule, encoded: entry j (rows of ``cond``) is used up to step ``end_steps[j]``.

    A1111 encodes all texts of one prompt's schedule in ONE batch (they share the emphasis rescale and are padded
    to the same chunk count), each unique prompt separately, so this is the unit the pipeline should cache.
    """

    end_steps: list[int]
    texts: list[str]
    cond: Conditioning

    def index_at(self, step: int) -> int:
        """Entry used at sampler step ``step`` (0-based denoiser call count, as A1111's CFGDenoiser.step)."""
        return schedule_index(list(zip(self.end_steps, self.texts)), step)

    def at(self, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(context [1, 77k, C], vector [1, adm] or None) for ``step``."""
        j = self.index_at(step)
        vector = None if self.cond.vector is None else self.cond.vector[j:j + 1]
        return self.cond.context[j:j + 1], vector

    def table(self, steps: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-step tables for a captured graph: (context [steps, 77k, C], vector [steps, adm] or None), row s =
        step s."""
        rows = torch.tensor([self.index_at(s) for s in range(steps)], device=self.cond.context.device)
        vector = None if self.cond.vector is None else self.cond.vector[rows]
        return self.cond.context[rows], vector


def encode_schedule(model, prompt: str, steps: int, *, hires_steps: int | None = None, **kwargs
                    ) -> ScheduledConditioning:
    """``prompt``'s ``[from:to:when]`` / ``[a|b]`` schedule for ``steps`` sampling steps, encoded in one batch
    (A1111's ``get_learned_conditioning``). ``kwargs`` go to ``encode_prompts`` (clip_skip, embeddings, width,
    height, is_negative, ...)."""
    schedule = prompt_schedule(prompt, steps, hires_steps)
    texts = [text for _, text in schedule]
    return ScheduledConditioning([end for end, _ in schedule], texts, encode_prompts(model, texts, **kwargs))


def model_embedding_widths(model) -> dict[str, int]:
    return {t.key: t.embedder.config.width for t in text_towers(model)}


def load_model_embeddings(model, directory: str | Path) -> tuple[EmbeddingDatabase, list[str]]:
    """Textual inversions of ``directory`` for ``model`` (names looked up with its first tower's tokenizer, as
    A1111); returns the database and one message line per skipped file."""
    towers = text_towers(model)
    return load_embeddings(directory, towers[0].tokenizer, model_embedding_widths(model))


__all__ = ["Conditioning", "PromptEncodeError", "ScheduledConditioning", "encode_prompts", "encode_schedule",
           "load_model_embeddings",
           "model_embedding_widths", "text_towers"]


# --------------------------------------------------------------------------------------------------------------
# The UNet's conditioning keywords


def unet_keywords(cond: ScheduledConditioning, uncond: ScheduledConditioning | None, calls: int,
                  batch: int) -> tuple[dict, dict | None, bool]:
    """(cond, uncond, per_step): each side's UNet keywords (``context``, and SDXL's ``y``), float32, one row per
    image; with prompt editing (either side schedules more than one text) per-call tables whose row k is the
    entry the k-th model call uses."""
    per_step = len(cond.texts) > 1 or (uncond is not None and len(uncond.texts) > 1)
    sides = []
    for side in (cond, uncond):
        if side is None:
            sides.append(None)
            continue
        entries = {"context": side.cond.context.float()}
        if side.cond.vector is not None:
            entries["y"] = side.cond.vector.float()
        if per_step:
            rows = torch.tensor([side.index_at(k) for k in range(calls)], device=entries["context"].device)
            # [entries, ...] -> [calls, B, ...]: row k is the entry model call k uses
            sides.append({n: t[rows][:, None].expand(-1, batch, *t.shape[1:]) for n, t in entries.items()})
        else:
            # [1, ...] -> [B, ...]: every image of the batch shares its side's prompt
            sides.append({n: t[:1].expand(batch, *t.shape[1:]) for n, t in entries.items()})
    return sides[0], sides[1], per_step


def call_rows(cond: ScheduledConditioning, uncond: ScheduledConditioning | None,
              calls: int) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """For ``unet_keywords``' per-call tables, per side: row k -> the first row holding the same entry. Rows of one
    entry hold equal values; reading that one row for all of them lets what a run computes from its
    conditioning (the cross-attention keys and values, ``model/hoist.py``) be computed once per entry."""
    def side_rows(side):
        if side is None:
            return None
        first: dict[int, int] = {}
        return tuple(first.setdefault(side.index_at(k), k) for k in range(calls))
    return side_rows(cond), side_rows(uncond)


def pad_to_same_length(model, c: dict, u: dict, per_step: bool, *, clip_skip: int, width: int,
                       height: int) -> tuple[dict, dict]:
    """AUTOMATIC1111's ``pad_cond_uncond``: the shorter side gets empty-prompt chunks appended, so guidance
    stays one batched call (it changes the image)."""
    axis = 2 if per_step else 1
    if c["context"].shape[axis] == u["context"].shape[axis]:
        return c, u
    empty = encode_prompts(model, [""], clip_skip=clip_skip, width=width, height=height).context.float()  # [1, 77, C]

    def pad(side, to):
        missing = (to - side["context"].shape[axis]) // empty.shape[1]
        shape = list(side["context"].shape)
        shape[axis] = empty.shape[1] * missing
        extra = empty.repeat(1, missing, 1).expand(*shape) if not per_step else \
            empty.repeat(1, missing, 1)[None].expand(*shape)
        return {**side, "context": torch.cat([side["context"], extra], dim=axis)}

    longest = max(c["context"].shape[axis], u["context"].shape[axis])
    return pad(c, longest), pad(u, longest)
