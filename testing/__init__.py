"""Test support, shipped with the package because ``tritonsd parity`` uses it too: where the reference
fixtures are and how to read and compare them (``reference``), and how each group of a reference file is
recomputed through the Pipeline's stages (``groups``). The runtime (kernels, model, sampler) never imports it."""
