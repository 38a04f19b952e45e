"""The import layers of pipeline/ and stages/: each module imports only modules of its own layer or the
layers below it, no import cycle exists, and no stage imports another stage (stages meet through the
artifacts the runner hands them). Read from the source with ast, so a lazy import inside a function
counts too."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

# Bottom first. A module belongs to the first layer with a matching prefix ("pkg." matches the package
# and everything below it).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "config",
        (
            "pipeline.errors",
            "pipeline.batch",
            "pipeline.batches",
            "pipeline.schema",
            "pipeline.schema_quant",
            "pipeline.checks",
            "pipeline.paths",
            "pipeline.metric_keys",
            "pipeline.progress",
            "pipeline.machine",
            "pipeline.digest",
        ),
    ),
    ("engine", ("pipeline.engine", "pipeline.cache", "pipeline.measure", "pipeline.quality", "pipeline.scoring")),
    ("stages", ("stages",)),
    ("top", ("pipeline.registry", "pipeline.runner", "pipeline.validation", "pipeline.tracking", "pipeline")),
]
STAGE_HELPERS = ("stages.types", "stages.sources")  # what a stage module may import from stages/
# stages/reports/<stage>.py: the files one stage writes (tables, plots), private to that stage: stages.<stage>
# may import it; no other stage, and it imports no stage (it is checked as a stage itself).
PRIVATE_HELPERS = "stages.reports"


def _private_helper(stage: str) -> str:
    return f"{PRIVATE_HELPERS}.{stage.rpartition('.')[2]}"


def _module_name(path: Path, root: Path) -> str:
    name = ".".join(path.relative_to(root).with_suffix("").parts)
    return name.removesuffix(".__init__")


def project_modules(root: Path) -> dict[str, Path]:
    files = [*root.glob("pipeline/**/*.py"), *root.glob("stages/**/*.py")]
    return {_module_name(path, root): path for path in files}


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """Project modules `path` imports (absolute or relative, at any depth of the file)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            submodules = [f"{base}.{alias.name}" for alias in node.names]
            # `from pkg import module` imports pkg.module; `from pkg import name` imports pkg itself.
            targets = submodules if all(sub in known for sub in submodules) else [base, *submodules]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` names a.b.c, a.b and a
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def layer_of(name: str) -> int:
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes):
            return index
    raise AssertionError(f"{name} is in no layer: add it to LAYERS")


def violations(root: Path) -> list[str]:
    modules = project_modules(root)
    graph = {name: imports_of(path, name, set(modules)) for name, path in modules.items()}
    problems = []
    for name, targets in sorted(graph.items()):
        for target in sorted(targets):
            if target in ("pipeline", "stages"):
                continue  # the bare package namespaces (empty __init__ files)
            own, other = LAYERS[layer_of(name)][0], LAYERS[layer_of(target)][0]
            if layer_of(target) > layer_of(name):
                problems.append(f"{name} ({own}) imports {target} ({other}), a layer above")
            is_stage = layer_of(name) == layer_of("stages") and not name.startswith(STAGE_HELPERS)
            if is_stage and layer_of(target) == layer_of("stages") and not target.startswith(STAGE_HELPERS):
                if target.startswith(PRIVATE_HELPERS + ".") and target != _private_helper(name):
                    problems.append(f"stage {name} imports {target}, another stage's private helper")
                elif not target.startswith(PRIVATE_HELPERS):
                    problems.append(f"stage {name} imports stage {target}: pass artifacts, or move the helper down")
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as error:
        problems.append(f"import cycle: {' -> '.join(error.args[1])}")
    return problems


def test_layers_import_downward_only_and_without_cycles() -> None:
    assert violations(REPO_ROOT) == []


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        ("pipeline/schema.py", "from stages import load\n", "imports stages.load (stages), a layer above"),
        ("stages/lower.py", "from pipeline import runner\n", "imports pipeline.runner (top), a layer above"),
        ("stages/lower.py", "from stages import evaluate\n", "stage stages.lower imports stage stages.evaluate"),
        ("stages/lower.py", "from stages.reports import search\n", "stages.reports.search, another stage's private"),
        ("stages/reports/search.py", "import stages.lower\n", "stage stages.reports.search imports stage stages.lower"),
        ("pipeline/metric_keys.py", "import pipeline.schema\n", "import cycle"),
    ],
)
def test_an_upward_import_or_a_cycle_is_reported(tmp_path: Path, module: str, source: str, expected: str) -> None:
    """The check fails when it should: a copy of the tree with one bad import added."""
    for path in project_modules(REPO_ROOT).values():
        copy = tmp_path / path.relative_to(REPO_ROOT)
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_text(path.read_text())
    target = tmp_path / module
    target.write_text(source + target.read_text())
    if expected == "import cycle":  # schema must import metric_keys back for a cycle
        schema = tmp_path / "pipeline" / "schema.py"
        schema.write_text("from pipeline import metric_keys\n" + schema.read_text())
    assert any(expected in problem for problem in violations(tmp_path)), violations(tmp_path)
