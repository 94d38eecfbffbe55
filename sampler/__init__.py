"""What a run is made of, below the Pipeline: the settings and their checks (``settings``), the one table of samplers
(``registry``) and the pure sampler functions (``samplers``), schedules, the eps / v / sgm and CFG denoiser wrappers
(``denoise``), how they are put together for a model (``wiring``), noise sources, the captured loop (``graph``),
VAE encode / decode (``vae_io``), the memory estimate and the AUTOMATIC1111 infotext."""
