import ast
import subprocess
import sys
from pathlib import Path


def test_import_ncd_does_not_import_ray():
    code = ("import sys, ncd, ncd.config, ncd.data.io, ncd.data.catalog, ncd.preprocess.regions, ncd.preprocess.mebin, ncd.preprocess.crops, ncd.evaluate.metrics;"
            "import pkgutil, importlib;"
            "[importlib.import_module(m.name) for m in pkgutil.walk_packages(ncd.__path__, 'ncd.')];"
            "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("ncd", "ray_jobs")


def _module_names() -> dict[str, Path]:
    """Every module of ``PACKAGES`` (packages by their ``__init__``) -> its file."""
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``module`` imports anywhere in its file (module level, in
    functions, under ``if``): for ``from a import b``, ``a.b`` when that is a module, else ``a``."""

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {known(a.name) for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found |= {known(f"{base}.{a.name}") if f"{base}.{a.name}" in modules else known(base) for a in node.names}
    return {m for m in found if m and m != module}


def _external_imports(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports anywhere in its file."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module.split(".")[0])
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_in_ncd_or_ray_jobs_function_level_imports_included():
    modules = _module_names()
    graph = {m: _imports(m, p, modules) for m, p in modules.items()}
    assert graph["ray_jobs.cli"] >= {"ncd.cli", "ray_jobs.session", "ray_jobs.discover"}  # the graph sees lazy imports
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    cycles = _cycles(graph)
    assert not cycles, "import cycles (each: modules importing each other, directly or through others): " + "; ".join(
        " <-> ".join(c) for c in cycles)


def test_no_ncd_module_imports_ray_or_ray_jobs_anywhere():
    """Statically, function-level imports included: ``ncd`` (its CLI too) runs without Ray."""
    offenders = {str(p.relative_to(REPO)): sorted(_external_imports(p) & {"ray", "ray_jobs"})
                 for m, p in _module_names().items() if m.split(".")[0] == "ncd"}
    assert not {k: v for k, v in offenders.items() if v}


def test_ncd_cli_commands_run_without_importing_ray(tmp_path):
    csv = tmp_path / "p.csv"
    csv.write_text("category,gt_type,cluster\nc,a,1\nc,b,0\n")
    code = ("import sys; from ncd.cli import main;"
            f"assert main(['demo-data', '--out', {str(tmp_path / 'd')!r}, '--per-family', '1']) == 0;"
            f"assert main(['evaluate', {str(csv)!r}]) == 0;"
            "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False", out.stderr
