"""The import table of docs/architecture.md, enforced on the source (read with `ast`, never imported).

Every `import` anywhere in a module counts, deferred ones inside functions and under `if TYPE_CHECKING:`
too: no module of src/stablediff may sit on an import cycle, and each layer imports only what its row of
the table allows. The cycle finder is itself tested on the fixture packages in tests/fixtures/seams/.
"""

from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "stablediff"
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "seams"

_SHARED = ("stablediff.cli", "stablediff.train", "stablediff.eval")
ADDON_STAGES = ("stablediff.train.stages.lora", "stablediff.train.stages.embedding")  # subclass stages.unet
# (modules: a dotted prefix, or `P.*` for each module under P; imports they must not make; modules exempted).
# A forbidden name covers that module and every module under it; torch and PIL are matched by import name.
RULES: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("stablediff.nn", ("stablediff",), ()),
    (
        "stablediff.models",
        (
            "stablediff.diffusion",
            "stablediff.weights",
            "stablediff.pipeline",
            "stablediff.loading",
            "stablediff.tiling",
            "stablediff.memory",
            "PIL",
        ),
        (),
    ),
    # tiled VAE passes work on the models' types; the estimate before a run reads configs only
    ("stablediff.tiling", ("stablediff.pipeline", "stablediff.loading", "stablediff.weights", *_SHARED, "PIL"), ()),
    ("stablediff.memory", ("stablediff.pipeline", "stablediff.loading", "stablediff.weights", *_SHARED, "PIL"), ()),
    ("stablediff.tokenizer", ("torch", "stablediff"), ()),
    ("stablediff.diffusion", ("stablediff.models", "stablediff.weights", "stablediff.pipeline", "PIL"), ()),
    (
        "stablediff.weights",
        ("stablediff.models", "stablediff.pipeline", "stablediff.presets", "stablediff.diffusion"),
        (),
    ),
    (
        "stablediff.shapes",
        ("stablediff.train", "stablediff.eval", "stablediff.pipeline", "stablediff.loading", "torch"),
        (),
    ),
    ("stablediff.pipeline", _SHARED, ()),
    ("stablediff.loading", _SHARED, ()),
    # the file layouts loading reads and writes: they hand weights back and never build the pipeline
    ("stablediff.single_file", (*_SHARED, "stablediff.pipeline", "stablediff.loading"), ()),
    ("stablediff.diffusers_folder", (*_SHARED, "stablediff.pipeline", "stablediff.loading"), ()),
    ("stablediff.scheduler_config", (*_SHARED, "stablediff.pipeline", "stablediff.loading", "stablediff.models"), ()),
    ("stablediff.params", _SHARED, ()),
    ("stablediff.prompts", (*_SHARED, "stablediff.models", "stablediff.embeddings"), ()),  # sees a Protocol
    (
        "stablediff.embeddings",
        (
            *_SHARED,
            "stablediff.models",
            "stablediff.diffusion",
            "stablediff.pipeline",
            "stablediff.loading",
            "stablediff.tokenizer",
            "PIL",
        ),
        (),
    ),
    ("stablediff.image", (*_SHARED, "stablediff.models"), ()),
    # LoRAs: files, names and hooks on the networks; the pipeline uses it, never the other way
    (
        "stablediff.lora",
        (
            *_SHARED,
            "stablediff.pipeline",
            "stablediff.loading",
            "stablediff.diffusion",
            "stablediff.presets",
            "stablediff.serve",
            "PIL",
        ),
        (),
    ),
    ("stablediff.eval", ("stablediff.train",), ()),
    ("stablediff.train", ("stablediff.eval", "stablediff.cli"), ("stablediff.train.recipe",)),  # recipe evaluates
    # a stage imports neither another stage, nor the registry package, nor the trainer or the recipes
    # (the add-on stages build on the U-Net stage: test_addon_stages_build_only_on_the_unet_stage)
    (
        "stablediff.train.stages.*",
        ("stablediff.train.stages", "stablediff.train.trainer", "stablediff.train.recipe"),
        ADDON_STAGES,
    ),
    ("stablediff.cli", ("stablediff.models", "stablediff.weights.convert"), ()),
    # a list of params: no model, no pipeline, no torch
    ("stablediff.prompt_list", (*_SHARED, "stablediff.pipeline", "stablediff.loading", "torch"), ()),
    (
        "stablediff.serve",
        ("stablediff.models", "stablediff.weights", "stablediff.diffusion", "stablediff.train", "stablediff.eval"),
        (),
    ),
)


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def modules(root: Path) -> dict[str, Path]:
    """Dotted name -> file of every module of the package at `root` (a package's __init__ is its own name)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = (root.name, *path.relative_to(root).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(root: Path) -> dict[str, set[str]]:
    """Module -> every name it imports; `from X import Y` means X.Y when that is a module of the package."""
    mods = modules(root)
    graph = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                    base = f"{anchor}.{base}" if base else anchor
                subs = [f"{base}.{alias.name}" for alias in node.names]
                targets.update(sub if sub in mods else base for sub in subs)
        graph[name] = targets
    return graph


def internal_graph(root: Path) -> dict[str, set[str]]:
    """The import graph restricted to the package's own modules."""
    graph = imports(root)
    return {name: {t for t in targets if t in graph} for name, targets in graph.items()}


def cycles(graph: dict[str, set[str]]) -> list[str]:
    """One shortest cycle `a -> b -> a` through each module that can reach itself, until all such are named.

    A module reaches itself exactly when it lies in a strongly connected component with a cycle (a
    self-import included), so the cycles returned name every module of every such component.
    """
    found: list[list[str]] = []
    for start in sorted(graph):
        if any(start in cycle for cycle in found):
            continue
        parent: dict[str, str] = {}
        queue = deque([start])
        while queue and start not in parent:  # breadth first: the first way back is the shortest
            node = queue.popleft()
            for nxt in sorted(graph[node]):
                if nxt not in parent:
                    parent[nxt] = node
                    queue.append(nxt)
        if start in parent:
            path = [start]
            while len(path) == 1 or path[-1] != start:
                path.append(parent[path[-1]])
            found.append(path[::-1])
    return [" -> ".join(cycle) for cycle in found]


def test_no_import_cycles():
    graph = internal_graph(PACKAGE)
    print(f"checked {len(graph)} modules, {sum(map(len, graph.values()))} imports between them")
    assert not cycles(graph), "import cycles:\n" + "\n".join(cycles(graph))


def test_cycle_finder_on_fixtures():
    assert cycles(internal_graph(FIXTURES / "cyclic")) == ["cyclic.a -> cyclic.b -> cyclic.a"]
    acyclic = internal_graph(FIXTURES / "acyclic")
    assert acyclic == {
        "acyclic": {"acyclic.util", "acyclic.core"},
        "acyclic.consts": set(),
        "acyclic.core": {"acyclic.util", "acyclic.sub.leaf", "acyclic.consts"},
        "acyclic.sub": {"acyclic.sub.leaf"},
        "acyclic.sub.leaf": {"acyclic.consts"},
        "acyclic.util": {"acyclic.sub.leaf", "acyclic.consts"},
    }
    assert cycles(acyclic) == []
    assert cycles({"x": {"x"}, "y": set()}) == ["x -> x"]


def _subjects(subject: str, names: dict[str, set[str]]) -> list[str]:
    if subject.endswith(".*"):
        return [n for n in names if n.startswith(subject[:-1])]
    return [n for n in names if _under(n, subject)]


def test_import_rules():
    graph = imports(PACKAGE)
    violations = [
        f"{name} imports {target}"
        for subject, forbidden, exempt in RULES
        for name in _subjects(subject, graph)
        if not any(_under(name, e) for e in exempt)
        for target in sorted(graph[name])
        if not _under(target, name) and any(_under(target, f) for f in forbidden)  # its own submodules are fine
    ]
    assert not violations, "forbidden imports:\n" + "\n".join(sorted(set(violations)))


def test_addon_stages_build_only_on_the_unet_stage():
    """The lora and embedding stages subclass the U-Net stage; otherwise they keep the stage rule."""
    graph = imports(PACKAGE)
    for name in ADDON_STAGES:
        stages = {t for t in graph[name] if _under(t, "stablediff.train.stages")}
        assert stages <= {"stablediff.train.stages.unet"}, f"{name} imports {sorted(stages)}"
        banned = ("stablediff.train.trainer", "stablediff.train.recipe")
        assert not [t for t in graph[name] if any(_under(t, b) for b in banned)], name


def test_rules_name_existing_modules():
    existing = set(modules(PACKAGE))
    named = {n.removesuffix(".*") for subject, forbidden, exempt in RULES for n in (subject, *forbidden, *exempt)}
    missing = sorted(n for n in named if _under(n, "stablediff") and n not in existing)
    assert not missing, f"rules name modules that do not exist under src/stablediff: {missing}"


def test_library_has_no_print():
    offenders = [
        f"{p.relative_to(PACKAGE)}:{i}"
        for p in PACKAGE.rglob("*.py")
        if p.name not in ("cli.py", "cli_addons.py")  # the command line's own modules
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if line.lstrip().startswith("print(")
    ]
    assert not offenders, offenders
