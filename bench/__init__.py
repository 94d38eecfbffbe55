"""Benchmarks (``tritonsd.bench``): the kernel benchmarks (``bench_<op>``), the end-to-end benchmark (``e2e``),
full-size random-weight models (``random_weights``), the shared environment record (``environment``) and the
prepared GPU run's planner (``gpu_plan``). The runtime package imports nothing from here."""
