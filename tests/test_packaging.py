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


def test_installed_kernels_wins_over_the_kernels_folder_from_the_repo_root():
    """From the checkout's root, `import selfe` steers `kernels` to the installed package (selfe.checkout)."""
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
    return names


def _layer(module: str) -> str | None:
    if module.startswith("selfe.kernels") or module == "selfe._C":  # _C: the compiled kernels of csrc/
        return "kernels"
    if module.startswith("selfe.train"):
        return "train"
    if module == "selfe" or module.startswith("selfe."):
        return "engine"
    return None


def test_dependency_direction_and_namespace():
    allowed = {"kernels": {"kernels"}, "engine": {"kernels", "engine"}, "train": {"kernels", "engine", "train"}}
    problems = []
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name == "cli.py" and folder == "engine":
                continue  # the command line dispatches to every layer, lazily
            for name in _imports(path):
                root = name.split(".")[0]
                if root in FOLDERS:
                    problems.append(f"{path.relative_to(ROOT)} imports bare {name!r}; use selfe.*")
                layer = _layer(name)
                if layer and layer not in allowed[folder]:
                    problems.append(f"{path.relative_to(ROOT)} ({folder}) imports {name} ({layer})")
    assert not problems, "\n".join(problems)
