"""tritonsd: a Stable Diffusion runtime whose hot paths are Triton kernels.

    import tritonsd
    pipe = tritonsd.load("v1-5-pruned-emaonly.safetensors")
    pipe("a red fox in snow", seed=42)[0].save("fox.png")

``tritonsd.load`` returns a ``tritonsd.Pipeline`` (``sampler/pipeline.py``). Subpackages: ``tritonsd.kernels``
(Triton kernels beside their torch references, and the dispatch that picks one), ``tritonsd.model``
(checkpoint reading, config detection, text encoders, UNet, VAE), ``tritonsd.sampler`` (schedules, samplers,
guidance, the Pipeline) and ``tritonsd.tools`` (the command line).
"""

__version__ = "0.1.0"

# (``tritonsd.pipeline.load_spec`` is not listed: ``tritonsd.load_spec`` is the module that defines LoadSpec)
_API = {"load": "tritonsd.pipeline", "LoadSpec": "tritonsd.load_spec", "Pipeline": "tritonsd.pipeline",
        "GenerationSettings": "tritonsd.sampler.settings", "SettingsError": "tritonsd.sampler.settings",
        "batch": "tritonsd.batch"}


def __getattr__(name: str):
    # Imported on first use: importing the package must not import the kernels (Triton reads TRITON_INTERPRET
    # when they are imported, and the command line sets it only for some subcommands).
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'tritonsd' has no attribute {name!r}")


__all__ = [*_API, "__version__"]


def __dir__() -> list[str]:
    """The public API (``__all__``), which ``__getattr__`` imports on first use."""
    return sorted(__all__)
