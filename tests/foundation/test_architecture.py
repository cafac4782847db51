"""The house: layers point down, no import cycles, imports at the top of modules.

The layer and cycle contracts are in pyproject.toml (``[tool.importlinter]``); the
picture they enforce is in docs/architecture.md.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: Modules that may be imported inside a function, and why. Everything else is
#: imported at the top of its module, so that who imports whom is plain to read.
LATE_IMPORTS = {
    "xformers": "an optional GPU dependency",
    "torch.utils.tensorboard": "optional (train.tensorboard); the run warns when it is missing",
    "torch.nn.attention.flex_attention": "compiled on first use; registering a plugin stays cheap",
    "torch_fidelity": "the optional [eval] extra (FID's Inception); its package also imports torchvision",
    "varkit": "the root facade loads the front door on first use, so a plugin's `import varkit` stays light",
    "huggingface_hub": "optional (the hub extra): only loading a model by Hub repository id needs it",
}


def test_import_linter_contracts_are_kept():
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run(
        [str(lint), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def _late_imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for func in ast.walk(tree):
        if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(func):
            if isinstance(node, ast.Import):
                found += [(node.lineno, alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                found.append((node.lineno, node.module or ""))
    return found


def _allowed(module: str) -> bool:
    return any(module == m or module.startswith(m + ".") for m in LATE_IMPORTS)


def test_imports_inside_functions_have_a_stated_reason():
    offenders = []
    for package in (ROOT / "varkit", ROOT / "plugins" / "varkit_plugins"):
        for path in sorted(package.rglob("*.py")):
            for line, module in _late_imports(path):
                if not _allowed(module):
                    offenders.append(f"{path.relative_to(ROOT)}:{line}: {module}")
    assert not offenders, (
        "imports inside functions without a reason in LATE_IMPORTS (move them to the top of the "
        "module, or add the module with its reason):\n" + "\n".join(offenders)
    )
