"""Structure-aware mutations for the readers issue 26 hardened (the checkpoint readers have tests/fuzz_mutations.py):
LoRA files, textual-inversion embeddings, the YAML beside a checkpoint and PNG infotext; and HTTP request bodies
generated from the server's own OpenAPI schema (``body_strategy``).

A case starts from a fixture (lora-sd1-tiny.safetensors, the embeddings folder's files, sd1-tiny.yaml, a PNG of
the pipeline's) and changes one thing of its class; every choice goes through a ``Draw`` (fuzz_mutations), so a
case is reproducible from its number. ``check_case`` is the property: the reader's own ValueError subclass with
one printable line, or a clean result; nothing else escapes.
"""

from __future__ import annotations

import io
import json
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from fuzz_mutations import INTERESTING_INTS, NASTY_TEXT, Draw

CLASSES = ("lora", "embedding", "yaml", "infotext")
SHAPE_SIZES = (0, 1, 2, 3, 4, 7, 8, 16, 32, 33, 64, 4096, 16384, 65536, 2**31)
NASTY_NUMBERS = (0, -1, 1, 1e11, 1.0e11, 1e38, 1e308, float("inf"), float("nan"), -1e30, 2**63, 0.5, 10**30)
NASTY_VALUES = (None, True, "abc", "", [], [1], [[1]], {"a": 1}, "1e11", "\x1b[2J", "line\nforged", -5, 0, 2**70,
                1e11, 3.5, float("nan"))


@dataclass
class Case:
    cls: str
    what: str
    suffix: str
    data: bytes
    multiplier: float = 1.0  # LoRA cases: the multiplier the LoRA is applied at


@dataclass
class InputSeeds:
    lora: dict  # name -> tensor (the fixture LoRA)
    embeddings: dict  # file name -> bytes
    yaml_text: str
    png: bytes  # a PNG the pipeline wrote, with its infotext
    infotext: str
    shapes: dict  # our weight key -> shape, of sd1-tiny (what the LoRA applies to)

    @classmethod
    def load(cls, fixtures: Path) -> "InputSeeds":
        from safetensors.torch import load_file

        from tritonsd.formats.checkpoint import read_checkpoint_shapes
        from tritonsd.formats.keys import normalize_keys

        lora = load_file(str(fixtures / "lora-sd1-tiny.safetensors"))
        embeddings = {p.name: p.read_bytes() for p in sorted((fixtures / "embeddings").iterdir()) if p.is_file()}
        norm = normalize_keys(read_checkpoint_shapes(fixtures / "sd1-tiny.safetensors"))
        shapes = {k: tuple(v.shape) for k, v in norm.weights.items()}
        infotext = ("a (red:1.2) fox, [sky:sea:0.5] <lora:x:0.8>\nNegative prompt: blurry\nSteps: 20, Sampler: "
                    "DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, Model hash: abc, "
                    'Lora hashes: "x: 0123456789ab", Version: v1.10.1')
        return cls(lora, embeddings, (fixtures / "sd1-tiny.yaml").read_text(), png_with_text(infotext), infotext,
                   shapes)


# ---------------------------------------------------------------------------------------------------------------
# Files


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)


def png_with_text(text: str, chunk: str = "zTXt", image_size: tuple[int, int] = (8, 8)) -> bytes:
    """A small PNG carrying ``text`` as its ``parameters`` chunk (tEXt, zTXt or iTXt), written by hand: Pillow's
    writer would refuse some of the texts the fuzzer wants."""
    def one(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    w, h = image_size
    raw = b"".join(b"\0" + b"\x80" * (3 * w) for _ in range(h))
    encoded = text.encode("latin-1", "replace") if chunk != "iTXt" else text.encode("utf-8", "surrogatepass")
    if chunk == "tEXt":
        body = one(b"tEXt", b"parameters\0" + encoded)
    elif chunk == "zTXt":
        body = one(b"zTXt", b"parameters\0\0" + zlib.compress(encoded, 9))
    else:
        body = one(b"iTXt", b"parameters\0\1\0\0\0" + zlib.compress(encoded, 9))
    return (b"\x89PNG\r\n\x1a\n" + one(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + body
            + one(b"IDAT", zlib.compress(raw)) + one(b"IEND", b""))


def _flip_bytes(data: bytes, draw: Draw) -> bytes:
    b = bytearray(data)
    how = draw.integer(0, 2)
    if how == 0 and b:
        for _ in range(draw.integer(1, 8)):
            b[draw.integer(0, len(b) - 1)] = draw.integer(0, 255)
        return bytes(b)
    if how == 1:
        return bytes(b[:draw.integer(0, len(b))])
    at = draw.integer(0, len(b))
    return bytes(b[:at] + draw.raw(draw.integer(1, 16)) + b[at:])


def _shape(draw: Draw, like: tuple) -> list[int]:
    how = draw.integer(0, 4)
    shape = list(like)
    if how == 0:
        return []
    if how == 1 and shape:
        shape[draw.integer(0, len(shape) - 1)] = draw.choice(SHAPE_SIZES[:-1])
    elif how == 2:
        shape = shape[::-1]
    elif how == 3:
        shape = shape + [draw.choice((1, 2, 3))]
    else:
        shape = [draw.choice(SHAPE_SIZES[:-1]) for _ in range(draw.integer(1, 4))]
    return shape


def _small_tensor(shape: list[int], draw: Draw, dtype=torch.float32) -> torch.Tensor | None:
    """A tensor of ``shape`` when it is small enough to write (the file is the input; 4 M elements at most)."""
    n = 1
    for s in shape:
        n *= s
    if n > 4_000_000:
        return None
    t = torch.randn(shape, generator=torch.Generator().manual_seed(draw.integer(0, 2**31)))
    if draw.integer(0, 9) == 0 and n:
        t.view(-1)[0] = draw.choice((float("nan"), float("inf"), 1e38))
    return t.to(dtype)


# ---------------------------------------------------------------------------------------------------------------
# Mutations by class


def mutate_lora(s: InputSeeds, draw: Draw) -> Case:
    tensors = dict(s.lora)
    modules = sorted({k.split(".", 1)[0] for k in tensors})
    module = draw.choice(modules)
    parts = sorted(k for k in tensors if k.startswith(module + "."))
    multiplier = draw.choice((1.0, 1.0, 1.0, -1.0, 0.5, 100.0, 101.0, 1e38, -1e30, 1e-30))
    how = draw.integer(0, 9)
    what = ""
    if how == 0:  # one factor reshaped, the data made to fit
        key = draw.choice(parts)
        shape = _shape(draw, tuple(tensors[key].shape))
        t = _small_tensor(shape, draw)
        if t is not None:
            tensors[key] = t
        what = f"{key} shape {shape}"
    elif how == 1:  # a rank-1 pair whose product is huge: up [N, 1], down [1, N]
        n = draw.choice((4096, 16384, 65536))
        tensors[f"{module}.lora_up.weight"] = torch.ones(n, 1)
        tensors[f"{module}.lora_down.weight"] = torch.ones(1, n)
        tensors.pop(f"{module}.lora_mid.weight", None)
        what = f"up [{n}, 1] @ down [1, {n}]"
    elif how == 2:  # a part dropped or an unknown part added
        if draw.integer(0, 1):
            key = draw.choice(parts)
            tensors.pop(key)
            what = f"{key} dropped"
        else:
            part = draw.choice(("hada_w1_a", "lokr_w1", "dora_scale", "oft_blocks", "lora_mid.weight", "diff",
                                "bias", "weird"))
            tensors[f"{module}.{part}"] = torch.ones(draw.choice(((1,), (4, 4), (2, 2, 1, 1))))
            what = f"{part} added"
    elif how == 3:  # alpha / scale of odd shape or value
        key = draw.choice(("alpha", "scale"))
        value = draw.choice(NASTY_NUMBERS)
        number = torch.tensor(float(value), dtype=torch.float64).to(torch.float32)  # 1e308 -> inf, as stored
        tensors[f"{module}.{key}"] = number if draw.integer(0, 1) else number.repeat(draw.choice((0, 2, 3)))
        what = f"{key} {value}"
    elif how == 4:  # a whole LoHa or LoKr module of drawn shapes
        for k in parts:
            tensors.pop(k)
        kind = draw.choice(("hada", "lokr"))
        names = (("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b") if kind == "hada"
                 else ("lokr_w1", "lokr_w2"))
        for name in names:
            shape = [draw.choice((1, 2, 4, 8, 32, 64)) for _ in range(draw.choice((2, 2, 4)))]
            tensors[f"{module}.{name}"] = torch.randn(shape)
        if draw.integer(0, 2) == 0:
            tensors[f"{module}.{'hada_t1' if kind == 'hada' else 'lokr_t2'}"] = torch.randn(2, 2, 3, 3)
        what = f"{kind} module"
    elif how == 5:  # a dtype the reader must refuse or convert
        key = draw.choice(parts)
        dtype = draw.choice((torch.int32, torch.int8, torch.bool, torch.float16, torch.bfloat16, torch.float64))
        tensors[key] = tensors[key].to(dtype)
        what = f"{key} as {dtype}"
    elif how == 6:  # names
        key = draw.choice(parts)
        new = draw.choice(NASTY_TEXT[:8] + ("nodot", "lora_unet_x.lora_up.weight", "lora_te_" + "x" * 300 + ".alpha"))
        tensors[new if "." in new else new] = tensors.pop(key)
        what = f"renamed to {new[:20]!r}"
    elif how == 7:  # every module scaled up: the merged weights overflow
        for k in list(tensors):
            if k.endswith("up.weight"):
                tensors[k] = tensors[k] * draw.choice((1e3, 1e10, 1e19))
        what = "every up factor scaled"
    elif how == 8:  # a file of another family's or no module names
        tensors = {f"lora_te2_text_model_encoder_layers_0_mlp_fc1.{p}": torch.ones(2, 2)
                   for p in ("lora_up.weight", "lora_down.weight")} if draw.integer(0, 1) else \
            {"junk": torch.ones(1)}
        what = "another family / no modules"
    else:
        what = f"multiplier {multiplier}"
    try:
        data = safetensors_bytes(tensors)
    except Exception:  # noqa: BLE001 - safetensors refuses some drawn names (duplicates after renaming)
        data = safetensors_bytes(dict(s.lora))
    if draw.integer(0, 5) == 0:
        data, what = _flip_bytes(data, draw), what + ", bytes flipped"
    return Case("lora", what, ".safetensors", data, multiplier)


def mutate_embedding(s: InputSeeds, draw: Draw) -> Case:
    name = draw.choice(sorted(s.embeddings))
    suffix = Path(name).suffix
    how = draw.integer(0, 5)
    if how == 0:
        return Case("embedding", f"{name} bytes", suffix, _flip_bytes(s.embeddings[name], draw))
    shape = _shape(draw, (draw.choice((1, 2, 75, 1001)), draw.choice((32, 768))))
    t = _small_tensor(shape, draw, draw.choice((torch.float32, torch.float16, torch.float32, torch.int64)))
    t = t if t is not None else torch.ones(1, 4)
    if how == 1:
        data = {"string_to_param": {"*": t}, "step": draw.choice(NASTY_VALUES), "sd_checkpoint": "x",
                "name": draw.choice(NASTY_TEXT)}
        if draw.integer(0, 3) == 0:
            data["string_to_param"] = draw.choice(({}, {"a": t, "b": t}, [t], "x", None))
    elif how == 2:
        g = _small_tensor(_shape(draw, (1, 1280)), draw)
        data = {"clip_l": t, "clip_g": g if g is not None else torch.ones(1)}
    elif how == 3:
        data = {draw.choice(("emb_params", "*", "x\ny")): t}
    elif how == 4:
        data = draw.choice(([t], t, {"a": 1}, "text", {"string_to_param": {"*": "not a tensor"}}, 5))
    else:
        data = {"string_to_param": {"*": t}}
    if draw.integer(0, 1) and isinstance(data, dict) and all(isinstance(v, torch.Tensor) for v in data.values()):
        try:
            return Case("embedding", f"safetensors {str(shape)[:30]}", ".safetensors", safetensors_bytes(data))
        except Exception:  # noqa: BLE001 - safetensors refuses some dicts; use the torch format then
            pass
    buf = io.BytesIO()
    torch.save(data, buf, _use_new_zipfile_serialization=bool(draw.integer(0, 3)))
    blob = buf.getvalue()
    if draw.integer(0, 4) == 0:
        blob = _flip_bytes(blob, draw)
    return Case("embedding", f"pt {how} {str(shape)[:30]}", draw.choice((".pt", ".bin")), blob)


_YAML_KEYS = ("timesteps", "linear_start", "linear_end", "scale_factor", "parameterization",
              "unet_config.params.num_heads", "unet_config.params.num_head_channels", "unet_config.params.channel_mult",
              "unet_config.params.attention_resolutions", "unet_config.params.transformer_depth",
              "unet_config.params.model_channels", "unet_config.params.context_dim",
              "unet_config.params.use_linear_in_transformer", "first_stage_config.params.embed_dim",
              "first_stage_config.params.ddconfig.ch_mult", "first_stage_config.params.ddconfig.z_channels",
              "cond_stage_config", "cond_stage_config.params.layer", "cond_stage_config.params.layer_idx",
              "cond_stage_config.target", "unet_config", "first_stage_config.params.ddconfig", "unet_config.params")


def mutate_yaml(s: InputSeeds, draw: Draw) -> Case:
    import yaml

    how = draw.integer(0, 4)
    if how == 0:
        return Case("yaml", "bytes", ".yaml", _flip_bytes(s.yaml_text.encode(), draw))
    if how == 1:
        text = draw.choice((
            "a: &a [1]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b]\n"
            "model: {params: {unet_config: {params: {channel_mult: *c}}}}\n",
            "[" * 5000 + "]" * 5000, "model: !!python/object/apply:os.system ['true']\n", "model: 5\n",
            "model:\n  params: [1, 2]\n", "\t\x00", "", "model: {params: {timesteps: 1e11}}",
            "model: {params: {timesteps: 1.0e+11}}"))
        return Case("yaml", f"document {text[:20]!r}", ".yaml", text.encode())
    doc = yaml.safe_load(s.yaml_text)
    key = draw.choice(_YAML_KEYS)
    node = doc["model"]["params"]
    *path, last = key.split(".")
    for part in path:
        node = node.setdefault(part, {}) if isinstance(node, dict) else {}
    value = draw.choice(NASTY_VALUES + NASTY_NUMBERS) if how != 4 else draw.choice(INTERESTING_INTS)
    if isinstance(node, dict):
        if how == 3:
            node.pop(last, None)
        else:
            node[last] = value
    text = yaml.safe_dump(doc, allow_unicode=True)
    return Case("yaml", f"{key} = {str(value)[:20]}" if how != 3 else f"{key} removed", ".yaml", text.encode())


_INFOTEXT_PIECES = ("Steps: ", "Sampler: ", "CFG scale: ", "Seed: ", "Size: ", "x", "512", ", ", ": ", '"', "\\",
                    "\n", "Negative prompt: ", "a", " ", "-", "/", "Clip skip: ", "RNG: ", "99999999999999999999",
                    "nan", "1e400", "\x1b[2J", "\u202e", "é", ":", ",", "Variation seed strength: ")


def mutate_infotext(s: InputSeeds, draw: Draw) -> Case:
    how = draw.integer(0, 4)
    if how == 0:
        text = "".join(draw.choice(_INFOTEXT_PIECES) for _ in range(draw.integer(1, 200)))
    elif how == 1:  # long lines of one piece: the quadratic regex's worst cases
        text = draw.choice(_INFOTEXT_PIECES) * draw.choice((1000, 32_000, 70_000))
    elif how == 2:
        text = s.infotext[:draw.integer(0, len(s.infotext))] + draw.choice(_INFOTEXT_PIECES) * draw.integer(1, 50)
    elif how == 3:
        text = 'ab: "' + "\\" * draw.integer(1, 5) + "x, " * draw.choice((10, 10_000))
    else:
        return Case("infotext", "png bytes", ".png", _flip_bytes(s.png, draw))
    chunk = draw.choice(("tEXt", "zTXt", "iTXt"))
    return Case("infotext", f"{chunk} {how} ({len(text)} chars)", ".png", png_with_text(text, chunk))


_MUTATORS = {"lora": mutate_lora, "embedding": mutate_embedding, "yaml": mutate_yaml, "infotext": mutate_infotext}


def make_case(seeds: InputSeeds, draw: Draw) -> Case:
    return _MUTATORS[draw.choice(CLASSES)](seeds, draw)


# ---------------------------------------------------------------------------------------------------------------
# The property


@dataclass
class Outcome:
    result: str  # "refused" | "loaded"
    seconds: float
    message: str = ""


def _one_line_message(e: BaseException, name: str | None) -> str:
    text = str(e)
    assert text and "\n" not in text and "\r" not in text, f"not one line: {text[:200]!r}"
    assert all(c == " " or c.isprintable() for c in text), f"unescaped characters: {text[:200]!r}"
    return text


def check_case(case: Case, path: Path, seeds: InputSeeds) -> Outcome:
    """Run the case's reader on ``path``; AssertionError when the property fails (a foreign exception escapes
    as itself)."""
    start = time.perf_counter()
    try:
        _READERS[case.cls](case, path, seeds)
    except ValueError as e:  # every reader's own error type is a ValueError subclass
        assert type(e) is not ValueError, f"a bare ValueError: {str(e)[:200]}"
        return Outcome("refused", time.perf_counter() - start, _one_line_message(e, path.name))
    return Outcome("loaded", time.perf_counter() - start)


def _read_lora(case: Case, path: Path, seeds: InputSeeds) -> None:
    from tritonsd.lora.apply import LoraSpec, lora_deltas, merge_all, deltas_by_weight
    from tritonsd.formats.lora_file import read_lora

    spec = LoraSpec(path, case.multiplier)
    deltas = lora_deltas(read_lora(path), seeds.shapes, spec.te_multiplier, spec.unet_multiplier)
    zeros = {k: torch.zeros(v) for k, v in seeds.shapes.items()}
    merge_all(deltas_by_weight([deltas]), lambda k: zeros[k])


def _read_embedding(case: Case, path: Path, seeds: InputSeeds) -> None:
    from tritonsd.formats.embeddings import load_embedding_file

    load_embedding_file(path)


def _read_yaml(case: Case, path: Path, seeds: InputSeeds) -> None:
    from tritonsd.model.config import detect_config

    meta = {k: torch.empty(v, device="meta") for k, v in seeds.shapes.items()}
    detect_config(meta, path, text_heads=2)


def _read_infotext(case: Case, path: Path, seeds: InputSeeds) -> None:
    import base64

    from tritonsd.sampler.infotext_parse import generation_settings
    from tritonsd.serve.app import png_info_sync
    from tritonsd.serve.schema import PNGInfoRequest

    out = png_info_sync(PNGInfoRequest(image=base64.b64encode(path.read_bytes()).decode()))
    if out["info"].strip():
        notes = generation_settings(out["info"])["notes"]
        assert all("\n" not in n for n in notes)
    json.dumps(out)


_READERS = {"lora": _read_lora, "embedding": _read_embedding, "yaml": _read_yaml, "infotext": _read_infotext}


# ---------------------------------------------------------------------------------------------------------------
# HTTP bodies from the OpenAPI schema


def resolve(schema: dict, spec: dict) -> dict:
    while isinstance(schema, dict) and "$ref" in schema:
        node = spec
        for part in schema["$ref"].lstrip("#/").split("/"):
            node = node[part]
        schema = node
    return schema


CHEAP = {"steps": (1, 3), "width": (8, 64), "height": (8, 64), "n_iter": (1, 2), "batch_size": (1, 2)}


def body_strategy(schema: dict, spec: dict):
    """Hypothesis strategy of JSON bodies for ``schema`` (an object schema of the OpenAPI document): each
    property drawn from its type (anyOf / null / integer / number / string / boolean / array / object), often
    replaced by a value of the wrong type or an extreme, sometimes left out, plus unknown keys. The fields that
    set the work of a generation stay small when they are valid numbers, so a valid body costs a fraction of a
    second (an invalid one is still drawn: 0, -1, 2**63, text)."""
    from hypothesis import strategies as st

    schema = resolve(schema, spec)
    nasty = st.one_of(st.sampled_from(NASTY_VALUES + NASTY_NUMBERS + tuple(INTERESTING_INTS)),
                      st.text(max_size=50), st.binary(max_size=20).map(lambda b: b.decode("latin-1")))

    not_null = nasty.filter(lambda v: v is not None)  # null means A1111's default: 512x512, 50 steps

    def of(sub: dict, name: str = ""):
        sub = resolve(sub, spec)
        if name in CHEAP:
            lo, hi = CHEAP[name]
            valid = st.integers(lo, hi).map(lambda v: v * 8 if name in ("width", "height") else v)
            return st.one_of(valid, valid, not_null)
        if "anyOf" in sub:
            return st.one_of([of(s) for s in sub["anyOf"]] + [nasty])
        kind = sub.get("type")
        if kind == "null":
            return st.none()
        if kind == "integer":
            return st.one_of(st.integers(-10, 100), st.sampled_from(INTERESTING_INTS))
        if kind == "number":
            return st.one_of(st.floats(-1e3, 1e3), st.sampled_from(NASTY_NUMBERS))
        if kind == "string":
            return st.one_of(st.text(max_size=40), st.sampled_from(NASTY_TEXT[:9]))
        if kind == "boolean":
            return st.booleans()
        if kind == "array":
            return st.lists(of(sub.get("items", {})), max_size=3)
        if kind == "object":
            return st.dictionaries(st.text(max_size=20), st.one_of(st.none(), st.integers(), st.text(max_size=10)),
                                   max_size=3)
        return nasty

    props = schema.get("properties", {})
    fields = {k: of(v, k) for k, v in props.items()}
    always = {k: fields.pop(k) for k in CHEAP if k in fields}  # never left to their costly defaults
    body = st.fixed_dictionaries(always, optional=fields)
    extra = st.dictionaries(st.text(max_size=30), nasty, max_size=2)
    return st.tuples(body, extra).map(lambda be: {**be[1], **be[0]})
