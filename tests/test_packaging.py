"""Packaging and import hygiene: one `selfe` namespace, and the dependency direction kernels <- engine <- train."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"engine": "selfe", "kernels": "selfe.kernels", "train": "selfe.train"}


def _load_setup_module():
    spec = importlib.util.spec_from_file_location("selfe_setup", ROOT / "setup.py")
    source = (ROOT / "setup.py").read_text()
    # Evaluate only the helpers, not the final setup() call.
    module = importlib.util.module_from_spec(spec)
    exec(compile(source.split("\next_modules, cmdclass")[0], str(ROOT / "setup.py"), "exec"), module.__dict__)
    return module


def test_every_installed_package_lives_under_selfe():
    setup = _load_setup_module()
    packages = setup.find_packages_mapped()
    assert "selfe" in packages and "selfe.kernels" in packages and "selfe.train" in packages
    assert all(p == "selfe" or p.startswith("selfe.") for p in packages), packages
    assert set(setup.PACKAGE_DIRS) == set(FOLDERS.values())


def _bare_names_inside_repo(cwd: Path, prelude: str = "") -> list[str]:
    """The bare folder names that resolve to this checkout's folders, for Python run in `cwd`."""
    code = (
        f"{prelude}import importlib.util as u, pathlib; root = pathlib.Path({str(ROOT)!r}).resolve(); "
        "specs = {n: u.find_spec(n) for n in ('engine', 'kernels', 'train')}; "
        "inside = lambda n, s: s and s.origin and pathlib.Path(s.origin).resolve().is_relative_to(root / n); "
        "print([n for n, s in specs.items() if inside(n, s)])"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, check=True)
    return ast.literal_eval(out.stdout.strip())


def test_bare_folder_names_do_not_import_outside_the_repo(tmp_path):
    # Another distribution may own a bare name (Hugging Face's `kernels`, a transformers dependency): only
    # our folders must not be reachable under one.
    assert _bare_names_inside_repo(tmp_path) == []
    out = subprocess.run([sys.executable, "-c", "import selfe.kernels, selfe.train; print('ok')"], cwd=tmp_path,
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


@pytest.mark.slow
def test_installed_kernels_wins_over_the_kernels_folder_from_the_repo_root():
    """From the checkout's root, `import selfe` steers `kernels` to the installed package (selfe.utils.checkout)."""
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("no installed `kernels` distribution for the kernels/ folder to hide")
    # engine/ and train/ shadow nothing installed; they stay reachable from the root, as any folder there.
    assert "kernels" not in _bare_names_inside_repo(ROOT, prelude="import selfe; ")
    code = "import selfe, transformers.integrations.hub_kernels, selfe.kernels.dispatch; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
    # A bench script runs with bench/ first on sys.path, next to bench/kernels.py.
    code = f"import sys; sys.path.insert(0, {str(ROOT / 'bench')!r}); {code}"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "selfe":  # `from selfe import x` names submodules (or the compiled selfe._C)
                names.update(f"selfe.{alias.name}" for alias in node.names)
            else:
                names.add(node.module)
                # `from selfe.method import condition_tree` imports the submodule, not just the package
                names.update(f"{node.module}.{alias.name}" for alias in node.names if node.module.startswith("selfe"))
    return names


# The engine's rooms and the layers around them, lowest first: a module may import its own layer and those below.
# selfe.shapes sits above the trainer (its data writer builds a cache with it); the commands dispatch to all.
LAYERS = ["kernels", "utils", "network", "components", "method", "sampling", "train", "shapes", "commands"]
COMMANDS = {"selfe.cli", "selfe.generate", "selfe"}  # `selfe` itself: the lazy facade of every public name


def _layer(module: str) -> str | None:
    if module.startswith("selfe.kernels") or module == "selfe._C":  # _C: the compiled kernels of csrc/
        return "kernels"
    if module in COMMANDS:
        return "commands"
    parts = module.split(".")
    if parts[0] != "selfe":
        return None
    if parts[1] in LAYERS:
        return parts[1]
    return "commands"  # `from selfe import PublicName`: the facade


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    parts = [FOLDERS[rel.parts[0]], *rel.with_suffix("").parts[1:]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _selfe_modules() -> dict[str, Path]:
    return {_module_name(path): path for folder in FOLDERS for path in sorted((ROOT / folder).rglob("*.py"))}


def test_every_module_sits_in_a_room():
    """engine/ holds only the rooms, the package's __init__ and the commands: no loose module at its top."""
    for name in _selfe_modules():
        assert _layer(name) is not None, name
    loose = sorted(p.name for p in (ROOT / "engine").glob("*.py"))
    assert loose == ["__init__.py", "cli.py", "generate.py"], loose


def test_dependency_direction_and_namespace():
    problems = []
    for name, path in _selfe_modules().items():
        own = LAYERS.index(_layer(name))
        for imported in _imports(path):
            if imported.split(".")[0] in FOLDERS:
                problems.append(f"{path.relative_to(ROOT)} imports bare {imported!r}; use selfe.*")
            layer = _layer(imported)
            if name == "selfe" and imported.startswith("selfe.utils"):
                continue  # the package's __init__ installs the checkout's import finder before anything else
            if layer and LAYERS.index(layer) > own:
                problems.append(f"{path.relative_to(ROOT)} ({_layer(name)}) imports {imported} ({layer})")
    assert not problems, "\n".join(problems)


def test_import_graph_has_no_cycle():
    """Lazy imports included: a cycle between modules is a design smell even where Python would tolerate it."""
    modules = _selfe_modules()
    graph = {}
    for name, path in modules.items():
        targets = set()
        for imported in _imports(path):
            # `from selfe.a import b` may name the submodule selfe.a.b
            if imported not in modules:
                continue  # a class or function of a module, or another distribution
            if imported != name and imported != "selfe":
                targets.add(imported)
        graph[name] = targets
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles
