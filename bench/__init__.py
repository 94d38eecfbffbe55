"""Benchmarks the ``tritonsd bench`` command runs: the kernel benchmarks (``bench_<op>``, at the shapes of
``tritonsd.compile.shapes``), the end-to-end benchmark (``e2e``), full-size random-weight models
(``random_weights``) and the environment record every results JSON carries (``environment``). The GPU-window
scripts and the results live in ``benchmarks/`` at the checkout's top, which is not installed."""
