"""The ops, one module each (``attention``, ``conv``, ``group_norm``, ``layer_norm``, ``geglu``): the Triton kernel,
its configs as data, the launcher and the torch reference it must equal. ``dispatch`` picks Triton on CUDA and the
reference elsewhere; ``_triton`` is what every launcher shares (interpreter detection, the launch wrapper and its
recorder, the lookup of tuned configs). Nothing here imports the rest of tritonsd."""
