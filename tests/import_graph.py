"""A package's import graph, read from its source: every import statement of every module, at module level and
inside functions, absolute and relative, resolved to the module it loads. Used by ``test_layout.py`` on tritonsd
itself and on small planted packages.

Nothing of the scanned package is executed except what ``importlib.util.find_spec`` runs to find a submodule: the
``__init__`` of its parent packages.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

# Third-party modules of the optional extras (serve, ray, peers) and of the test extra: importing the package or
# its Pipeline must not need them.
OPTIONAL_EXTRAS = frozenset({"fastapi", "starlette", "pydantic", "uvicorn", "ray", "pyarrow", "pandas", "matplotlib",
                             "selenium", "diffusers", "transformers", "cv2", "requests", "webuiapi",
                             "spandrel", "torchvision", "h11"})  # upscale: spandrel (it needs torchvision); serve: h11

# Folders of the repository root that are not the package.
NOT_PACKAGE = frozenset({"tests", "benchmarks", "build", "dist"})

_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")


@dataclass(frozen=True)
class Import:
    """One imported module (or name) of one import statement."""

    importer: str  # the importing module, dotted
    target: str  # the module the statement loads, dotted ('' when it does not resolve)
    statement: str  # as ast.unparse writes it, e.g. "from tritonsd.model import random_weights"
    line: int
    lazy: bool  # inside a function body: runs when the function is called, not at import
    reason: bool  # a "# lazy: ..." comment on the statement's lines or on the line above
    error: str = ""  # why it does not resolve


@dataclass
class Module:
    name: str
    path: Path
    tree: ast.Module
    text: str

    @property
    def lines(self) -> list[str]:
        return self.text.splitlines()

    @property
    def is_package(self) -> bool:
        return self.path.name == "__init__.py"


def package_files(root: Path, exclude=NOT_PACKAGE) -> list[Path]:
    """The package's .py files: ROOT's tree minus EXCLUDE's top-level folders and hidden or cache folders."""
    files = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if parts[0] in exclude or any(p.startswith(".") or p == "__pycache__" or p.endswith(".egg-info")
                                      for p in parts[:-1]):
            continue
        files.append(path)
    return files


def module_name(root: Path, package: str, path: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts  # ("model", "unet") for model/unet.py
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join((package, *parts))


def component(package: str, module: str) -> str:
    """The layer table's unit: ``pkg.model.unet`` -> ``model``, ``pkg.escape`` -> ``escape``, ``pkg`` ->
    ``__init__``."""
    parts = module.split(".")
    assert parts[0] == package, module
    return parts[1] if len(parts) > 1 else "__init__"


def _function_bodies(tree: ast.AST):
    """(node, lazy) for every node, lazy when it sits inside a function body."""
    stack = [(tree, False)]
    while stack:
        node, lazy = stack.pop()
        yield node, lazy
        inner = lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        stack.extend((child, inner) for child in ast.iter_child_nodes(node))


def _top_level_statements(body):
    """Statements that run at import: the module body and the blocks of its if / try / with / loops, not the
    bodies of functions or classes."""
    for stmt in body:
        yield stmt
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        for field in ("body", "orelse", "finalbody"):
            yield from _top_level_statements(getattr(stmt, field, []))
        for handler in getattr(stmt, "handlers", []):
            yield from _top_level_statements(handler.body)


class Graph:
    """The import graph of the package PACKAGE whose source is the folder ROOT (``ROOT/__init__.py`` is PACKAGE,
    ``ROOT/a/b.py`` is ``PACKAGE.a.b``). PACKAGE must be importable (for ``find_spec``) from ROOT itself."""

    def __init__(self, root: Path, package: str, exclude=NOT_PACKAGE):
        self.root, self.package = Path(root).resolve(), package
        self.modules: dict[str, Module] = {}
        for path in package_files(self.root, exclude):
            name = module_name(self.root, package, path)
            self.modules[name] = self._read(name, path)
        self._specs: dict[str, str] = {}
        self.imports: list[Import] = [imp for m in self.modules.values() for imp in self.imports_of(m)]

    @staticmethod
    def _read(name: str, path: Path) -> Module:
        text = path.read_text(encoding="utf-8")
        return Module(name, path, ast.parse(text, filename=str(path)), text)

    # --------------------------------------------------------------------------------------------- resolution

    def missing(self, module: str) -> str:
        """'' when MODULE is a module of this package found by ``find_spec`` in ROOT; else why not."""
        if module not in self._specs:
            self._specs[module] = self._find(module)
        return self._specs[module]

    def _find(self, module: str) -> str:
        parts = module.split(".")
        for k in range(1, len(parts)):
            prefix = ".".join(parts[:k])
            if prefix in self.modules and not self.modules[prefix].is_package:
                # find_spec would import it to look for a __path__; it has none
                return f"no module {module} ({prefix} is a module, not a package)"
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError) as e:  # a parent is not a package, or its __init__ failed
            return f"{module} not found ({type(e).__name__}: {e})"
        if spec is None:
            return f"no module {module}"
        where = spec.origin if spec.has_location else next(iter(spec.submodule_search_locations or []), None)
        if where is None or not Path(where).resolve().is_relative_to(self.root):
            return f"{module} resolves to {where}, outside {self.root}"
        return ""

    def defines(self, module: str, name: str) -> bool:
        """Whether MODULE's source binds NAME at import: a def, class, assignment or import at top level, or an
        entry of its ``__all__`` (for names a module-level ``__getattr__`` provides)."""
        m = self.modules.get(module)
        if m is None:
            return False
        return name in _bound_names(m.tree)

    def _absolute(self, module: Module, node: ast.ImportFrom) -> str:
        """The absolute module of ``from <node.module> import ...``, relative levels resolved."""
        if not node.level:
            return node.module or ""
        base = module.name.split(".")
        if not module.is_package:
            base = base[:-1]  # a module's level 1 is its package
        base = base[: len(base) - (node.level - 1)]
        return ".".join(base + ([node.module] if node.module else []))

    def _ours(self, dotted: str) -> bool:
        return dotted == self.package or dotted.startswith(self.package + ".")

    def imports_of(self, module: Module) -> list[Import]:
        out = []
        lines = module.lines
        for node, lazy in _function_bodies(module.tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            statement = ast.unparse(node)
            above = lines[node.lineno - 2].strip() if node.lineno > 1 else ""
            reason = (any("# lazy:" in line for line in lines[node.lineno - 1: node.end_lineno])
                      or (above.startswith("#") and "lazy:" in above))
            common = {"importer": module.name, "statement": statement, "line": node.lineno,
                      "lazy": lazy, "reason": reason}
            for target, error in self._targets(module, node):
                out.append(Import(target=target if not error else "", error=error, **common))
        return sorted(out, key=lambda i: i.line)

    def _targets(self, module: Module, node) -> list[tuple[str, str]]:
        """(module loaded, error) for each module or name NODE imports from this package."""
        if isinstance(node, ast.Import):
            return [(a.name, self.missing(a.name)) for a in node.names if self._ours(a.name)]
        base = self._absolute(module, node)
        if not self._ours(base):
            return []
        if self.missing(base):
            return [(base, self.missing(base))]
        out = []
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            is_package = base in self.modules and self.modules[base].is_package
            if alias.name != "*" and is_package and not self.missing(sub):
                out.append((sub, ""))  # a submodule
            elif alias.name == "*" or self.defines(base, alias.name):
                out.append((base, ""))
            else:
                out.append((base, f"{base} has no submodule or name {alias.name!r}"))
        return out

    def dotted_strings(self) -> list[tuple[str, int, str]]:
        """(module, line, text) for the strings that name a module of this package to be imported later: the
        argument of ``import_module(...)`` and the values of a module-level dict (a lazy-export table such as the
        package's ``_API``)."""
        out = []
        for m in self.modules.values():
            for node in _module_strings(m.tree):
                if _DOTTED.fullmatch(node.value) and self._ours(node.value):
                    out.append((m.name, node.lineno, node.value))
        return out

    # -------------------------------------------------------------------------------------------------- checks

    def unresolved(self) -> list[str]:
        """Every import of this package's modules or names that does not resolve, and every dotted string naming
        one that does not exist."""
        problems = _unique(f"{self._where(i)}: {i.statement}: {i.error}" for i in self.imports if i.error)
        for module, line, text in self.dotted_strings():
            parent, _, name = text.rpartition(".")
            if self.missing(text) and (not parent or self.missing(parent) or not self.defines(parent, name)):
                problems.append(f"{self.modules[module].path.relative_to(self.root)}:{line}: string {text!r} "
                                f"names no module or attribute")
        return problems

    def unresolved_in(self, paths) -> list[str]:
        """The unresolved imports of this package in other files (scripts, tests) that import it, and in the
        programs they hold as strings (code run in a child process: ``python -c``)."""
        problems = []
        for path in paths:
            script = self._read(f"<{Path(path).name}>", Path(path))
            problems += [f"{path}:{i.line}: {i.statement}: {i.error}" for i in self.imports_of(script) if i.error]
            for line, program in _programs(script.tree, self.package):
                child = Module(f"<{Path(path).name}:{line}>", Path(path), ast.parse(program), program)
                problems += [f"{path}:{line}: a program string: {i.statement}: {i.error}"
                             for i in self.imports_of(child) if i.error]
        return problems

    def edges(self) -> dict[str, set[str]]:
        """importer -> modules it imports (module level and lazy), resolved imports only."""
        graph: dict[str, set[str]] = {m: set() for m in self.modules}
        for i in self.imports:
            if i.target and i.target != i.importer:
                graph[i.importer].add(i.target)
        return graph

    def cycles(self) -> list[list[str]]:
        """One cycle [a, b, ..., a] per strongly connected component of more than one module."""
        graph = self.edges()
        return [_a_cycle(graph, scc) for scc in _strongly_connected(graph) if len(scc) > 1]

    def layer_violations(self, layers: dict[str, int]) -> list[str]:
        """Imports from a lower layer of a higher one, and modules whose component has no layer."""
        problems = []
        for name in sorted({component(self.package, m) for m in self.modules} - set(layers)):
            problems.append(f"component {name!r} has no row in the layer table")
        for i in self.imports:
            if not i.target:
                continue
            a, b = component(self.package, i.importer), component(self.package, i.target)
            if a in layers and b in layers and layers[a] < layers[b]:
                problems.append(f"{self._where(i)}: {i.statement}: {a} (layer {layers[a]}) imports {b} "
                                f"(layer {layers[b]})")
        return _unique(problems)

    def unexplained_lazy(self) -> list[str]:
        """Function-level imports of this package without a '# lazy: <reason>' comment."""
        return _unique(f"{self._where(i)}: {i.statement}" for i in self.imports if i.lazy and not i.reason)

    def loaded_at_import(self, roots: list[str]) -> set[str]:
        """The modules importing ROOTS runs: module-level imports followed transitively, with the ``__init__``
        of every package on the way."""
        module_level: dict[str, set[str]] = {m: set() for m in self.modules}
        for i in self.imports:
            if i.target and not i.lazy:
                module_level[i.importer].add(i.target)
        seen: set[str] = set()
        todo = list(roots)
        while todo:
            name = todo.pop()
            if name in seen or name not in self.modules:
                continue
            seen.add(name)
            todo.extend(module_level[name])
            todo.extend(".".join(name.split(".")[:k]) for k in range(1, name.count(".") + 1))  # its packages
        return seen

    def optional_at_import(self, roots: list[str], optional=OPTIONAL_EXTRAS) -> list[str]:
        """Module-level imports of OPTIONAL third-party modules in the modules importing ROOTS runs."""
        problems = []
        for name in sorted(self.loaded_at_import(roots)):
            m = self.modules[name]
            for stmt in _top_level_statements(m.tree.body):
                for dotted in _third_party(stmt):
                    if dotted.split(".")[0] in optional:
                        problems.append(f"{m.path.relative_to(self.root)}:{stmt.lineno}: imports {dotted} at "
                                        f"module level")
        return problems

    def third_party(self, *, module_level_only: bool) -> dict[str, set[str]]:
        """Top-level name of each non-stdlib, non-package module imported -> the files importing it."""
        found: dict[str, set[str]] = {}
        for m in self.modules.values():
            nodes = (_top_level_statements(m.tree.body) if module_level_only
                     else (n for n, _ in _function_bodies(m.tree)))
            for node in nodes:
                for dotted in _third_party(node):
                    top = dotted.split(".")[0]
                    if top not in sys.stdlib_module_names and top != "__future__" and not self._ours(dotted):
                        found.setdefault(top, set()).add(str(m.path.relative_to(self.root)))
        return found

    def _where(self, i: Import) -> str:
        return f"{self.modules[i.importer].path.relative_to(self.root)}:{i.line}"


def _module_strings(tree: ast.Module) -> list[ast.Constant]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args and getattr(node.func, "attr", getattr(node.func, "id", None)) \
                == "import_module":
            found.append(node.args[0])
    for stmt in tree.body:
        if isinstance(stmt, (ast.Assign, ast.AnnAssign)) and isinstance(stmt.value, ast.Dict):
            found.extend(stmt.value.values)
    return [n for n in found if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def _programs(tree: ast.Module, package: str) -> list[tuple[int, str]]:
    """(line, program) for each string constant that parses as Python and imports PACKAGE."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and "import" in node.value \
                and package in node.value:
            program = textwrap.dedent(node.value)
            try:
                ast.parse(program)
            except SyntaxError:
                continue
            found.append((node.lineno, program))
    return found


def _unique(items) -> list:
    return list(dict.fromkeys(items))


def _third_party(node) -> list[str]:
    """Absolute module names an import statement names (relative imports are the package's own)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom) and not node.level and node.module:
        return [node.module]
    return []


def _bound_names(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    literals: dict[str, ast.expr] = {}
    for stmt in _top_level_statements(tree.body):
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(stmt.name)
        elif isinstance(stmt, (ast.Import, ast.ImportFrom)):
            if any(a.name == "*" for a in stmt.names):
                return _Everything()
            names.update((a.asname or a.name).split(".")[0] for a in stmt.names)
        elif isinstance(stmt, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            for target in targets:
                for node in ast.walk(target):
                    if isinstance(node, ast.Name):
                        names.add(node.id)
                        literals[node.id] = stmt.value
    names.update(_all_entries(literals.get("__all__"), literals))
    return names


def _all_entries(expr, literals: dict) -> list[str]:
    """The strings of an ``__all__`` value: a literal list / tuple, or list(X) / sorted(X) of a top-level dict or
    list literal X (a lazy-export table)."""
    if expr is None:
        return []
    if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name) and expr.func.id in ("list", "sorted", "tuple") \
            and len(expr.args) == 1 and isinstance(expr.args[0], ast.Name):
        expr = literals.get(expr.args[0].id)
    if isinstance(expr, (ast.List, ast.Tuple, ast.Set)):
        return [e.value for e in expr.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
    if isinstance(expr, ast.Dict):
        return [k.value for k in expr.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)]
    return []


class _Everything(set):
    """The names of a module with a star import: any name may be bound."""

    def __contains__(self, item) -> bool:
        return True


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components, iteratively (no recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in graph:
                    continue
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                scc = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    scc.append(top)
                    if top == node:
                        break
                out.append(sorted(scc))
    return out


def _a_cycle(graph: dict[str, set[str]], scc: list[str]) -> list[str]:
    """A shortest cycle through SCC's first module, inside SCC (breadth first)."""
    members, start = set(scc), scc[0]
    parent: dict[str, str] = {}
    todo = [start]
    while todo:
        nxt = []
        for node in todo:
            for child in sorted(graph[node] & members):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if child not in parent:
                    parent[child] = node
                    nxt.append(child)
        todo = nxt
    return scc


def parse_layers(markdown: str) -> dict[str, int]:
    """component -> layer from the markdown table whose header has a ``layer`` and a ``modules`` column; the
    modules cell lists components, comma separated, in backticks or not."""
    rows = [line.strip() for line in markdown.splitlines()]
    for i, row in enumerate(rows):
        cells = _cells(row)
        if "layer" in cells and "modules" in cells:
            li, mi = cells.index("layer"), cells.index("modules")
            layers: dict[str, int] = {}
            for body in rows[i + 2:]:
                if not body.startswith("|"):
                    break
                cell = _cells(body)
                for name in cell[mi].split(","):
                    name = name.strip().strip("`").strip()
                    if name:
                        if name in layers:
                            raise ValueError(f"component {name!r} is in two rows of the layer table")
                        layers[name] = int(cell[li])
            return layers
    raise ValueError("no markdown table with 'layer' and 'modules' columns")


def _cells(row: str) -> list[str]:
    if not row.startswith("|"):
        return []
    return [c.strip().lower() if c.strip().lower() in ("layer", "modules") else c.strip()
            for c in row.strip("|").split("|")]
