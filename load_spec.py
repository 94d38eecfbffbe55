"""``LoadSpec``: everything a model load needs, in one value that every door builds the same way.

``tritonsd.load(path, ...)`` builds one from its keywords; ``tritonsd generate`` and the other subcommands from
their flags; ``tritonsd batch`` hands one to its workers (as a dict, to Ray actors); ``tritonsd serve`` keeps one
for every checkpoint it switches to. ``tritonsd.pipeline.load_spec(spec)`` turns it into a Pipeline.

``check()`` runs the prechecks, once, before anything is read: the files exist and are regular files (the
checkpoint readable too), the embeddings folder exists, the kernels name is known, the device is available and
the dtype name valid. Each failure is one line, a ``ValueError`` subclass: ``LoadSpecError`` for the files and
the kernels, ``devices.DeviceError`` and ``devices.DTypeError`` for the device and the dtype. It returns a
``CheckedSpec`` (the spec with its device and dtype resolved), which loads without checking again.

Importing this module imports no model code and no kernels (the command line and the batch driver build specs;
the kernels read ``TRITON_INTERPRET`` when imported): ``check`` imports what it asks.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from tritonsd.devices import default_dtype, dtype_name, resolve_device, resolve_dtype
from tritonsd.escape import escape
from tritonsd.model.demo import is_demo
from tritonsd.kernels.dispatch import BACKENDS

PATH_FIELDS = ("path", "config", "vae", "lora_dir", "embeddings_dir", "upscaler_dir", "models_dir",
               "controlnet_dir")


class LoadSpecError(ValueError):
    """A load that cannot start: a file or folder missing, or an unknown kernels name (one line)."""


@dataclass(frozen=True)
class LoadSpec:
    """How to load a Pipeline.

    ``path``: an original single-file checkpoint (``.safetensors`` or ``.ckpt``), or the built-in demo model
    ``"demo:sd1"`` (tiny, random weights: its images are noise; no file needed). ``config``: the original
    inference YAML (default: the checkpoint's stem + ``.yaml`` beside it, when there). ``device``: "cpu", "cuda",
    "cuda:N" (default: CUDA when available). ``dtype``: "fp32", "fp16", "bf16" (or an alias, or a torch dtype;
    default: fp16 on CUDA, fp32 on the CPU). ``kernels``: "auto", "torch" or "triton". ``vae``: an external VAE
    file (``.safetensors`` / ``.pt``). ``text_heads`` / ``parameterization``: what the weights cannot tell, when
    no YAML does. ``lora_dir``: where ``<lora:name:w>`` in a prompt is looked up (not checked here: a prompt
    without LoRAs never needs it). ``embeddings_dir``: textual-inversion embeddings, used where their file name
    appears in a prompt. ``upscaler_dir``: upscaler model files (ESRGAN, ...) for hires fix, by file name (not
    checked here either: only a generation naming one needs it). ``models_dir``: where hires fix's
    ``hr_checkpoint_name`` is looked up by name (default: the checkpoint's folder; not checked here).
    ``controlnet_dir``: ControlNet files, where a unit's ``model`` given by name (``name [hash]``, as the
    extension lists it) is found (not checked here).

    Paths are kept as strings (``os.fspath``), so the same spec compares equal whichever door built it.
    """

    path: str
    config: str | None = None
    device: str | torch.device | None = None
    dtype: str | torch.dtype | None = None
    kernels: str = "auto"
    vae: str | None = None
    text_heads: int | None = None
    parameterization: str | None = None
    lora_dir: str | None = None
    embeddings_dir: str | None = None
    upscaler_dir: str | None = None
    models_dir: str | None = None
    controlnet_dir: str | None = None

    def __post_init__(self):
        for name in PATH_FIELDS:
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, os.fspath(value))

    @property
    def is_demo(self) -> bool:
        """Whether ``path`` names a built-in model (``demo:sd1``) rather than a file."""

        return is_demo(self.path)

    def absolute(self) -> LoadSpec:
        """This spec with its paths made absolute here (``demo:`` names pass through): what a worker on another
        node or in another directory is given."""

        def absolute(p: str | None) -> str | None:
            return p if p is None or is_demo(p) else str(Path(p).resolve())

        return dataclasses.replace(self, **{name: absolute(getattr(self, name)) for name in PATH_FIELDS})

    def check(self) -> CheckedSpec:
        """The prechecks (see the module docstring), each failure one line; the spec with its device and dtype
        resolved."""
        self._check_kernels()
        self._check_files()
        device = resolve_device(self.device)
        dtype = resolve_dtype(self.dtype if self.dtype is not None else default_dtype(device))
        return CheckedSpec(self, device, dtype)

    def _check_kernels(self) -> None:
        if self.kernels not in BACKENDS:
            raise LoadSpecError(f"unknown kernels {escape(repr(self.kernels), 60)}; expected one of "
                                f"{', '.join(BACKENDS)}")

    def _check_files(self) -> None:
        if not self.is_demo:
            _regular_file(self.path, "checkpoint")
            if not os.access(self.path, os.R_OK):
                raise LoadSpecError(f"checkpoint is not readable: {escape(self.path)}")
        if self.config is not None:
            _regular_file(self.config, "config")
        if self.vae is not None:
            _regular_file(self.vae, "VAE file")
        if self.embeddings_dir is not None and not Path(self.embeddings_dir).is_dir():
            raise LoadSpecError(f"embeddings folder not found: {escape(self.embeddings_dir)}")


def _regular_file(path: str, what: str) -> None:
    """``path`` exists and is a regular file (not a folder, a FIFO or a device, whose read could block)."""
    p = Path(path)
    if not p.exists():
        raise LoadSpecError(f"{what} not found: {escape(path)}")
    if not p.is_file():
        raise LoadSpecError(f"{what} is not a regular file: {escape(path)}")


@dataclass(frozen=True)
class CheckedSpec:
    """A ``LoadSpec`` whose prechecks passed, with its device and dtype resolved (``LoadSpec.check``)."""

    spec: LoadSpec
    device: torch.device
    dtype: torch.dtype

    def check(self) -> CheckedSpec:
        """Already checked: itself (so ``spec.check()`` takes either kind)."""
        return self

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.dtype)


__all__ = ["CheckedSpec", "LoadSpec", "LoadSpecError"]
