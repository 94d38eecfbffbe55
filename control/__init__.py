"""ControlNet: preprocessors (``preprocess``), and units applied to the UNet per step (``apply``); the unit type
itself is ``tritonsd.sampler.control.ControlUnit``."""
