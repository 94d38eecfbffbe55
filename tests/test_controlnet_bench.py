"""``benchmarks/controlnet_share.py`` on the CPU with the fixtures: it runs, times the loop with 0, 1 and 2 units
and writes its JSON (the GPU run measures the real share)."""

from __future__ import annotations

import json

from benchmarks import controlnet_share as B


def test_smoke_run_writes_rows(fixtures, tmp_path):
    out = tmp_path / "share.json"
    assert B.main(["--model", str(fixtures / "sd1-tiny.safetensors"), "--controlnet",
                   str(fixtures / "controlnet-sd1-tiny.safetensors"), "--text-heads", "2", "--size", "64",
                   "--steps", "2", "--repeat", "1", "--device", "cpu", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["units"] for r in result["rows"]] == [0, 1, 2] and result["residuals"] == 13
    assert all(r["step_ms"] > 0 for r in result["rows"]) and "controlnet_share" in result["rows"][1]


def test_random_controlnet_at_the_unets_widths(models):
    import torch

    unet = models("sd1-tiny").model.diffusion_model
    net = B.random_controlnet(unet)
    with torch.no_grad():
        out = net(torch.randn(1, 4, 8, 8), torch.tensor([10.0]), torch.randn(1, 77, 32), hint=torch.rand(1, 3, 64, 64))
    assert len(out) == 13 and all(torch.isfinite(o).all() for o in out)
    assert unet(torch.randn(1, 4, 8, 8), torch.tensor([10.0]), torch.randn(1, 77, 32), control=out).shape == (1, 4, 8, 8)


def test_check_compares_each_changed_unit_with_eager_and_fails_loudly(fixtures, tmp_path, monkeypatch, capsys):
    """``--check`` (GPU plan stage 9): on the CPU there is no runner, the loops are eager and equal; a replay off
    the eager run (faked here) is exit status 1 with one line saying why."""
    from benchmarks import gpu_plan as G

    assert any("controlnet_share.py" in c and "--check" in c for c in G.stage_by_number(9).commands)
    argv = ["--model", str(fixtures / "sd1-tiny.safetensors"), "--controlnet",
            str(fixtures / "controlnet-sd1-tiny.safetensors"), "--text-heads", "2", "--size", "64", "--steps", "2",
            "--repeat", "1", "--device", "cpu", "--check", "--json", str(tmp_path / "share.json")]
    assert B.main(argv) == 0
    check = json.loads((tmp_path / "share.json").read_text())["recapture_check"]
    assert check["ok"] and not check["graphs"] and len(check["runs"]) == 4
    assert [r["changed"] for r in check["runs"]][1:3] == [["guidance_start", "image", "weight"],
                                                         ["guidance_end", "image", "weight"]]
    assert all(r["bit_equal"] and r["relative_error"] == 0.0 for r in check["runs"])
    monkeypatch.setattr(B, "relative_error", lambda a, b: 0.5)
    assert B.main(argv) == 1
    assert "the check failed" in capsys.readouterr().err
