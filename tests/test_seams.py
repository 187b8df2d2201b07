"""The import table of ../shared/DESIGN.md, enforced: each module imports only what its layer may."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "stablediff"

# module (path prefix relative to the package) -> imports it must not make
FORBIDDEN = {
    "nn.py": ("stablediff.",),
    "models/": ("stablediff.diffusion", "stablediff.weights", "stablediff.pipeline", "stablediff.loading", "PIL"),
    "tokenizer.py": ("torch", "stablediff."),
    "diffusion/": ("stablediff.models", "stablediff.weights", "stablediff.pipeline", "PIL"),
    "weights/": ("stablediff.models", "stablediff.pipeline", "stablediff.presets", "stablediff.diffusion"),
    "pipeline.py": ("stablediff.cli", "stablediff.web", "stablediff.train"),
    "params.py": ("stablediff.cli", "stablediff.web", "stablediff.train"),
    "prompts.py": ("stablediff.cli", "stablediff.web", "stablediff.train", "stablediff.models"),
    "image.py": ("stablediff.cli", "stablediff.web", "stablediff.train", "stablediff.models"),
    "cli.py": ("stablediff.models", "stablediff.weights.convert"),
    "train/": ("stablediff.cli", "stablediff.web"),  # the pipeline object is public API: samples, export
}


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def test_import_seams():
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        for prefix, forbidden in FORBIDDEN.items():
            if rel.startswith(prefix):
                bad = [n for n in _imports(path) if any(n == f.rstrip(".") or n.startswith(f) for f in forbidden)]
                violations += [f"{rel} imports {n}" for n in bad]
    print(f"checked {len(list(PACKAGE.rglob('*.py')))} modules")
    assert not violations, violations


def test_library_has_no_print():
    offenders = [
        f"{p.relative_to(PACKAGE)}:{i}"
        for p in PACKAGE.rglob("*.py")
        if p.name != "cli.py"
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if line.lstrip().startswith("print(")
    ]
    assert not offenders, offenders
