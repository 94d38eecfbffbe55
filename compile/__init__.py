"""Compiling and tuning the kernels a model needs, before it runs: the representative shapes of the released models
(``shapes``), the launches a model's shapes need, recorded on the meta device (``variants``), compiled for a target
without a GPU (``aot``), in parallel into Triton's cache (``precompile``), each autotune key timed once into the
persistent tuning cache (``tuning``: the tuner, plugged into the launch path by ``kernels._triton.tuning``), both
for a model's shapes (``warmup``), and the compile check of every variant for an architecture
(``check_compile``). Sits above ``model/``, whose modules it walks; the kernels never import it."""
