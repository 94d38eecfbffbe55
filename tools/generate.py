"""``tritonsd generate``: txt2img, img2img (``--init-image``) and inpainting (``--init-image`` + ``--mask``, as
AUTOMATIC1111 inpaints: ``sampler/inpaint.py``) from an original checkpoint, written as PNGs with AUTOMATIC1111 ``parameters`` infotext.

A thin shell over the Pipeline: flags -> ``GenerationSettings`` (checked before the model loads, so a mistake
costs seconds, not a model load) -> a ``LoadSpec`` (its prechecks before anything is read) ->
``tritonsd.pipeline.load_spec`` -> ``Pipeline.generate`` -> ``Pipeline.save`` (files
numbered like AUTOMATIC1111's ``00000-<seed>.png``, never overwritten, written only once every image of the
batch is finite). Exit codes: 0 success, 1 a problem with the inputs or the run, 2 bad usage.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from tritonsd.devices import DTYPE_NAMES
from tritonsd.tools.cli import UsageError
from tritonsd.sampler import registry
from tritonsd.sampler.settings import (check_rng_device, fields_from_infotext, GenerationSettings, SettingsError,
    SIDE_RULE)
from tritonsd.lora.apply import parse_lora_arg
from tritonsd.sampler.infotext_parse import generation_settings, parse_infotext, unsupported_keys
from tritonsd.sampler.reproduce import check_networks
from tritonsd.load_spec import LoadSpec
from tritonsd.sampler.memory import memory_shortfall
from tritonsd.formats import image_file
from tritonsd.pipeline import load_spec, NonFiniteError
from tritonsd.tools.control_flags import add_control_flags, control_units
from tritonsd.tools.progress import bar, progress_enabled

# GenerationSettings field -> the flag that sets it, so errors name what the user typed
FLAGS = {"prompt": "--prompt", "negative_prompt": "--negative-prompt", "sampler": "--sampler", "karras": "--karras",
         "steps": "--steps", "cfg_scale": "--cfg", "seed": "--seed", "width": "--width", "height": "--height",
         "batch_size": "--batch", "init_image": "--init-image", "mask": "--mask",
         "strength": "--denoising-strength / --strength",
         "clip_skip": "--clip-skip", "rng": "--rng", "subseed": "--subseed", "subseed_strength": "--subseed-strength",
         "pad_cond_uncond": "--pad-cond-uncond", "scheduler": "--scheduler", "prompt_syntax": "--prompt-syntax",
         "use_graphs": "--no-cuda-graphs", "tiling": "--tiling", "model": "--checkpoint", "mask_blur": "--mask-blur",
         "inpaint_full_res": "--inpaint-area", "inpaint_full_res_padding": "--inpaint-padding",
         "inpainting_fill": "--masked-content", "inpainting_mask_invert": "--invert-mask",
         "inpainting_mask_weight": "--mask-weight", "resize_mode": "--resize-mode",
         "enable_hr": "--hires", "hr_scale": "--hires-scale", "hr_resize_x": "--hires-size", "hr_resize_y": "--hires-size",
         "hr_upscaler": "--hires-upscaler", "hr_second_pass_steps": "--hires-steps", "hr_sampler": "--hires-sampler",
         "hr_scheduler": "--hires-scheduler", "hr_prompt": "--hires-prompt", "hr_negative_prompt": "--hires-negative-prompt",
         "hr_checkpoint_name": "--hires-checkpoint", "controls": "--control"}
MASKED_CONTENT = ("fill", "original", "latent-noise", "latent-nothing")  # inpainting_fill 0..3
HIRES_FLAGS = ("hires_scale", "hires_size", "hires_upscaler", "hires_steps", "hires_sampler", "hires_scheduler",
               "hires_prompt", "hires_negative_prompt", "hires_checkpoint")


class GenerateError(ValueError):
    """An input file, the device or the output directory is not usable (exit code 1)."""


def _listing(names) -> str:
    """"a", "a and b", "a, b and c"."""
    names = list(names)
    return " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)


def sampler_help() -> dict[str, str]:
    """The help of --sampler, --karras and --no-cuda-graphs, from the registry as it is now."""

    sigma = [s for s in registry.SAMPLERS.values() if s.space == "sigmas"]
    fixed = [s.a1111_name for s in registry.SAMPLERS.values() if s.space != "sigmas"]
    names = ", ".join(f"{s.name} ({s.a1111_name})" for s in registry.SAMPLERS.values())
    return {"sampler": f"ours or AUTOMATIC1111's name (or its old combined 'DPM++ 2M Karras'): {names} "
                       f"(default: {registry.DEFAULT_SAMPLER})",
            "karras": f"Karras sigmas for the k-diffusion samplers (default: on for "
                      f"{_listing(s.name for s in sigma if s.karras)}, off for "
                      f"{_listing(s.name for s in sigma if not s.karras)}, as AUTOMATIC1111's sampler names"
                      + (f"; {' / '.join(fixed)} ignore it)" if fixed else ")"),
            "graphs": f"run the sampling loop eagerly (default on cuda: the {' / '.join(registry.graph_samplers())} "
                      "loop is captured once as a CUDA graph and replayed)"}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate images (txt2img, img2img, inpainting) from a checkpoint",
                              description="Generate images from an original checkpoint: txt2img, img2img "
                                          "(--init-image) or inpainting (--init-image and --mask, 9-channel "
                                          "model). Writes OUT/NNNNN-SEED.png with AUTOMATIC1111 infotext and "
                                          "prints each path.")
    helps = sampler_help()
    model = p.add_argument_group("model")
    model.add_argument("--checkpoint", type=Path, required=True, metavar="PATH",
                       help=".safetensors or .ckpt file, or demo:sd1 (a built-in tiny model with random weights)")
    model.add_argument("--vae", type=Path, default=None, metavar="FILE",
                       help="an external VAE (.safetensors or .pt) in place of the checkpoint's")
    model.add_argument("--config", type=Path, default=None, metavar="YAML",
                       help="the original inference YAML (eps/v, heads); default: CHECKPOINT.yaml beside it")
    model.add_argument("--lora", action="append", default=[], metavar="FILE:W",
                       help="apply a LoRA (.safetensors) at weight W, or FILE:TE_W:UNET_W (repeatable)")
    model.add_argument("--lora-dir", type=Path, default=None, metavar="DIR",
                       help="where <lora:name:w> in the prompt is looked up (AUTOMATIC1111's models/Lora)")
    model.add_argument("--text-heads", type=int, default=None, metavar="N",
                       help="attention heads of the text towers (not in the weights; default width / 64)")
    model.add_argument("--parameterization", choices=("eps", "v"), default=None,
                       help="prediction type, when no --config says it (SD2 768 models are v)")

    gen = p.add_argument_group("generation")
    gen.add_argument("--prompt", default=None, metavar="TEXT",
                     help="the prompt, in AUTOMATIC1111's syntax: (word:1.2), [word], BREAK, [from:to:when], "
                          "[a|b], <lora:name:w>, embedding names ('' for an unconditional image)")
    gen.add_argument("--from-png", type=Path, default=None, metavar="PNG",
                     help="take the settings from an AUTOMATIC1111 PNG's infotext (flags given override them)")
    gen.add_argument("--infotext", default=None, metavar="TEXT", help="the same from the infotext's text")
    gen.add_argument("--ignore-unsupported", action="store_true",
                     help="generate even when the infotext asks for what tritonsd does not implement (Face "
                          "restoration, ...): those are named on stderr (default: exit 2)")
    gen.add_argument("--negative-prompt", default=None, metavar="TEXT", help="what to steer away from (default: nothing)")
    gen.add_argument("--sampler", default=None, metavar="NAME", help=helps["sampler"])
    gen.add_argument("--scheduler", default=None, metavar="TYPE",
                     help="AUTOMATIC1111's schedule type: Automatic (default: the sampler's own), Uniform or Karras")
    gen.add_argument("--karras", action=argparse.BooleanOptionalAction, default=None, help=helps["karras"])
    gen.add_argument("--steps", type=int, default=None, metavar="N", help="sampling steps (default: 20)")
    gen.add_argument("--cfg", type=float, default=None, metavar="SCALE", help="classifier-free guidance scale (default: 7, AUTOMATIC1111's)")
    gen.add_argument("--seed", type=int, default=None, metavar="N",
                     help="seed of image 0; image i uses seed + i (default or -1: random, printed on stderr)")
    gen.add_argument("--width", type=int, default=None, metavar="PX",
                     help=f"{SIDE_RULE} (default: the init image's, else --height, else 512 SD1, 768 SD2-v, "
                          "1024 SDXL)")
    gen.add_argument("--height", type=int, default=None, metavar="PX",
                     help="as --width (default: the init image's, else --width, else the family's)")
    gen.add_argument("--batch", type=int, default=None, metavar="N", help="images per run (default: 1)")
    gen.add_argument("--clip-skip", type=int, default=None, metavar="N",
                     help="use the text encoder's N-th layer from the end (SD1's CLIP; default 1, the last)")
    gen.add_argument("--rng", choices=("nv", "gpu", "cpu"), default=None,
                     help="noise source: nv (CUDA's generator reproduced on any device: the same image on the "
                          "CPU and the GPU, AUTOMATIC1111's default), gpu, cpu (default: nv)")
    gen.add_argument("--subseed", type=int, default=None, metavar="N", help="variation seed")
    gen.add_argument("--subseed-strength", type=float, default=None, metavar="F",
                     help="how much of the variation seed's noise, 0..1 (default 0)")
    gen.add_argument("--pad-cond-uncond", action="store_true", default=None,
                     help="pad the shorter of prompt / negative prompt with empty chunks (one batched UNet call; "
                          "AUTOMATIC1111's option of that name: it changes the image)")
    gen.add_argument("--prompt-syntax", choices=("a1111", "original"), default=None,
                     help="a1111 (default): weights, BREAK, long prompts, editing; original: one 77-token window "
                          "read literally, as the original scripts")
    gen.add_argument("--tiling", action=argparse.BooleanOptionalAction, default=None,
                     help="seamless textures: every UNet and VAE convolution pads circularly, as AUTOMATIC1111's "
                          "Tiling (default: off; --no-tiling overrides an infotext's Tiling: True)")
    gen.add_argument("--embeddings-dir", type=Path, default=None, metavar="DIR",
                     help="textual-inversion embeddings, used where their file name appears in a prompt")
    gen.add_argument("--init-image", type=Path, default=None, metavar="IMAGE", help="PNG/JPEG to start from (img2img, inpainting)")
    gen.add_argument("--denoising-strength", "--strength", dest="strength", type=float, default=None, metavar="F",
                     help="how much to repaint, 0..1: of the init image (img2img and inpainting; default 0.75) or of "
                          "the upscaled first pass (--hires; default 0.7)")
    gen.add_argument("--mask", type=Path, default=None, metavar="IMAGE",
                     help="grey image (or alpha) the size of --init-image, white = repaint; the rest of the image "
                          "is kept, as AUTOMATIC1111 inpaints")
    gen.add_argument("--mask-blur", type=int, default=None, metavar="PX", help="mask blur, pixels (default 4)")
    gen.add_argument("--inpaint-area", choices=("whole", "masked"), default=None,
                     help="whole picture (default) or only masked: the masked area, padded, at --width x --height")
    gen.add_argument("--inpaint-padding", type=int, default=None, metavar="PX",
                     help="only masked padding, pixels (default 32)")
    gen.add_argument("--masked-content", choices=MASKED_CONTENT, default=None,
                     help="what the masked area starts from (default: original)")
    gen.add_argument("--invert-mask", action="store_true", default=None, help="inpaint what is NOT masked")
    gen.add_argument("--resize-mode", type=int, choices=range(4), default=None, metavar="0-3",
                     help="the init image to --width x --height: 0 just resize, 1 crop and resize, 2 resize and fill "
                          "(with --mask), 3 just resize in latent space (img2img: the image encoded at its own size)")
    gen.add_argument("--mask-weight", type=float, default=None, metavar="W",
                     help="conditional mask weight of 9-channel inpainting models, 0-1 (default 1: the masked "
                          "area hidden from the image conditioning; AUTOMATIC1111's option)")

    hires = p.add_argument_group("hires fix (AUTOMATIC1111's: a second pass at a larger size)")
    hires.add_argument("--hires", action="store_true", default=None,
                       help="upscale the image and denoise it again (any --hires-* flag turns it on too)")
    size = hires.add_mutually_exclusive_group()
    size.add_argument("--hires-scale", type=float, default=None, metavar="S",
                      help="the second pass's size: the first's times S (default 2)")
    size.add_argument("--hires-size", type=_hires_size, default=None, metavar="WxH",
                      help="the second pass's size (0 for a side: from the other and the aspect ratio; both with "
                           "another aspect ratio: the upscale covers it and the rest is cropped)")
    hires.add_argument("--hires-upscaler", default=None, metavar="NAME",
                       help="Latent (default), Latent (antialiased), Latent (bicubic), Latent (bicubic antialiased), "
                            "Latent (nearest), Latent (nearest-exact), Lanczos, Nearest, None, or the name of a "
                            "model file in --upscaler-dir (its name without .pth / .safetensors)")
    hires.add_argument("--hires-steps", type=int, default=None, metavar="N",
                       help="steps of the second pass (default 0: --steps)")
    hires.add_argument("--hires-sampler", default=None, metavar="NAME",
                       help="the second pass's sampler, a name --sampler takes (default: --sampler's)")
    hires.add_argument("--hires-scheduler", choices=("Automatic", "Uniform", "Karras"), default=None,
                       help="the second pass's schedule (default: the first pass's)")
    hires.add_argument("--hires-prompt", default=None, metavar="TEXT", help="the second pass's prompt (default: --prompt)")
    hires.add_argument("--hires-negative-prompt", default=None, metavar="TEXT",
                       help="the second pass's negative prompt (default: --negative-prompt)")
    hires.add_argument("--hires-checkpoint", "--hr-checkpoint", default=None, metavar="NAME|PATH",
                       help="the second pass's checkpoint: a file, or a name in --models-dir as AUTOMATIC1111 "
                            "names it (file name, with or without its [hash]); default: --checkpoint's "
                            "('Use same checkpoint')")
    hires.add_argument("--models-dir", type=Path, default=None, metavar="DIR",
                       help="where --hires-checkpoint names are looked up (default: --checkpoint's folder)")
    hires.add_argument("--upscaler-dir", type=Path, default=None, metavar="DIR",
                       help="upscaler model files (ESRGAN, Real-ESRGAN, SwinIR, DAT, ...: .pth / .safetensors; "
                            "needs spandrel: pip install 'tritonsd[upscale]')")
    add_control_flags(p)

    run_ = p.add_argument_group("runtime")
    run_.add_argument("--device", default=None, metavar="DEVICE",
                      help="cpu, cuda or cuda:N (default: cuda when available)")
    run_.add_argument("--dtype", choices=tuple(DTYPE_NAMES), default=None,
                      help="weights and activations (default: fp16 on cuda, fp32 on cpu; cpu runs fp32 only)")
    run_.add_argument("--kernels", choices=("auto", "torch", "triton"), default="auto",
                      help="auto: Triton on cuda, torch on cpu")
    run_.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false", help=helps["graphs"])
    run_.add_argument("--out", type=Path, default=Path("outputs"), metavar="DIR", help="output directory (default: outputs)")
    run_.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=run)


def _hires_size(text: str) -> tuple[int, int]:
    """``--hires-size WxH``: two whole numbers, 0 for a side taken from the other."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts) or parts == ["0", "0"]:
        raise argparse.ArgumentTypeError(f"expected WxH (e.g. 1024x768, or 1024x0), got {text!r}")
    return int(parts[0]), int(parts[1])


# ------------------------------------------------------------------------------------------------ checks


def check_usage(args: argparse.Namespace) -> None:
    """Flag combinations that are wrong on their own (exit code 2); values are the settings' to check."""
    if args.text_heads is not None and args.text_heads < 1:
        raise UsageError(f"--text-heads must be at least 1, got {args.text_heads}")
    if args.mask is not None and args.init_image is None:
        raise UsageError("--mask needs --init-image (the image to inpaint)")
    inpainting = ("mask_blur", "inpaint_area", "inpaint_padding", "masked_content", "invert_mask")
    given = [f"--{name.replace('_', '-')}" for name in inpainting if getattr(args, name) is not None]
    if given and args.mask is None:
        raise UsageError(f"{', '.join(given)} need --mask (inpainting)")
    if args.strength is not None:
        if args.init_image is None and not hires_on(args):
            raise UsageError("--denoising-strength / --strength applies to img2img (--init-image) and hires fix "
                             "(--hires) only")
    if hires_on(args) and args.init_image is not None:
        raise UsageError("--hires is txt2img's hires fix: it takes no --init-image")


def hires_on(args: argparse.Namespace) -> bool:
    """``--hires``, or any ``--hires-*`` flag."""
    return bool(args.hires) or any(getattr(args, name) is not None for name in HIRES_FLAGS)


def hires_fields(args: argparse.Namespace) -> dict:
    """The hires fields the flags give (None: not given)."""
    if not hires_on(args):
        return {}
    resize_x, resize_y = args.hires_size if args.hires_size is not None else (None, None)
    if args.hires_scale is not None:
        resize_x = resize_y = 0  # a scale on the command line wins over an infotext's size
    return dict(enable_hr=True, hr_scale=args.hires_scale, hr_resize_x=resize_x, hr_resize_y=resize_y,
                hr_upscaler=args.hires_upscaler, hr_second_pass_steps=args.hires_steps, hr_sampler=args.hires_sampler,
                hr_scheduler=args.hires_scheduler, hr_prompt=args.hires_prompt,
                hr_negative_prompt=args.hires_negative_prompt, hr_checkpoint_name=args.hires_checkpoint)


def settings_from_args(args: argparse.Namespace, init_image=None, mask=None):
    """The run's ``GenerationSettings``: the infotext's (``--from-png`` / ``--infotext``), then the flags given,
    checked without the model (``SettingsError`` names the flag)."""

    fields = {}
    text = infotext_of(args)
    if text is not None:
        fields, notes = usage_errors(lambda: fields_from_infotext(text))
        for note in notes:
            print(f"tritonsd generate: warning: {note}", file=sys.stderr)
        check_unsupported(text, args.ignore_unsupported)
        check_networks(parse_infotext(text), args.lora_dir, args.embeddings_dir, "--lora-dir", "--embeddings-dir")
    elif args.prompt is None:
        raise UsageError("--prompt is required (or --from-png / --infotext)")
    given = dict(prompt=args.prompt, negative_prompt=args.negative_prompt, sampler=args.sampler,
                 karras=args.karras, steps=args.steps, cfg_scale=args.cfg, seed=args.seed, width=args.width,
                 height=args.height, batch_size=args.batch, strength=args.strength, clip_skip=args.clip_skip,
                 rng=args.rng, subseed=args.subseed, subseed_strength=args.subseed_strength,
                 pad_cond_uncond=args.pad_cond_uncond, prompt_syntax=args.prompt_syntax, tiling=args.tiling,
                 init_image=init_image, mask=mask, mask_blur=args.mask_blur,
                 inpaint_full_res=None if args.inpaint_area is None else args.inpaint_area == "masked",
                 inpaint_full_res_padding=args.inpaint_padding, inpainting_mask_invert=args.invert_mask,
                 inpainting_fill=None if args.masked_content is None else MASKED_CONTENT.index(args.masked_content),
                 inpainting_mask_weight=args.mask_weight, resize_mode=args.resize_mode,
                 **hires_fields(args))
    fields.update({k: v for k, v in given.items() if v is not None})
    controls = control_units(args, open_image, fields.get("controls", ()))
    if controls is not None:
        fields["controls"] = controls
    if fields.get("seed") == -1:
        fields["seed"] = None
    if args.sampler is not None and args.karras is None:
        fields.pop("karras", None)  # a sampler named on the command line gets its own default schedule
    if args.scheduler is not None:
        if args.karras is not None:
            raise UsageError("--scheduler and --karras both set the schedule: choose one")
        fields["karras"] = args.scheduler  # an A1111 schedule type: the settings read it
    if init_image is not None and args.width is None and args.height is None:
        fields.pop("width", None), fields.pop("height", None)  # the init image's size
    return usage_errors(lambda: GenerationSettings(**fields, use_graphs=args.cuda_graphs).check())


def check_unsupported(text: str, ignore: bool) -> None:
    """An infotext whose keys ask for what is not implemented (``Face restoration``, ...): bad usage (exit 2), or,
    with ``--ignore-unsupported``, one warning line naming them."""
    keys = unsupported_keys(generation_settings(text))
    if not keys:
        return
    if not ignore:
        raise UsageError(f"the infotext asks for what tritonsd does not implement, so the image would differ: "
                         f"{', '.join(keys)} (give --ignore-unsupported to generate without them)")
    print(f"tritonsd generate: warning: ignored (not implemented): {', '.join(keys)}", file=sys.stderr)


def infotext_of(args: argparse.Namespace) -> str | None:
    """The AUTOMATIC1111 ``parameters`` text of ``--infotext`` or of ``--from-png``'s file."""
    if args.infotext is not None and args.from_png is not None:
        raise UsageError("--from-png and --infotext both give the settings: choose one")
    if args.infotext is not None:
        return args.infotext
    if args.from_png is None:
        return None
    image = open_image(args.from_png, "--from-png image")
    text = image.info.get("parameters")
    if not isinstance(text, str) or not text.strip():
        raise GenerateError(f"{args.from_png} holds no AUTOMATIC1111 'parameters' text")
    return text


def usage_errors(step):
    """Run ``step()``; a ``SettingsError`` becomes a ``UsageError`` naming the flag (exit code 2)."""

    try:
        return step()
    except SettingsError as e:
        raise UsageError(f"{FLAGS.get(e.field, e.field)} {e.detail}") from None


def lora_specs(values: list[str]) -> list:
    """``--lora FILE:W`` values as LoraSpecs, each file checked before the model loads."""

    specs = [parse_lora_arg(v) for v in values]
    for spec in specs:
        if not spec.path.is_file():
            raise GenerateError(f"LoRA file not found: {spec.path}")
    return specs


def load_spec_of(args: argparse.Namespace):
    """The ``LoadSpec`` of the model flags, which ``generate``, ``batch`` and ``serve`` share (``--checkpoint``,
    ``--config``, ``--device``, ``--dtype``, ``--kernels``, ``--text-heads``, ``--parameterization``,
    ``--lora-dir``, ``--embeddings-dir``; ``--vae`` and ``--upscaler-dir`` where the subcommand has them)."""

    return LoadSpec(args.checkpoint, args.config, device=args.device, dtype=args.dtype, kernels=args.kernels,
                    vae=getattr(args, "vae", None), text_heads=args.text_heads,
                    parameterization=args.parameterization, lora_dir=args.lora_dir,
                    embeddings_dir=args.embeddings_dir, upscaler_dir=getattr(args, "upscaler_dir", None),
                    models_dir=getattr(args, "models_dir", None),
                    controlnet_dir=getattr(args, "controlnet_dir", None))


def check_cpu_dtype(device: str, dtype: str | None) -> None:
    """The command line computes in fp32 on the CPU: ``--dtype fp16`` / ``bf16`` there is bad usage."""
    if device == "cpu" and dtype not in (None, "fp32"):
        raise UsageError(f"--dtype {dtype} needs --device cuda; on the CPU tritonsd computes in fp32")


def check_memory(settings, checked) -> None:
    """Sizes given on the command line that cannot fit the device's free memory: one line before loading (the
    family's default size is checked by the Pipeline once the model is known)."""

    if settings.width is None or settings.height is None:
        return
    short = memory_shortfall(settings.batch_size, settings.width, settings.height, checked.device, checked.dtype)
    if short is not None:
        raise UsageError(f"--width / --height / --batch: {short}")


def check_kernels(kernels: str, device) -> None:
    if kernels == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
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


def open_image(path: Path, what: str):
    """``formats/image_file.open_image``, its refusal as this command's error (exit code 1)."""
    try:
        return image_file.open_image(path, what)
    except image_file.ImageFileError as e:
        raise GenerateError(str(e)) from None


# ------------------------------------------------------------------------------------------------ run


def run(args: argparse.Namespace) -> int:
    check_usage(args)
    checked = load_spec_of(args).check()  # files, device and dtype: before anything is read
    init = open_image(args.init_image, "init image") if args.init_image is not None else None
    mask = open_image(args.mask, "mask") if args.mask is not None else None
    settings = settings_from_args(args, init, mask)
    loras = lora_specs(args.lora)
    check_cpu_dtype(checked.device.type, checked.dtype_name)
    usage_errors(lambda: check_rng_device(settings.rng, checked.device))
    check_memory(settings, checked)
    check_kernels(args.kernels, checked.device)
    check_output_dir(args.out)

    pipe = load(args, checked)
    if loras:
        pipe.set_loras(loras)
    if settings.prompt_syntax == "original":
        warn_truncated(pipe.model, settings.prompt, "prompt")
        warn_truncated(pipe.model, settings.negative_prompt, "negative prompt")
    settings = usage_errors(lambda: pipe.settings(settings))
    images = sample(pipe, settings, args.quiet, checked.dtype_name)
    print(f"seed {settings.seed}", file=sys.stderr, flush=True)  # also in each file's name and infotext
    for path in pipe.save(pipe.to_pil(images, settings), args.out):
        print(path, flush=True)
    return 0


def load(args: argparse.Namespace, checked):
    """The Pipeline of the checked ``LoadSpec`` (its model hash computed alongside the load)."""

    with bar(1, f"loading {args.checkpoint.name}", progress_enabled(args.quiet), unit="model") as progress:
        pipe = load_spec(checked)
    for line in pipe.embedding_messages:
        print(f"tritonsd generate: warning: {line}", file=sys.stderr)
        progress.update()
    cfg = pipe.config
    if cfg.family == "sd2" and cfg.parameterization_source == "assumed":
        print(f"tritonsd generate: warning: {args.checkpoint.name} is SD2; assuming {cfg.parameterization}-"
              "prediction (768 models are v: give --config or --parameterization)", file=sys.stderr)
    return pipe


def _tokenizers(model):
    """(tokenizer, context length) of each text tower the prompt goes through."""
    text = model.text_module
    embedders = getattr(text, "text_embedders", [text])
    return [(e.tokenizer, e.config.positions) for e in embedders]


def warn_truncated(model, prompt: str, what: str) -> None:
    """With ``--prompt-syntax original`` prompts longer than 75 tokens lose their tail (as in the original
    scripts): say which words."""
    if not prompt:
        return
    tokenizer, positions = _tokenizers(model)[0]
    dropped = tokenizer.truncated_words(prompt, positions)
    if dropped:
        print(f"tritonsd generate: warning: the {what} is longer than {positions - 2} tokens; dropped: "
              f"\"{dropped}\"", file=sys.stderr)


def sample(pipe, settings, quiet: bool, dtype: str):
    """Images [B, 3, H, W] in [0, 1] with a progress bar; a non-finite result is refused."""

    with bar(settings.steps, "sampling", progress_enabled(quiet), unit="step") as progress:
        def on_step(step: dict) -> None:
            progress.total = step["total"]  # img2img runs only the last strength * steps of the schedule
            progress.n = step["i"] + 1
            progress.refresh()

        try:
            return pipe.generate(settings, callback=on_step)
        except NonFiniteError as e:
            hint = "try --dtype fp32" if dtype != "fp32" else "the weights may be damaged"
            raise NonFiniteError(f"{e} (seed {settings.seed}); nothing was written ({hint})") from None
