"""The package's import graph, read from its source (``import_graph.py``), against the layer table in
ARCHITECTURE.md: no cycles, every import of the package resolves, no module imports a higher layer, the Pipeline
imports without the optional extras, and every function-level import of the package says why. A planted package
shows that each check reports what it should."""

from __future__ import annotations

import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from import_graph import Graph, parse_layers

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def graph() -> Graph:
    import tritonsd

    assert Path(tritonsd.__file__).resolve().parent == ROOT, f"tritonsd is imported from {tritonsd.__file__}"
    return Graph(ROOT, "tritonsd")


@pytest.fixture(scope="module")
def layers() -> dict[str, int]:
    return parse_layers((ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8"))


def report(problems: list) -> str:
    return f"{len(problems)}:\n" + "\n".join(map(str, problems))


# --------------------------------------------------------------------------------------------- the package


def test_no_import_cycles(graph):
    cycles = graph.cycles()
    assert not cycles, report([" -> ".join(c) for c in cycles])


def test_every_import_of_the_package_resolves(graph):
    """In the package, and in the tests and benchmark scripts that import it."""
    scripts = sorted((ROOT / "tests").glob("*.py")) + sorted((ROOT / "benchmarks").rglob("*.py"))
    problems = graph.unresolved() + graph.unresolved_in([p.relative_to(ROOT) for p in scripts])
    assert not problems, report(problems)


def test_layer_table_keeps_the_runtime_below_its_shells(layers):
    """The order the table must keep, whatever else moves: kernels < model < compile < sampler < pipeline < the
    shells on top of it."""
    chain = ["kernels", "model", "compile", "sampler", "pipeline"]
    assert [layers[c] for c in chain] == sorted({layers[c] for c in chain}), layers
    for shell in ("testing", "tools", "serve", "batch", "bench"):
        assert layers[shell] > layers["pipeline"], shell


def test_layer_table_names_only_what_exists(graph, layers):
    components = {m.split(".")[1] if "." in m else "__init__" for m in graph.modules}
    assert set(layers) <= components, set(layers) - components


def test_imports_follow_the_layers(graph, layers):
    problems = graph.layer_violations(layers)
    assert not problems, report(problems)


def test_the_pipeline_imports_without_the_optional_extras(graph):
    """``import tritonsd; import tritonsd.pipeline`` (and the command line's entry point) must not need fastapi,
    Ray, diffusers...: none of the modules they import at module level imports one at module level."""
    roots = ["tritonsd", "tritonsd.pipeline", "tritonsd.tools.cli"]
    # the walk follows the imports: the Pipeline's own, and theirs
    assert {"tritonsd.kernels.dispatch", "tritonsd.sampler.wiring", "tritonsd.kernels.conv_layout"} \
        <= graph.loaded_at_import(roots)
    problems = graph.optional_at_import(roots)
    assert not problems, report(problems)


def test_the_pipeline_imports_no_triton(graph):
    """Importing the package, the Pipeline or the command line imports no kernel module and no triton (0.1 s of
    every start; and the command line chooses ``TRITON_INTERPRET`` before triton reads it): ``kernels.dispatch``
    loads each op module when one of its names is first read."""
    roots = ["tritonsd", "tritonsd.pipeline", "tritonsd.tools.cli"]
    assert "tritonsd.kernels.attention" not in graph.loaded_at_import(roots)
    problems = graph.optional_at_import(roots, optional=frozenset({"triton"}))
    assert not problems, report(problems)


def test_function_level_imports_say_why(graph):
    """An import of the package inside a function carries ``# lazy: <reason>`` on its line or the line above."""
    problems = graph.unexplained_lazy()
    assert not problems, report(problems)


# ------------------------------------------------------------------------------------- planted violations

PLANTED = {
    "__init__.py": "",
    "low/__init__.py": "",
    "low/a.py": """
        from {P}.low import b


        def f():
            return b.g()
        """,
    "low/b.py": """
        def g():
            from {P}.low import a  # lazy: planted, closes the cycle a -> b -> a
            return a
        """,
    "model/__init__.py": "",
    "model/demo.py": "def random_weights():\n    return {{}}\n",
    "low/gone.py": """
        def missing_module():
            from {P}.model.random_weights import build  # lazy: planted
            return build


        def missing_name():
            # lazy: planted (the name is in model.demo, not in the package model)
            from {P}.model import random_weights
            return random_weights


        def missing_relative():
            from ..low.a import no_such_name  # lazy: planted
            return no_such_name
        """,
    "low/up.py": "from {P}.high import top\n",
    "low/extra.py": "import fastapi\n",
    "low/lazyextra.py": "import ray\n",
    "high/__init__.py": "",
    "high/top.py": """
        from {P}.low import a, extra
        from {P}.model.demo import random_weights
        from ..low.a import f


        def k():
            from {P}.low import b
            return b


        def h():
            # lazy: needs the optional extra ray
            from {P}.low import lazyextra
            return lazyextra
        """,
}
PLANTED_LAYERS = """
| layer | modules |
|---|---|
| 0 | `__init__`, `low`, `model` |
| 1 | `high` |
"""


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """The planted package (a unique name, importable for find_spec) and its graph."""
    name = f"planted_{uuid.uuid4().hex[:8]}"
    root = tmp_path_factory.mktemp("planted") / name
    for rel, text in PLANTED.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(textwrap.dedent(text.format(P=name)).lstrip())
    sys.path.insert(0, str(root.parent))
    try:
        yield name, Graph(root, name)
    finally:
        sys.path.remove(str(root.parent))
        for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            del sys.modules[mod]


def test_planted_cycle_is_reported(planted):
    p, graph = planted
    assert graph.cycles() == [[f"{p}.low.a", f"{p}.low.b", f"{p}.low.a"]]


def test_planted_unresolvable_imports_are_reported(planted):
    """A module that does not exist (issue 21's tritonsd.model.random_weights), a name its package does not
    define, a relative import of a missing name; the imports that do resolve (a submodule, a name, relative)
    are not reported."""
    p, graph = planted
    problems = graph.unresolved()
    assert problems == [
        f"low/gone.py:2: from {p}.model.random_weights import build: no module {p}.model.random_weights",
        f"low/gone.py:8: from {p}.model import random_weights: {p}.model has no submodule or name "
        f"'random_weights'",
        f"low/gone.py:13: from ..low.a import no_such_name: {p}.low.a has no submodule or name 'no_such_name'",
    ], report(problems)


def test_planted_script_imports_and_its_program_strings_are_resolved(planted, tmp_path):
    """A test or benchmark script: its own imports, and the code it hands a child process as a string."""
    p, graph = planted
    script = tmp_path / "script.py"
    child = f"import sys\nfrom {p}.low import b, files\n"
    script.write_text(f"from {p}.low import a\nfrom {p}.low import renamed\n\nCHILD = {child!r}\n")
    assert graph.unresolved_in([script]) == [
        f"{script}:2: from {p}.low import renamed: {p}.low has no submodule or name 'renamed'",
        f"{script}:4: a program string: from {p}.low import b, files: {p}.low has no submodule or name 'files'"]


def test_planted_layer_violation_is_reported(planted):
    p, graph = planted
    problems = graph.layer_violations(parse_layers(PLANTED_LAYERS))
    assert problems == [f"low/up.py:1: from {p}.high import top: low (layer 0) imports high (layer 1)"], \
        report(problems)
    assert graph.layer_violations({"low": 0, "high": 1}) == [
        "component '__init__' has no row in the layer table", "component 'model' has no row in the layer table",
        *problems]


def test_planted_optional_extra_at_import_is_reported(planted):
    """``low.extra`` imports fastapi at module level and ``high.top`` imports it at module level; ``low.lazyextra``
    imports ray but is only imported inside a function."""
    p, graph = planted
    assert graph.optional_at_import([f"{p}.high.top"]) == ["low/extra.py:1: imports fastapi at module level"]
    assert graph.optional_at_import([f"{p}.low.a"]) == []


def test_planted_lazy_import_without_reason_is_reported(planted):
    p, graph = planted
    assert graph.unexplained_lazy() == [f"high/top.py:7: from {p}.low import b"]


def test_layer_table_is_read_from_markdown():
    assert parse_layers(PLANTED_LAYERS) == {"__init__": 0, "low": 0, "model": 0, "high": 1}
    with pytest.raises(ValueError, match="two rows"):
        parse_layers(PLANTED_LAYERS + "| 2 | `low` |\n")
    with pytest.raises(ValueError, match="no markdown table"):
        parse_layers("| a | b |\n|---|---|\n")
