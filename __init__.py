"""tritonsd: a Stable Diffusion runtime whose hot paths are Triton kernels.

Subpackages: ``tritonsd.kernels`` (Triton kernels beside their torch references, and the dispatch that
picks one), ``tritonsd.model`` (checkpoint reading, config detection, text encoders, UNet, VAE),
``tritonsd.sampler`` (schedules, samplers, guidance, pipelines) and ``tritonsd.tools`` (command line).
"""

__version__ = "0.1.0"
