"""Write ``sampler/data/linear_schedule_sigmas.json``: the training sigmas of the linear SD schedule as the
originals compute them on MKL's compatible path (why: ``tritonsd/sampler/pinned.py``).

    MKL_CBWR=COMPATIBLE python benchmarks/pin_schedule.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from tritonsd.sampler.pinned import DATA_FILE, LINEAR
from tritonsd.sampler.schedule import linear_alphas_cumprod

DATA = Path(__file__).resolve().parent.parent / "sampler" / "data" / DATA_FILE




def original_tables(alphas_cumprod64: torch.Tensor) -> dict[str, torch.Tensor]:
    """The originals' arithmetic, op for op, on this process's torch (and so its MKL path)."""
    acp32 = alphas_cumprod64.to(torch.float32)  # CompVis register_schedule: to_torch(np.cumprod(...))
    sigmas = ((1 - acp32) / acp32) ** 0.5  # k-diffusion DiscreteEpsDDPMDenoiser / DiscreteVDDPMDenoiser
    acp = alphas_cumprod64.numpy()
    sgm = torch.tensor((1 - acp) / acp, dtype=torch.float32) ** 0.5  # sgm LegacyDDPMDiscretization.get_sigmas
    return {"kdiff_sigmas": sigmas, "kdiff_log_sigmas": sigmas.log(), "sgm_sigmas": sgm}


def _to_hex(t: torch.Tensor) -> list[str]:
    if t.dtype == torch.float64:
        return [f"{w:016x}" for w in t.numpy().view(np.uint64).tolist()]
    return [f"{w:08x}" for w in t.numpy().view(np.uint32).tolist()]


def write(path: str) -> None:
    """Recompute the tables on MKL's compatible path and write them to ``path``."""
    if os.environ.get("MKL_CBWR", "").split(",")[0] != "COMPATIBLE" or not torch.backends.mkl.is_available():
        raise SystemExit("run with MKL_CBWR=COMPATIBLE set before python starts, on a torch built with MKL")
    acp64 = linear_alphas_cumprod(LINEAR["linear_start"], LINEAR["linear_end"], LINEAR["timesteps"])
    tables = original_tables(acp64)
    doc = {
        "about": "Training sigmas of the linear SD schedule as the originals compute them on MKL's compatible "
                 "path (see tritonsd/sampler/pinned.py); IEEE bit patterns, big-endian hex, t = 0 .. 999.",
        "made_with": {"command": "MKL_CBWR=COMPATIBLE python benchmarks/pin_schedule.py", "torch": torch.__version__,
                      "numpy": np.__version__},
        **LINEAR,
        "alphas_cumprod_float64": _to_hex(acp64),
        **{name: _to_hex(t) for name, t in tables.items()},
    }
    with open(path, "w", encoding="utf-8") as f:
        f.write(_dumps(doc))


def _dumps(doc: dict) -> str:
    """JSON with the long hex lists 8 words to a line (t = 8k .. 8k + 7), for a readable diff."""
    lines = ["{"]
    for i, (key, value) in enumerate(doc.items()):
        comma = "," if i < len(doc) - 1 else ""
        if isinstance(value, list):
            rows = [", ".join(json.dumps(w) for w in value[j:j + 8]) for j in range(0, len(value), 8)]
            lines.append(f"  {json.dumps(key)}: [\n    " + ",\n    ".join(rows) + f"\n  ]{comma}")
        else:
            lines.append(f"  {json.dumps(key)}: {json.dumps(value)}{comma}")
    return "\n".join(lines) + "\n}\n"


if __name__ == "__main__":
    write(str(DATA))
