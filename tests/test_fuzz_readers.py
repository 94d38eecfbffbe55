"""Issue 16's fuzz test, bounded for CI: Hypothesis drives structure-aware mutations (tests/fuzz_mutations.py) of
the fixtures sd1-tiny.safetensors and sd1-tiny.ckpt (and the ckpt's weights in torch's legacy format) through
headers, offsets, dtypes, shapes, names, zip members, pickle opcodes and truncation. Every outcome must be our
CheckpointError with one printable line naming the file, or a clean load, within 10 s, with the input unchanged;
every class must be hit. The long run (20,000+ inputs, worker processes under a watchdog) is
benchmarks/fuzz_readers.py; TRITONSD_FUZZ_EXAMPLES sets this test's count."""

from __future__ import annotations

import os
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz_mutations import CLASSES, HypothesisDraw, Seeds, check_outcome, make_case

EXAMPLES = int(os.environ.get("TRITONSD_FUZZ_EXAMPLES", "300"))


@pytest.fixture(scope="module")
def seeds(fixtures) -> Seeds:
    return Seeds.load(fixtures)


@pytest.mark.slow  # fuzzing
def test_mutated_checkpoints_give_one_line_or_load(seeds, tmp_path):
    hits: Counter[str] = Counter()
    outcomes: Counter[str] = Counter()

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def one(data):
        case = make_case(seeds, HypothesisDraw(data))
        hits[case.cls] += 1
        path = tmp_path / f"mutant{case.suffix}"
        path.write_bytes(case.data)
        try:
            outcomes[check_outcome(path).result] += 1
        except AssertionError as e:
            raise AssertionError(f"{case.cls}: {case.what}: {e}") from None
        finally:
            path.unlink()

    one()
    print(f"fuzz: {EXAMPLES} cases, hits per class {dict(hits)}, outcomes {dict(outcomes)}")
    assert set(hits) == set(CLASSES), f"classes not hit: {set(CLASSES) - set(hits)} ({dict(hits)})"
    assert outcomes["refused"] > 0 and outcomes["loaded"] > 0, dict(outcomes)


def test_unmutated_seeds_load(seeds, tmp_path):
    """The property's other half: the seeds themselves (rebuilt the way mutants are) load cleanly."""
    from fuzz_mutations import safetensors_file, zip_file

    for name, blob in (("a.safetensors", safetensors_file(seeds.safetensors.header, seeds.safetensors.data)),
                       ("b.ckpt", zip_file(seeds.zip.members)), ("c.ckpt", seeds.legacy.blob)):
        path = tmp_path / name
        path.write_bytes(blob)
        assert check_outcome(path).result == "loaded", name
