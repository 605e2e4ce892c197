"""The import direction of the house (docs/architecture.md): each package imports only from
the layers below it, so a lower box never depends on a higher one and there are no cycles.

    kernels, files, procinfo, dtypes, devices, hardware, resources   (import no other qlora package)
    quant -> optim -> config -> nn, data -> models, memory -> adapters -> train
    -> recipe, generate, export -> demo -> cli and the package's public API (qlora/__init__.py)
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "qlora"

LAYERS: list[set[str]] = [
    {"kernels", "files", "procinfo", "dtypes", "devices", "hardware", "resources"},
    {"quant"},
    {"optim"},
    {"config"},
    {"nn", "data"},
    {"models", "memory"},
    {"adapters"},
    {"train"},
    {"recipe", "generate", "export"},
    {"demo", "serve"},
    {"cli", "__init__", "__main__"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _imports(path: Path) -> set[str]:
    """The top-level qlora packages that ``path`` imports (absolute or relative)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
            if node.module == "qlora":
                names = [f"qlora.{a.name}" for a in node.names]
        else:
            continue
        found |= {n.split(".")[1] for n in names if n.startswith("qlora.")}
    return found


def _package(path: Path) -> str:
    return path.relative_to(SRC).parts[0].removesuffix(".py")


def test_every_module_belongs_to_a_layer() -> None:
    unknown = {_package(p) for p in SRC.rglob("*.py")} - set(RANK)
    assert not unknown, f"add {sorted(unknown)} to LAYERS here and to docs/architecture.md"


def test_no_module_imports_a_higher_or_a_peer_layer() -> None:
    upward = []
    for path in sorted(SRC.rglob("*.py")):
        own = _package(path)
        for target in _imports(path) - {own}:
            if (
                target in RANK
                and RANK[target] >= RANK[own]
                and own not in ("cli", "__init__", "__main__")
            ):
                upward.append(f"{path.relative_to(SRC)} imports qlora.{target}")
    assert not upward, "imports against the layering:\n" + "\n".join(upward)


def test_no_relative_imports() -> None:
    """Absolute imports only, so the check above sees every dependency."""
    relative = [
        str(p.relative_to(SRC))
        for p in SRC.rglob("*.py")
        if any(
            isinstance(n, ast.ImportFrom) and n.level for n in ast.walk(ast.parse(p.read_text()))
        )
    ]
    assert not relative, relative
