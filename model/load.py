"""``load_model``: a checkpoint file (or the built-in demo model) to a loaded ``StableDiffusion``: read the file,
normalise its keys once, detect its config, build on the meta device and load strictly."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import torch

from tritonsd.devices import resolve_device
from tritonsd.formats.checkpoint import read_checkpoint, require_float_weights
from tritonsd.formats.keys import MODULE_PREFIXES, normalize_keys
from tritonsd.formats.source import LoadedFrom
from tritonsd.formats.vae_file import load_vae_weights
from tritonsd.kernels import dispatch
from tritonsd.model.config import ModelConfig, ModelConfigError, detect_config, find_config
from tritonsd.model.demo import build_demo_model, is_demo
from tritonsd.model.sd import StableDiffusion, build_model, load_weights_, replace_vae
from tritonsd.model.text_config import TextConfigError


def load_model(path: str | Path, config: str | Path | ModelConfig | bool | None = None, *,
               parameterization: str | None = None, text_heads: int | None = None, vae: str | Path | None = None,
               dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               kernel_layout: bool | None = None) -> StableDiffusion:
    """Read a checkpoint, detect its config, build the modules on the meta device and load the weights strictly,
    cast to ``dtype`` on ``device`` (``DeviceError`` at once when the device is not available).

    ``path``: a ``.safetensors`` / ``.ckpt`` file, or ``"demo:sd1"`` (the built-in random-weight model).
    ``config``: the original YAML's path; None (default) uses the YAML beside the checkpoint when there is one
    (``find_config``); False uses none; a ``ModelConfig`` is taken as it is. ``vae``: an external VAE file
    replacing the checkpoint's (``model/vae_file.py``). ``model.source`` records the files used.
    ``kernel_layout``: conv weights in the Triton conv kernel's layout (``load_weights_``); None (default) lays
    them out where that kernel may run: on CUDA, or anywhere while Triton is forced (``dispatch.force``).
    """
    device = resolve_device(device)
    if is_demo(path):
        if config not in (None, False):
            raise ModelConfigError(f"{path} is built from its own config; a YAML or ModelConfig does not apply")
        return build_demo_model(str(path), dtype=dtype, device=device, vae=vae)
    path = Path(path)
    yaml_path = _yaml_for(path, config)
    vae_weights = load_vae_weights(vae) if vae is not None else None  # small: fail before the big read
    norm = normalize_keys(read_checkpoint(path))
    require_float_weights(norm.weights, MODULE_PREFIXES, path.name)  # an int tensor would be cast silently
    try:
        cfg = config if isinstance(config, ModelConfig) else \
            detect_config(norm, yaml_path, parameterization=parameterization, text_heads=text_heads)
        with torch.device("meta"), no_parameter_init():
            model = build_model(cfg)
    except (ModelConfigError, TextConfigError) as e:
        raise type(e)(f"{path.name}: {e}") from None
    weights = norm.weights
    if vae_weights is not None:
        weights = replace_vae(model, weights, vae, vae_weights)
    if kernel_layout is None:
        kernel_layout = device.type == "cuda" or dispatch.current_backend() == "triton"
    load_weights_(model, path, weights, dtype, device, kernel_layout)
    model.source = LoadedFrom(checkpoint=path, config=yaml_path, vae=Path(vae) if vae is not None else None)
    return model


# the classes that define reset_parameters among those the networks use (Conv2d inherits _ConvNd's)
_INIT_CLASSES = (torch.nn.Linear, torch.nn.modules.conv._ConvNd, torch.nn.Embedding, torch.nn.LayerNorm,
                 torch.nn.GroupNorm)
_init_lock = threading.Lock()


@contextlib.contextmanager
def no_parameter_init():
    """Build modules without initialising their parameters: every weight is overwritten by the checkpoint's.
    On the meta device the values are thrown away anyway, but ``reset_parameters`` still runs, and the text
    tower's embedding init alone pulled in torch's decomposition machinery for seconds (issue 28). Only for
    modules that ``load_weights_`` fills strictly: a parameter left unloaded is an error there, never random."""
    with _init_lock:
        saved = {cls: cls.__dict__["reset_parameters"] for cls in _INIT_CLASSES}
        for cls in _INIT_CLASSES:
            cls.reset_parameters = lambda self: None
        try:
            yield
        finally:
            for cls, fn in saved.items():
                cls.reset_parameters = fn


def _yaml_for(path: Path, config) -> Path | None:
    if config is None:
        return find_config(path)
    if config is False or isinstance(config, ModelConfig):
        return None
    return Path(config)
