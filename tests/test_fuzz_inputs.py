"""Issue 26's fuzz test, bounded for CI: Hypothesis drives structure-aware mutations (tests/fuzz_inputs.py) of the
fixture LoRA, the embeddings, sd1-tiny.yaml and a PNG's infotext through each reader; every outcome must be the
reader's own error (a ValueError subclass) with one printable line, or a clean result, with every class hit. The
HTTP half sends bodies generated from the server's own OpenAPI schema to a real server on loopback: no 5xx, no
hang, one-line errors. The long runs (20,000 inputs, 5,000 requests) are benchmarks/fuzz_readers.py --suite
inputs and benchmarks/fuzz_http.py; TRITONSD_FUZZ_EXAMPLES / TRITONSD_FUZZ_REQUESTS set the counts here."""

from __future__ import annotations

import argparse
import os
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz_inputs import CLASSES, InputSeeds, check_case, make_case
from fuzz_mutations import HypothesisDraw

EXAMPLES = int(os.environ.get("TRITONSD_FUZZ_EXAMPLES", "200"))
REQUESTS = int(os.environ.get("TRITONSD_FUZZ_REQUESTS", "150"))


@pytest.fixture(scope="module")
def seeds(fixtures) -> InputSeeds:
    return InputSeeds.load(fixtures)


def test_mutated_inputs_give_one_line_or_load(seeds, tmp_path):
    hits: Counter[str] = Counter()
    outcomes: Counter[tuple[str, str]] = Counter()

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def one(data):
        case = make_case(seeds, HypothesisDraw(data))
        hits[case.cls] += 1
        path = tmp_path / f"mutant{case.suffix}"
        path.write_bytes(case.data)
        try:
            outcomes[(case.cls, check_case(case, path, seeds).result)] += 1
        except AssertionError as e:
            raise AssertionError(f"{case.cls}: {case.what}: {e}") from None
        finally:
            path.unlink()

    one()
    print(f"fuzz: {EXAMPLES} cases, hits per class {dict(hits)}, outcomes {dict(outcomes)}")
    assert set(hits) == set(CLASSES), f"classes not hit: {set(CLASSES) - set(hits)}"
    assert {r for _, r in outcomes} == {"refused", "loaded"}, dict(outcomes)


def test_the_seeds_themselves_load(seeds, tmp_path):
    """The property's other half: each class's unmutated seed reads cleanly."""
    from fuzz_inputs import Case, safetensors_bytes

    cases = [Case("lora", "seed", ".safetensors", safetensors_bytes(seeds.lora)),
             Case("yaml", "seed", ".yaml", seeds.yaml_text.encode()), Case("infotext", "seed", ".png", seeds.png)]
    cases += [Case("embedding", name, "." + name.rsplit(".", 1)[1], blob) for name, blob in seeds.embeddings.items()]
    for case in cases:
        path = tmp_path / f"seed{case.suffix}"
        path.write_bytes(case.data)
        assert check_case(case, path, seeds).result == "loaded", case.what


@pytest.mark.slow
def test_http_bodies_from_the_openapi_schema(fixtures, tmp_path):
    from benchmarks import fuzz_http  # the checkout root is on the path (conftest)

    record = fuzz_http.run(argparse.Namespace(requests=REQUESTS, timeout=120.0, fixtures=str(fixtures)))
    assert record["requests"] == REQUESTS
    assert record["server_errors_5xx"] == 0, record["failures"]
    assert record["hangs"] == 0 and record["connection_errors"] == 0, record["failures"]
    assert record["multi_line_errors"] == 0, record["failures"]
    assert record["server_alive_after"] and record["progress_answers_after"]
    statuses = {s for route in record["by_route_status"].values() for s in route}
    assert "200" in statuses and "422" in statuses  # both sides of validation were reached
