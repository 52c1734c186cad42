"""The shape of the code (docs/architecture.md): no import cycle, core reaches the backends only through
their registry, families are named only in their own modules, small functions, a repository that
refers to no document outside itself."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
# Source folder -> the package it is installed as (pyproject.toml maps backends/ to moe_local.backends).
PACKAGES = {"moe_local": "moe_local", "backends": "moe_local.backends"}
MAX_FUNCTION_LINES = 80


def modules() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join((package, *parts))] = path
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules ``name`` imports anywhere in its code (lazy imports inside functions included)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def test_no_import_cycle():
    edges = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_core_reaches_backends_only_through_the_registry():
    for name, targets in graph().items():
        if name.startswith("moe_local.backends"):
            continue
        inside = sorted(t for t in targets if t.startswith("moe_local.backends."))
        assert not inside, f"{name} imports {inside}; core reaches a backend through moe_local.backends"


def test_families_are_named_only_in_their_modules():
    """No ``family == "..."`` test and no family-keyed dict outside moe_local/families."""
    from moe_local.families import FAMILIES

    names = "|".join(re.escape(f) for f in FAMILIES)
    pattern = re.compile(rf"""family\s*[!=]=\s*["']({names})["']|["']({names})["']\s*:""")
    for name, path in modules().items():
        if name.startswith("moe_local.families"):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            assert not pattern.search(line), f"{path}:{number} names a family: {line.strip()}"


def test_functions_are_short():
    for path in modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                assert length <= MAX_FUNCTION_LINES, f"{path}:{node.lineno} {node.name} is {length} lines"


def test_no_reference_to_documents_outside_the_repository():
    pattern = re.compile(r"DESIGN §|PAPERS §|FINDINGS\.md|\.\./shared|shared/(DESIGN|PAPERS|FINDINGS|STYLE)")
    files = [
        p
        for p in ROOT.rglob("*")
        if p.suffix in (".py", ".md", ".toml", ".yaml", ".cfg") and not {".venv", ".git", "__pycache__"} & set(p.parts)
    ]
    for path in files:
        if path == Path(__file__):
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            assert not pattern.search(line), f"{path}:{number}: {line.strip()}"


def test_every_documented_module_exists_and_every_module_is_documented():
    """README's layout section lists every module of the package (and nothing that is gone)."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"\b((?:moe_local|backends)/[\w/]+\.py)\b", section))
    present = {
        str(p.relative_to(ROOT))
        for folder in PACKAGES
        for p in (ROOT / folder).rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert present - listed == set(), f"modules missing from README's layout: {sorted(present - listed)}"
    assert listed - present == set(), f"README lists modules that do not exist: {sorted(listed - present)}"
