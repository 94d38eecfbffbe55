"""``tritonsd generate``: txt2img, img2img (``--init-image``) and inpainting (``--init-image`` + ``--mask`` with a
9-channel model) from an original checkpoint, written as PNGs with AUTOMATIC1111 ``parameters`` infotext.

Everything that can be checked without the model (files, sizes, device, output directory) is checked before
loading it, so a mistake costs seconds, not a model load. Output files are numbered like AUTOMATIC1111's
(``00000-<seed>.png``), never overwrite, and are written only once every image of the batch is finite.
Exit codes: 0 success, 1 a problem with the inputs or the run, 2 bad usage.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import secrets
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .cli import UsageError

DTYPES = ("fp32", "fp16", "bf16")
RANDOM_SEEDS = 2 ** 32  # a random seed is drawn from AUTOMATIC1111's range
SEED_LIMIT = 2 ** 64  # torch.Generator.manual_seed takes [0, 2**64); image i uses seed + i
NUMBERED = re.compile(r"^(\d{5,})-")


class GenerateError(ValueError):
    """An input file, the device or the output directory is not usable (exit code 1)."""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate images (txt2img, img2img, inpainting) from a checkpoint",
                              description="Generate images from an original checkpoint: txt2img, img2img "
                                          "(--init-image) or inpainting (--init-image and --mask, 9-channel "
                                          "model). Writes OUT/NNNNN-SEED.png with AUTOMATIC1111 infotext and "
                                          "prints each path.")
    model = p.add_argument_group("model")
    model.add_argument("--checkpoint", type=Path, required=True, metavar="PATH", help=".safetensors or .ckpt file")
    model.add_argument("--config", type=Path, default=None, metavar="YAML", help="the original inference YAML (eps/v, heads)")
    model.add_argument("--text-heads", type=int, default=None, metavar="N",
                       help="attention heads of the text towers (not in the weights; default width / 64)")
    model.add_argument("--parameterization", choices=("eps", "v"), default=None,
                       help="prediction type, when no --config says it (SD2 768 models are v)")

    gen = p.add_argument_group("generation")
    gen.add_argument("--prompt", required=True, metavar="TEXT", help="the prompt ('' for an unconditional image)")
    gen.add_argument("--negative-prompt", default="", metavar="TEXT", help="what to steer away from (default: nothing)")
    gen.add_argument("--sampler", choices=("ddim", "plms", "euler", "euler_a", "dpmpp_2m"), default="dpmpp_2m",
                     help="default: dpmpp_2m")
    gen.add_argument("--karras", action=argparse.BooleanOptionalAction, default=None,
                     help="Karras sigmas for the k-diffusion samplers (default: on for dpmpp_2m, off for euler "
                          "and euler_a, as AUTOMATIC1111's sampler names; DDIM / PLMS ignore it)")
    gen.add_argument("--steps", type=int, default=20, metavar="N", help="sampling steps (default: 20)")
    gen.add_argument("--cfg", type=float, default=7.5, metavar="SCALE", help="classifier-free guidance scale (default: 7.5)")
    gen.add_argument("--seed", type=int, default=None, metavar="N",
                     help="seed of image 0; image i uses seed + i (default: random, printed on stderr)")
    gen.add_argument("--width", type=int, default=None, metavar="PX",
                     help="multiple of 64 (SDXL: 32) (default: the init image's, else --height, else 512 SD1, "
                          "768 SD2-v, 1024 SDXL)")
    gen.add_argument("--height", type=int, default=None, metavar="PX",
                     help="as --width (default: the init image's, else --width, else the family's)")
    gen.add_argument("--batch", type=int, default=1, metavar="N", help="images per run (default: 1)")
    gen.add_argument("--init-image", type=Path, default=None, metavar="IMAGE", help="PNG/JPEG to start from (img2img, inpainting)")
    gen.add_argument("--strength", type=float, default=None, metavar="F",
                     help="how much of the init image to repaint, 0..1 (img2img; default: the pipeline's, 0.75)")
    gen.add_argument("--mask", type=Path, default=None, metavar="IMAGE",
                     help="grey image the size of --init-image, white = repaint (needs an inpainting model)")

    run_ = p.add_argument_group("runtime")
    run_.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    run_.add_argument("--dtype", choices=DTYPES, default=None,
                      help="weights and activations (default: fp16 on cuda, fp32 on cpu; cpu runs fp32 only)")
    run_.add_argument("--kernels", choices=("auto", "torch", "triton"), default="auto",
                      help="auto: Triton on cuda, torch on cpu")
    run_.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                      help="run the sampling loop eagerly (default on cuda: the euler / euler_a / dpmpp_2m loop is "
                           "captured once as a CUDA graph and replayed)")
    run_.add_argument("--out", type=Path, default=Path("outputs"), metavar="DIR", help="output directory (default: outputs)")
    run_.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=run)


# ------------------------------------------------------------------------------------------------ checks


def check_usage(args: argparse.Namespace) -> None:
    """Argument values that are wrong on their own (exit code 2)."""
    for name in ("width", "height"):
        value = getattr(args, name)
        if value is not None and (value <= 0 or value % 8):
            raise UsageError(f"--{name} must be a positive multiple of 8, got {value}")
    if args.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {args.steps}")
    if args.batch < 1:
        raise UsageError(f"--batch must be at least 1, got {args.batch}")
    if args.text_heads is not None and args.text_heads < 1:
        raise UsageError(f"--text-heads must be at least 1, got {args.text_heads}")
    if args.seed is not None and not -1 <= args.seed <= SEED_LIMIT - args.batch:
        raise UsageError(f"--seed must be in 0..2**64 - --batch (or -1 for a random one), got {args.seed}")
    if args.mask is not None and args.init_image is None:
        raise UsageError("--mask needs --init-image (the image to inpaint)")
    if args.strength is not None:
        if args.init_image is None:
            raise UsageError("--strength applies to img2img only: give --init-image")
        if args.mask is not None:
            raise UsageError("--strength does not apply to inpainting (the masked area is repainted from noise)")
        if not 0.0 <= args.strength <= 1.0:
            raise UsageError(f"--strength must be between 0 and 1, got {args.strength}")


def check_checkpoint(path: Path, config: Path | None) -> None:
    if not path.exists():
        raise GenerateError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise GenerateError(f"checkpoint is not a file: {path}")
    if not os.access(path, os.R_OK):
        raise GenerateError(f"checkpoint is not readable: {path}")
    if config is not None and not config.is_file():
        raise GenerateError(f"config not found: {config}")


def resolve_device(device: str | None, dtype: str | None) -> tuple[str, str]:
    """(device, dtype): the defaults filled in, CUDA checked before anything is loaded."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise GenerateError("--device cuda was asked for, but CUDA is not available (use --device cpu)")
    if dtype is None:
        dtype = "fp16" if device == "cuda" else "fp32"
    if device == "cpu" and dtype != "fp32":
        raise UsageError(f"--dtype {dtype} needs --device cuda; on the CPU tritonsd computes in fp32")
    return device, dtype


def check_kernels(kernels: str, device: str) -> None:
    if kernels == "triton" and device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise UsageError("--kernels triton on the CPU needs TRITON_INTERPRET=1 (Triton's slow interpreter)")


def check_output_dir(out: Path) -> None:
    """Fail now, not after the sampling, when ``out`` cannot hold new files. Creates nothing that stays."""
    if out.exists() and not out.is_dir():
        raise GenerateError(f"output directory {out} exists and is not a directory")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise GenerateError(f"cannot create output directory {out}: {existing} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise GenerateError(f"output directory {out} is not writable: {e.strerror or e}") from None


# ------------------------------------------------------------------------------------------------ images in


@dataclass
class InitImages:
    image: object  # torch.Tensor [1, 3, H, W] in [-1, 1]
    mask: object | None  # torch.Tensor [1, 1, H, W] in [0, 1], 1 = repaint
    width: int
    height: int


def _open_image(path: Path, what: str, mode: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return im.convert(mode)
    except FileNotFoundError:
        raise GenerateError(f"{what} not found: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        reason = "not an image Pillow can read" if isinstance(e, UnidentifiedImageError) else str(e)
        raise GenerateError(f"cannot open {what} {path}: {reason}") from None


def load_init_images(init_path: Path, mask_path: Path | None, width: int | None,
                     height: int | None) -> InitImages:
    """The init image (RGB) and optional mask (greyscale) as tensors; sizes checked against each other and
    against --width / --height where given."""
    import numpy as np
    import torch

    image = _open_image(init_path, "init image", "RGB")
    w, h = image.size
    if (width is not None and width != w) or (height is not None and height != h):
        raise GenerateError(f"init image {init_path} is {w}x{h} but --width/--height ask for "
                            f"{width or w}x{height or h} (resize the image or leave out --width/--height)")
    if w % 8 or h % 8:
        raise GenerateError(f"init image {init_path} is {w}x{h}; width and height must be multiples of 8")
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())  # [H, W, 3] in 0..255
    tensor = (pixels / 127.5 - 1.0).permute(2, 0, 1)[None]  # [H, W, 3] -> [1, 3, H, W] in [-1, 1]
    mask = None
    if mask_path is not None:
        mask_image = _open_image(mask_path, "mask", "L")
        if mask_image.size != (w, h):
            mw, mh = mask_image.size
            raise GenerateError(f"mask {mask_path} is {mw}x{mh} but the init image is {w}x{h}")
        mask = torch.from_numpy(np.asarray(mask_image, dtype=np.float32).copy())[None, None] / 255.0  # [1,1,H,W]
    return InitImages(image=tensor, mask=mask, width=w, height=h)


# ------------------------------------------------------------------------------------------------ run


def run(args: argparse.Namespace) -> int:
    # Usage errors are reported here rather than by cli.main: under ``python -m tritonsd.tools.cli`` the running
    # cli is ``__main__``, a second module object whose UsageError is another class than the one imported here.
    try:
        return _run(args)
    except UsageError as e:
        print(f"tritonsd generate: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    check_usage(args)
    check_checkpoint(args.checkpoint, args.config)
    init = None
    if args.init_image is not None:
        init = load_init_images(args.init_image, args.mask, args.width, args.height)
    device, dtype = resolve_device(args.device, args.dtype)
    check_kernels(args.kernels, device)
    check_output_dir(args.out)
    seed = secrets.randbelow(RANDOM_SEEDS) if args.seed in (None, -1) else args.seed

    from ..kernels import dispatch

    with dispatch.force(args.kernels):
        model, model_hash = load(args, device, dtype)
        warn_truncated(model, args.prompt, "prompt")
        warn_truncated(model, args.negative_prompt, "negative prompt")
        settings, images = sample(model, args, init, seed, dtype)
    print(f"seed {seed}", file=sys.stderr, flush=True)  # also in each file's name and infotext
    for path in write_images(args.out, images, settings, model_hash, args.checkpoint.stem):
        print(path, flush=True)
    return 0


def load(args: argparse.Namespace, device: str, dtype: str):
    """The model on ``device`` in ``dtype``, and the checkpoint's AUTOMATIC1111 hash (computed alongside)."""
    import torch

    from ..model.sd import load_model
    from .png import model_hash
    from .progress import bar, progress_enabled

    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool, \
            bar(2, f"loading {args.checkpoint.name}", progress_enabled(args.quiet), unit="part") as progress:
        hashing = pool.submit(model_hash, args.checkpoint)  # sha256 releases the GIL: overlaps the load
        model = load_model(args.checkpoint, config=args.config, parameterization=args.parameterization,
                           text_heads=args.text_heads, dtype=torch_dtype, device=device)
        progress.update()
        digest = hashing.result()
        progress.update()
    cfg = model.config
    if cfg.family == "sd2" and cfg.parameterization_source == "assumed":
        print(f"tritonsd generate: warning: {args.checkpoint.name} is SD2; assuming {cfg.parameterization}-"
              "prediction (768 models are v: give --config or --parameterization)", file=sys.stderr)
    return model, digest


def _tokenizers(model):
    """(tokenizer, context length) of each text tower the prompt goes through."""
    text = model.text_module
    embedders = getattr(text, "text_embedders", [text])
    return [(e.tokenizer, e.config.positions) for e in embedders]


def warn_truncated(model, prompt: str, what: str) -> None:
    """Prompts longer than the towers' 75 tokens lose their tail (as in the original): say which words."""
    if not prompt:
        return
    tokenizer, positions = _tokenizers(model)[0]
    dropped = tokenizer.truncated_words(prompt, positions)
    if dropped:
        print(f"tritonsd generate: warning: the {what} is longer than {positions - 2} tokens; dropped: "
              f"\"{dropped}\"", file=sys.stderr)


def sample(model, args: argparse.Namespace, init: InitImages | None, seed: int, dtype: str):
    """(resolved settings, images [B, 3, H, W] in [0, 1]); refuses a non-finite result."""
    import torch

    from ..sampler.pipeline import GenerationSettings, NonFiniteError, generate, resolve_settings
    from .progress import bar, progress_enabled

    settings = GenerationSettings(
        prompt=args.prompt, negative_prompt=args.negative_prompt, sampler=args.sampler,
        karras=(args.sampler == "dpmpp_2m") if args.karras is None else args.karras,
        steps=args.steps, cfg_scale=args.cfg, seed=seed, batch=args.batch,
        width=init.width if init else args.width or args.height,  # one side given: a square image
        height=init.height if init else args.height or args.width,
        use_graphs=args.cuda_graphs,
    )
    if init is not None:
        settings.init_image, settings.mask = init.image, init.mask
        if args.strength is not None:
            settings.strength = args.strength
    settings = resolve_settings(model, settings)
    with bar(settings.steps, "sampling", progress_enabled(args.quiet), unit="step") as progress:
        def on_step(step: int, total: int) -> None:
            progress.total = total  # img2img runs only the last strength * steps of the schedule
            progress.n = step + 1
            progress.refresh()

        try:
            images = generate(model, settings, callback=on_step)
            if not torch.isfinite(images).all():
                raise NonFiniteError("NaN or Inf in the generated images")
        except NonFiniteError as e:
            hint = "try --dtype fp32" if dtype != "fp32" else "the weights may be damaged"
            raise NonFiniteError(f"{e} (seed {seed}); nothing was written ({hint})") from None
    return settings, images


# ------------------------------------------------------------------------------------------------ PNGs out


def sampler_name(sampler: str, karras: bool) -> str:
    from .png import SAMPLER_NAMES

    return SAMPLER_NAMES.get((sampler, karras)) or SAMPLER_NAMES[(sampler, False)]


def infotext(settings, index: int, model_hash: str, model_name: str) -> str:
    from .png import Infotext

    extra = None
    if settings.init_image is not None and settings.mask is None:  # img2img (inpainting ignores strength)
        extra = {"Denoising strength": float(settings.strength)}
    return Infotext(prompt=settings.prompt, negative_prompt=settings.negative_prompt, steps=settings.steps,
                    sampler=sampler_name(settings.sampler, settings.karras), cfg_scale=settings.cfg_scale,
                    seed=settings.seed + index, width=settings.width, height=settings.height,
                    model_hash=model_hash, model=model_name, extra=extra).render()


def next_number(out: Path) -> int:
    """One past the highest ``NNNNN-`` file number in ``out`` (0 in a new directory)."""
    numbers = [int(m.group(1)) for name in os.listdir(out) if (m := NUMBERED.match(name))]
    return max(numbers, default=-1) + 1


def write_images(out: Path, images, settings, model_hash: str, model_name: str) -> list[Path]:
    """``out/NNNNN-<seed + i>.png`` for each image, numbered after the files already there; never overwrites."""
    from .png import to_pil, write_png

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i, image in enumerate(images):
        pending = out / f".tritonsd-pending-{os.getpid()}-{i}.png"
        try:
            write_png(pending, to_pil(image), infotext(settings, i, model_hash, model_name))
            written.append(_claim(pending, out, settings.seed + i))
        finally:
            pending.unlink(missing_ok=True)
    return written


def _claim(pending: Path, out: Path, seed: int) -> Path:
    """Link the finished file ``pending`` under the next free number (the caller removes ``pending``):
    ``os.link`` refuses an existing name, so two runs writing into one directory cannot overwrite each other."""
    number = next_number(out)
    while True:
        target = out / f"{number:05d}-{seed}.png"
        try:
            os.link(pending, target)
            return target
        except FileExistsError:
            number += 1
        except OSError:  # a file system without hard links: the check above is all we can do
            if target.exists():
                number += 1
                continue
            os.replace(pending, target)
            return target
