"""Benchmarks (``tritonsd.bench``): the kernel benchmarks (``bench_<op>``), the end-to-end benchmark (``e2e``),
full-size random-weight models (``random_weights``) and the shared environment record (``environment``); the
shapes come from ``tritonsd.compile.shapes``. The prepared GPU run's scripts live in ``benchmarks/`` (not
installed). The runtime package imports nothing from here."""
