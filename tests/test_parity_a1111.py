"""``tritonsd parity`` on the AUTOMATIC1111 reference files (README-prompts-lora.md), run as a user runs it: every
public file passes through the CLI, a copy with one tensor corrupted by ten times its bound fails with exit 1
and names it, rearranged files (renamed / sliced cases, other shapes) pass too, and bad usage exits 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import save_file

from test_parity_cli import parity, rows_of

pytestmark = pytest.mark.slow  # every test runs `tritonsd parity` on a whole reference file in a subprocess

NV_BOUND, LORA_BOUND, FP32_BOUND = 1e-6, 1e-5, 1e-4  # issue 13 (NV noise), issue 14 (merged weights), the rest

# reference -> (checkpoint or None, extra arguments, bound of its float tensors)
FILES = {
    "prompts-sd1-tiny": ("sd1-tiny", [], FP32_BOUND),
    "prompts-sd2v-tiny": ("sd2v-tiny", [], FP32_BOUND),
    "prompts-sdxl-tiny": ("sdxl-tiny", [], FP32_BOUND),
    # the TI JSONs do not state the text towers' head count (the prompts JSONs do)
    "ti-sd1-tiny": ("sd1-tiny", ["--text-heads", "2"], FP32_BOUND),
    "ti-sdxl-tiny": ("sdxl-tiny", ["--text-heads", "2"], FP32_BOUND),
    "rng-philox": (None, [], NV_BOUND),
    "unet-odd-sizes-sd1": ("sd1-tiny", [], FP32_BOUND),
    "unet-odd-sizes-sdxl": ("sdxl-tiny", [], FP32_BOUND),
    "lora-sd1-tiny": ("sd1-tiny", [], LORA_BOUND),
    "lora-sdxl-tiny": ("sdxl-tiny", [], LORA_BOUND),
}
UNET_INPUTS = ("x", "t", "context", "y")  # the README: NAME.{x,t,context[,y]} are the inputs, NAME.out the output


def args_for(fixtures: Path, name: str, reference: Path) -> list:
    checkpoint, extra, _ = FILES[name]
    return ([fixtures / f"{checkpoint}.safetensors"] if checkpoint else []) + ["--reference", reference, *extra]


def expected_inputs(name: str, ref: dict) -> set[str]:
    if not name.startswith("unet-odd-sizes"):
        return set()
    return {k for k in ref if k.rsplit(".", 1)[-1] in UNET_INPUTS}


def copy_beside(fixtures: Path, name: str, dest: Path, tensors: dict | None = None, meta: dict | None = None) -> Path:
    """NAME.reference.* into ``dest`` (optionally other tensors / JSON), with what the reference finds beside
    itself: the embeddings/ folder, the LoRA files its JSON names."""
    ref = dest / f"{name}.reference.safetensors"
    if tensors is None:
        shutil.copy(fixtures / ref.name, ref)
    else:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(ref))
    original = json.loads((fixtures / f"{name}.reference.json").read_text())
    ref.with_suffix(".json").write_text(json.dumps(original if meta is None else meta))
    if name.startswith("ti-"):
        shutil.copytree(fixtures / "embeddings", dest / "embeddings")
    for entry in original.get("lora_files", []):
        shutil.copy(fixtures / entry["file"], dest / entry["file"])
    return ref


@pytest.mark.parametrize("name", list(FILES))
def test_every_tensor_of_the_a1111_reference_passes(fixtures, reference, tmp_path, name):
    ref, meta = reference(name)
    path = fixtures / f"{name}.reference.safetensors"
    proc = parity(*args_for(fixtures, name, path), "--json", tmp_path / "rows.json")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    rows = rows_of(tmp_path / "rows.json")
    assert set(rows) == set(ref), "one row per key of the reference file, no more, no less"
    assert {n for n, r in rows.items() if r["kind"] == "input"} == expected_inputs(name, ref)
    bound = FILES[name][2]
    for n, r in rows.items():
        if r["kind"] == "input":
            continue
        assert r["kind"] == "compared" and r["bound"] == bound and r["pass"], (n, r)
        assert r["error"] <= bound and r["shape"] == list(ref[n].shape), (n, r)
    if "cases" in meta:  # groups are the JSON's cases
        assert {r["group"] for r in rows.values()} == {c["name"] for c in meta["cases"]}
    assert "FAIL" not in proc.stdout and "Traceback" not in proc.stderr


def _output_to_corrupt(name: str, ref: dict, meta: dict) -> str:
    """The last recomputed tensor the JSON lists (not an input), nonzero so a relative error is defined."""
    outputs = [k for k in meta["tensors"] if k in ref and k not in expected_inputs(name, ref)
               and ref[k].abs().max() > 0]
    return outputs[-1]


@pytest.mark.parametrize("name", list(FILES))
def test_a_corrupted_tensor_fails_with_exit_1(fixtures, reference, tmp_path, name):
    """One value moved by ten times the file's bound (relative to the tensor's absmax): that row, and only it,
    fails; the others of its group still pass."""
    ref, meta = reference(name)
    target = _output_to_corrupt(name, ref, meta)
    bound = FILES[name][2]
    t = ref[target].clone()
    t.view(-1)[t.numel() // 2] += 10 * bound * t.abs().max()
    path = copy_beside(fixtures, name, tmp_path, {**ref, target: t})
    proc = parity(*args_for(fixtures, name, path), "--json", tmp_path / "all.json")
    rows = rows_of(tmp_path / "all.json")
    group = rows[target]["group"]
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert [n for n, r in rows.items() if not r["pass"]] == [target]
    assert rows[target]["error"] == pytest.approx(10 * bound, rel=0.05)
    assert all(r["pass"] for n, r in rows.items() if r["group"] == group and n != target)
    assert f"FAILED: {target}" in proc.stdout and "Traceback" not in proc.stderr


# ---------------------------------------------------------------- rearranged references (not the public layout)


def test_rearranged_noise_reference(fixtures, reference, tmp_path):
    """Shapes and seeds the public file lacks, from its own numbers: Philox's i-th number depends only on
    (seed, call, i), so the first numbers of a stored draw are a smaller draw; ImageRNG's images are independent,
    so one image's row is ImageRNG with that one seed. No per-tensor 'case'; names of our choosing."""
    ref, meta = reference("rng-philox")
    tensors = {
        "philox.seed42.3x5x7": ref["philox.seed42.1x4x128x96"].reshape(-1)[:105].reshape(3, 5, 7),
        "philox.seed1.2x3.draw2": ref["philox.seed1.4x4x16x16.draw2"].reshape(-1)[:6].reshape(2, 3),
        "ImageRNG.one.first": ref["ImageRNG.seeds0+1.first"][1:2],
        "ImageRNG.one.next": ref["ImageRNG.seeds0+1.next"][1:2],
    }
    new_meta = {k: v for k, v in meta.items() if k != "tensors"}
    new_meta["tensors"] = {"philox.seed42.3x5x7": {"seed": 42}, "philox.seed1.2x3.draw2": {"seed": 1},
                           "ImageRNG.one.first": {"seeds": [1]}, "ImageRNG.one.next": {"seeds": [1]}}
    path = tmp_path / "noise.reference.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    path.with_suffix(".json").write_text(json.dumps(new_meta))
    proc = parity("--reference", path, "--json", tmp_path / "rows.json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = rows_of(tmp_path / "rows.json")
    assert set(rows) == set(tensors) and all(r["pass"] and r["bound"] == NV_BOUND for r in rows.values())


def test_rearranged_unet_and_prompt_cases(fixtures, reference, tmp_path):
    """A UNet case renamed (a dot in its name) and cut to batch 1 (every sample is computed on its own), and an
    SDXL prompt case renamed with its tensors found by prefix (no per-tensor 'case' in the JSON)."""
    ref, meta = reference("unet-odd-sizes-sd1")
    case = meta["cases"][-1]
    old, new = case["name"], "my.odd.case"
    tensors = {f"{new}.{s}": ref[f"{old}.{s}"][1:2] for s in ("x", "t", "context", "out")}
    new_meta = {**meta, "cases": [{**case, "name": new}], "tensors": {}}
    path = tmp_path / "unet.reference.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    path.with_suffix(".json").write_text(json.dumps(new_meta))
    proc = parity(fixtures / "sd1-tiny.safetensors", "--reference", path, "--json", tmp_path / "unet.json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = rows_of(tmp_path / "unet.json")
    assert {n for n, r in rows.items() if r["kind"] == "input"} == {f"{new}.x", f"{new}.t", f"{new}.context"}
    assert rows[f"{new}.out"]["pass"] and rows[f"{new}.out"]["group"] == new

    ref, meta = reference("prompts-sdxl-tiny")
    case = next(c for c in meta["cases"] if c["name"] == "emphasis")
    tensors = {f"weighted.{k}": ref[f"emphasis.{k}"] for k in ("crossattn", "vector")}
    new_meta = {k: v for k, v in meta.items() if k not in ("cases", "tensors")}
    new_meta["cases"] = [{**case, "name": "weighted"}]
    path = tmp_path / "prompts.reference.safetensors"
    save_file(tensors, str(path))
    path.with_suffix(".json").write_text(json.dumps(new_meta))
    proc = parity(fixtures / "sdxl-tiny.safetensors", "--reference", path, "--json", tmp_path / "p.json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert {r["group"] for r in rows_of(tmp_path / "p.json").values()} == {"weighted"}


# ---------------------------------------------------------------- files beside the reference, bad usage


def test_embeddings_folder_beside_the_reference_or_given(fixtures, reference, tmp_path):
    """Without embeddings/ beside it the TI groups fail and say why; --embeddings-dir points at them. A TI hashes
    value other than the reference run's is noted (it is not a tensor, so it gets no row)."""
    _, meta = reference("ti-sd1-tiny")
    meta = json.loads(json.dumps(meta))
    alone = next(c for c in meta["cases"] if c["name"] == "alone")
    alone["infotext_TI_hashes"] = "tiny-style: 000000000000"
    shutil.copy(fixtures / "ti-sd1-tiny.reference.safetensors", tmp_path)
    path = tmp_path / "ti-sd1-tiny.reference.safetensors"
    path.with_suffix(".json").write_text(json.dumps(meta))
    args = [fixtures / "sd1-tiny.safetensors", "--reference", path, "--text-heads", "2", "--only", "alone"]
    proc = parity(*args, "--json", tmp_path / "rows.json")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "no embeddings folder" in rows_of(tmp_path / "rows.json")["alone.cond"]["note"]
    proc = parity(*args, "--embeddings-dir", fixtures / "embeddings")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "alone: TI hashes 'tiny-style: 3c274136175d', the reference run wrote 'tiny-style: 000000000000'" \
        in proc.stderr


def test_missing_lora_file_fails_and_is_named(fixtures, tmp_path):
    shutil.copy(fixtures / "lora-sd1-tiny.reference.safetensors", tmp_path)
    shutil.copy(fixtures / "lora-sd1-tiny.reference.json", tmp_path)
    proc = parity(fixtures / "sd1-tiny.safetensors", "--reference", tmp_path / "lora-sd1-tiny.reference.safetensors",
                  "--json", tmp_path / "rows.json")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = rows_of(tmp_path / "rows.json")
    assert not any(r["pass"] for r in rows.values())
    assert all("lora-sd1-tiny.safetensors is not beside the reference" in r["note"] for r in rows.values())


@pytest.mark.parametrize("checkpoint,name", [("sd1-tiny", "prompts-sdxl-tiny"), ("sdxl-tiny", "prompts-sd1-tiny"),
                                             ("sd1-tiny", "lora-sdxl-tiny"), ("sd1-tiny", "unet-odd-sizes-sdxl")])
def test_reference_of_another_model_exits_2(fixtures, checkpoint, name):
    proc = parity(fixtures / f"{checkpoint}.safetensors", "--reference", fixtures / f"{name}.reference.safetensors",
                  "--text-heads", "2")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("tritonsd parity: error: ") and "does not fit" in lines[-1]
    assert "Traceback" not in proc.stderr


def test_checkpoint_is_needed_only_by_model_references(fixtures):
    proc = parity("--reference", fixtures / "prompts-sd1-tiny.reference.safetensors")
    assert proc.returncode == 2 and "give the CHECKPOINT" in proc.stderr, proc.stdout + proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = parity(fixtures / "sd1-tiny.safetensors", "--reference", fixtures / "rng-philox.reference.safetensors",
                  "--only", "rng")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "uses no model" in proc.stderr and "no model vs rng-philox" in proc.stdout
