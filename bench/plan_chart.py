"""The plan's roofline as a picture (``tritonsd bench plan --chart FILE.png``): every launch of one step at its
arithmetic intensity (FLOPs per HBM byte) and the FLOP rate the roofline predicts for it, under the GPU's two
roofs. matplotlib is the optional extra ``plot``; imported here, and this module only when a chart is asked for.
"""

from __future__ import annotations

from pathlib import Path

from tritonsd.outputs import atomic_write

COLORS = {"triton": "tab:blue", "cuBLAS": "tab:orange", "cuDNN": "tab:green", "torch": "tab:red"}


class ChartUnavailable(RuntimeError):
    """matplotlib is not installed."""


def write_chart(data: dict, path: Path) -> None:
    try:
        import matplotlib  # lazy: optional extra "plot"
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # lazy: optional extra "plot"
    except ImportError:
        raise ChartUnavailable("the roofline chart needs matplotlib (pip install 'tritonsd[plot]')") from None
    gpu = data["gpu"]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    ridge = gpu["tensor_flops"] / gpu["hbm_bytes_s"]
    xs = [1e-2, ridge, 1e4]
    ax.plot(xs, [min(x * gpu["hbm_bytes_s"], gpu["tensor_flops"]) for x in xs], color="black", lw=1,
            label="roof: tensor cores / HBM")
    ax.axhline(gpu["vector_flops"], color="gray", lw=0.8, ls="--", label="vector float32 peak")
    for impl, color in COLORS.items():
        rows = [r for r in data["launches"] if r["impl"] == impl and r["hbm_bytes"] and r["predicted_s"]]
        if rows:
            ax.scatter([max(r["flops"] / r["hbm_bytes"], 1e-2) for r in rows],
                       [max(r["flops"] / r["predicted_s"], 1e9) for r in rows],
                       s=[4 + 4e5 * r["predicted_s"] for r in rows], color=color, alpha=0.5,
                       label=f"{impl} ({len(rows)})")
    step = data["per_step"]
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP per HBM byte)")
    ax.set_ylabel("predicted FLOP/s (no-FLOP launches at the bottom)")
    ax.set_title(f"PREDICTION, {data['model']} {data['size'][0]}x{data['size'][1]} {data['dtype']}, one step on "
                 f"{gpu['key']}: {step['launches']} launches, {step['hbm_bytes'] / 1e9:.2f} GB, floor "
                 f"{step['floor_s'] * 1e3:.2f} ms", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(True, which="both", lw=0.3)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
