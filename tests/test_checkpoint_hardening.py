"""Issue 16, the readers: every malformed-file class gets one escaped line naming the file (our CheckpointError),
in bounded time and memory, with the file unchanged, both from ``read_checkpoint`` and through ``tritonsd
inspect``. The malformed files are built in tests/malformed.py."""

from __future__ import annotations

import hashlib
import os
import resource
import time
import warnings

import pytest
import torch

from measured import run_measured
from malformed import CASES, CONTROL_NAME, F32, safetensors_bytes, small_ckpt
from tritonsd.formats.checkpoint import CheckpointError, read_checkpoint, read_checkpoint_shapes, require_float_weights
from tritonsd.tools.cli import main

_BUILT: dict[str, bytes] = {}


def _write(case, tmp_path):
    if case.name not in _BUILT:
        _BUILT[case.name] = case.build()
    path = tmp_path / f"{case.name}{case.suffix}"
    path.write_bytes(_BUILT[case.name])
    return path


def _digest(path) -> tuple[str, int]:
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


def _assert_clean_line(msg: str) -> None:
    assert "\n" not in msg and "Traceback" not in msg
    assert all(ch == " " or ch.isprintable() for ch in msg), repr(msg)  # no raw control or bidi character


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_each_class_is_one_clear_line(case, tmp_path):
    path = _write(case, tmp_path)
    before = _digest(path)
    readers = (read_checkpoint, read_checkpoint_shapes)
    for reader in readers:
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(CheckpointError) as e:
                reader(path)
        assert time.perf_counter() - start < 5
        assert not caught, [str(w.message) for w in caught]
        msg = str(e.value)
        _assert_clean_line(msg)
        assert msg.startswith(f"{case.name}{case.suffix}: ")
        for word in case.expect:
            assert word in msg, (word, msg)
    assert _digest(path) == before


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_each_class_through_inspect(case, tmp_path, capfd):
    path = _write(case, tmp_path)
    before = _digest(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["inspect", str(path)]) == 1
    assert not caught, [str(w.message) for w in caught]
    out, err = capfd.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), err
    assert lines[0].startswith(f"tritonsd inspect: error: {case.name}{case.suffix}: ")
    _assert_clean_line(lines[0])
    assert _digest(path) == before


@pytest.mark.slow  # a `tritonsd inspect` subprocess per case
@pytest.mark.parametrize("name", ["ckpt_torchscript", "control_characters_in_name", "ckpt_deflate_bomb",
                                  "json_deep"])
def test_the_installed_command_prints_one_line(name, tmp_path):
    """The real entry point in a fresh process (torch's warnings go to stderr there, not to pytest's recorder):
    exit 1, one line, no traceback, bounded peak memory (the child's own: ``measured.run_measured``)."""
    case = next(c for c in CASES if c.name == name)
    path = _write(case, tmp_path)
    before = _digest(path)
    proc, peak = run_measured("inspect", path, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    _assert_clean_line(proc.stderr.strip())
    # the child's own peak RSS (a torch import plus the refused file): far below the bomb's 2 GB
    assert peak < 1_000_000_000
    assert _digest(path) == before


def test_control_characters_in_the_name_are_escaped(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(safetensors_bytes({CONTROL_NAME: {**F32, "dtype": "nope"}}, bytes(16)))
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(path)
    msg = str(e.value)
    assert "'evil\\x1b]0;pwned\\x07\\x1b[2J\\x0asecond line\\u202egpj.exe'" in msg
    _assert_clean_line(msg)


def test_control_characters_in_the_file_name_are_escaped(tmp_path):
    path = tmp_path / "bad\x1b[2J\nname.ckpt"
    path.write_bytes(b"\x80\x02junk")
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(path)
    assert str(e.value).startswith("bad\\x1b[2J\\x0aname.ckpt: ")
    _assert_clean_line(str(e.value))


def test_header_limit_is_safetensors_decimal_limit(tmp_path):
    """100,000,000 bytes is allowed (then checked against the file), 100 MiB is not, even in a file that big."""
    small = tmp_path / "limit.safetensors"
    small.write_bytes(safetensors_bytes({"w": F32}, bytes(16), header_len=100_000_000))
    with pytest.raises(CheckpointError, match="exceeds the file size"):
        read_checkpoint(small)
    big = tmp_path / "mib.safetensors"  # a sparse file: 100 MiB on paper, nothing on disk
    with open(big, "wb") as f:
        f.write((100 * 1024 * 1024).to_bytes(8, "little"))
        f.truncate(8 + 100 * 1024 * 1024 + 16)
    with pytest.raises(CheckpointError, match="over safetensors' limit of 100,000,000 bytes"):
        read_checkpoint_shapes(big)


def test_zero_sized_tensors_and_padding_still_load(tmp_path):
    """What the format allows stays allowed: an empty tensor, a header padded with spaces, null metadata."""
    header = (b'{"__metadata__": null, "e": {"dtype": "F16", "shape": [0, 3], "data_offsets": [0, 0]}, '
              b'"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}     ')
    path = tmp_path / "ok.safetensors"
    path.write_bytes(safetensors_bytes(header, bytes(8)))
    out = read_checkpoint(path)
    assert out["e"].shape == (0, 3) and out["e"].dtype == torch.float16
    assert torch.equal(out["w"], torch.zeros(2))
    assert read_checkpoint_shapes(path)["e"].shape == (0, 3)


def test_stride_zero_views_inside_their_storage_are_kept(tmp_path):
    """A view that stays inside its storage (a slice sharing a buffer) is fine; only an over-reaching one is not."""
    base = torch.arange(10, dtype=torch.float32)
    path = tmp_path / "views.ckpt"
    torch.save({"a": base, "b": base[2:5], "c": base.view(2, 5).t()}, path)
    out = read_checkpoint(path)
    assert torch.equal(out["b"], base[2:5]) and torch.equal(out["c"], base.view(2, 5).t())


def test_deflated_but_honest_checkpoint_still_loads(tmp_path):
    """A checkpoint re-zipped with deflate (what ``zip -r`` makes) is readable: only the sizes are bounded."""
    import zipfile

    from malformed import rezip

    path = tmp_path / "deflated.ckpt"
    path.write_bytes(rezip(small_ckpt(), compression=zipfile.ZIP_DEFLATED))
    assert torch.equal(read_checkpoint(path)["model.diffusion_model.w"], torch.arange(4, dtype=torch.float32))


# --------------------------------------------------------------------------------------------------------------
# Non-floating tensors where the model needs weights


def test_require_float_weights_refuses_by_name():
    weights = {"model.diffusion_model.out.2.weight": torch.zeros(4, 4, dtype=torch.int64),
               "first_stage_model.x": torch.zeros(2)}
    with pytest.raises(CheckpointError) as e:
        require_float_weights(weights, ("model.diffusion_model.", "first_stage_model."), "m.safetensors")
    assert str(e.value) == ("m.safetensors: tensor 'model.diffusion_model.out.2.weight' is int64, but the model "
                            "needs floating-point weights there")


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.int32, torch.complex64])
def test_require_float_weights_refuses_every_non_float(dtype):
    with pytest.raises(CheckpointError, match=str(dtype).removeprefix("torch.")):
        require_float_weights({"cond_stage_model.w\x1b": torch.zeros(2, dtype=dtype)}, ("cond_stage_model.",))


def test_require_float_weights_accepts_floats_and_ignores_other_prefixes():
    weights = {f"model.diffusion_model.{d}": torch.zeros(2, dtype=d) for d in
               (torch.float32, torch.float16, torch.bfloat16, torch.float64)}
    weights["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    require_float_weights(weights, ("model.diffusion_model.",))


def test_require_float_weights_on_a_fixture(fixtures):
    weights = read_checkpoint(fixtures / "sd1-tiny.safetensors")
    weights = {k: v for k, v in weights.items() if not k.endswith("position_ids")}
    require_float_weights(weights, ("model.diffusion_model.", "first_stage_model.", "cond_stage_model."))
    weights["first_stage_model.decoder.conv_in.weight"] = weights["first_stage_model.decoder.conv_in.weight"].int()
    with pytest.raises(CheckpointError, match="first_stage_model.decoder.conv_in.weight' is int32"):
        require_float_weights(weights, ("first_stage_model.",), "sd1-tiny.safetensors")


# --------------------------------------------------------------------------------------------------------------
# The legacy-format walk never runs what the file names


class _SystemCall:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("where", ["object", "sys_info_position"])
def test_legacy_code_running_pickle_is_refused_and_never_runs(tmp_path, where):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.ckpt"
    evil = _SystemCall(marker)
    if where == "object":
        torch.save({"state_dict": {"model.diffusion_model.a": torch.zeros(2)}, "x": evil}, path,
                   _use_new_zipfile_serialization=False)
    else:  # a legacy file whose first pickle (the magic number's place) is the payload
        import pickle

        path.write_bytes(pickle.dumps(evil, protocol=2) + pickle.dumps(evil, protocol=2) * 4)
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(path)
    _assert_clean_line(str(e.value))
    assert not marker.exists()


def test_a_huge_memo_index_costs_neither_time_nor_memory(tmp_path):
    """A legacy pickle whose BINPUT names memo slot 2**28 - 1: the walk must not size anything by it (the C
    unpickler allocates and clears a 4 GB array for that)."""
    from malformed import legacy_ckpt

    blob = legacy_ckpt()
    # the object pickle (the second one opening with a memoised dict): its dict goes to memo slot 2**28 - 1
    main_pickle = blob.index(b"\x80\x02}q\x00", blob.index(b"\x80\x02}q\x00") + 1)
    blob = blob[:main_pickle] + b"\x80\x02}r\xff\xff\xff\x0f" + blob[main_pickle + 5:]
    path = tmp_path / "memo.ckpt"
    path.write_bytes(blob)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    try:
        out = read_checkpoint(path)
    except CheckpointError as e:
        _assert_clean_line(str(e))
    else:
        assert torch.equal(out["model.diffusion_model.w"], torch.arange(8, dtype=torch.float32))
    assert time.perf_counter() - start < 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 500_000  # KiB
