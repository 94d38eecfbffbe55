"""What ``pip install .`` ships: a real (not editable) install of a copy of the checkout into a fresh venv
(``--system-site-packages``, to reuse the torch on disk; ``--no-deps --no-build-isolation``, no network). The
installed package holds every module and data file and nothing of benchmarks/ or tests/, declares what it imports,
and the README's first command runs from it."""

from __future__ import annotations

import functools
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from PIL import Image

from import_graph import OPTIONAL_EXTRAS, Graph, package_files

ROOT = Path(__file__).resolve().parent.parent

# Import names whose distribution is called otherwise.
DISTRIBUTIONS = {"PIL": "pillow", "yaml": "pyyaml", "cv2": "opencv-python", "sklearn": "scikit-learn"}

# Package data (pyproject's package-data): the only non-Python files an install holds.
DATA = {"model/data/demo-sd1.json", "prompt/data/bpe_simple_vocab_16e6.txt.gz", "prompt/data/LICENSE-CLIP-BPE.txt",
        "sampler/data/linear_schedule_sigmas.json", "bench/data/gpus.json"}


def normalise(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return normalise(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1))


@functools.cache
def required_distributions() -> dict[str, set[str]]:
    """distribution -> files importing it: every third-party module the package imports (module level and in
    functions), the optional extras' left out."""
    imported = Graph(ROOT, "tritonsd").third_party(module_level_only=False)
    return {normalise(DISTRIBUTIONS.get(name, name)): files for name, files in imported.items()
            if name not in OPTIONAL_EXTRAS}


def test_every_imported_distribution_is_a_dependency():
    declared = {requirement_name(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
                ["dependencies"]}
    required = required_distributions()
    assert {"torch", "numpy", "pillow", "safetensors"} <= set(required)  # the scan sees the imports
    missing = {d: sorted(f) for d, f in required.items() if d not in declared}
    assert not missing, f"imported, not in pyproject's dependencies: {missing}"


def readme_first_command() -> list[str]:
    """The ``tritonsd ...`` part of the first line of README.md's first code block, split as a shell would."""
    block = re.search(r"```[a-z]*\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.S).group(1)
    first = block.splitlines()[0]
    parts = [p.strip() for p in first.split("&&")]
    command = [p for p in parts if p.startswith("tritonsd ")]
    assert len(command) == 1, first
    return shlex.split(command[0])


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A venv with tritonsd installed from a copy of this checkout (pip builds in the source folder)."""
    work = tmp_path_factory.mktemp("install")
    src = work / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "__pycache__", "build", "*.egg-info",
                                                             ".pytest_cache", "out", "outputs"))
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(work / "venv")],
                   check=True, timeout=120)
    proc = subprocess.run([str(work / "venv" / "bin" / "python"), "-m", "pip", "install", "--no-deps",
                           "--no-build-isolation", "--no-input", "-q", str(src)],
                          capture_output=True, text=True, env=_clean_env(), timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return work / "venv"


def _clean_env() -> dict[str, str]:
    """A user's shell: no PYTHONPATH pointing at a checkout, no Triton interpreter switched on by conftest."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}


def _python(venv: Path, code: str, cwd: Path) -> str:
    proc = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, cwd=cwd,
                          env=_clean_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@pytest.fixture(scope="module")
def installed(venv, tmp_path_factory) -> Path:
    """The installed package's folder, checked to be the venv's own copy (not the editable install or the
    checkout)."""
    where = Path(_python(venv, "import tritonsd; print(tritonsd.__file__)", tmp_path_factory.mktemp("cwd"))).parent
    assert where.is_relative_to(venv) and "site-packages" in where.parts, where
    return where


@pytest.mark.slow
def test_install_holds_every_module_and_data_file(installed):
    ours = {str(p.relative_to(ROOT)) for p in package_files(ROOT)}
    shipped = {str(p.relative_to(installed)) for p in installed.rglob("*") if p.is_file()
               and "__pycache__" not in p.parts}
    assert ours - shipped == set(), "modules of the checkout not installed (pyproject's packages)"
    assert DATA <= shipped
    static = {str(p.relative_to(ROOT)) for p in (ROOT / "serve" / "static").iterdir()}
    assert static and static <= shipped


@pytest.mark.slow
def test_install_holds_nothing_of_benchmarks_or_tests(installed):
    shipped = [p.relative_to(installed) for p in installed.rglob("*") if "__pycache__" not in p.parts]
    folders = {part for p in shipped for part in p.parts[:-1]}
    assert not folders & {"benchmarks", "tests", "results"}, sorted(folders)
    names = {p.name for p in shipped}
    assert not names & {"gpu_run.sh", "gpu_prepare.sh", "fuzz_readers.py", "fuzz_mutations.py", "conftest.py"}
    assert not [n for n in names if n.startswith("test_")]
    stray = [str(p) for p in shipped if p.suffix in (".json", ".sh") and str(p) not in DATA]
    assert not stray, stray  # results JSON, GPU scripts


@pytest.mark.slow
def test_installed_metadata_declares_the_imported_distributions(venv, installed, tmp_path):
    requires = _python(venv, "import importlib.metadata as m; print('\\n'.join(m.requires('tritonsd') or []))",
                       tmp_path).splitlines()
    declared = {requirement_name(r) for r in requires if "extra ==" not in r}
    missing = sorted(set(required_distributions()) - declared)
    assert not missing, missing


@pytest.mark.slow
def test_readme_first_command_runs_from_the_install(venv, installed, tmp_path):
    argv = readme_first_command()
    assert argv[:2] == ["tritonsd", "generate"] and "demo:sd1" in argv, argv
    out = Path(argv[argv.index("--out") + 1])
    proc = subprocess.run([str(venv / "bin" / argv[0]), *argv[1:]], capture_output=True, text=True, cwd=tmp_path,
                          env={**_clean_env(), "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr
    png = tmp_path / out / "00000-0.png"
    assert proc.stdout.split() == [str(out / "00000-0.png")], proc.stdout  # the README: it prints the path
    with Image.open(png) as im:
        width, height = int(argv[argv.index("--width") + 1]), int(argv[argv.index("--height") + 1])
        assert (im.format, im.size) == ("PNG", (width, height))
        assert f"Seed: {argv[argv.index('--seed') + 1]}," in im.info["parameters"]
