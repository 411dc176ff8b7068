"""The import contract: imports run downhill, read from the source (``ast``), not by importing.

    jobs -> cli/report -> tune -> sequence -> training/evaluation -> benchmarks -> registry/tracking -> moram

A module may import its own layer and the layers below it, never one above (a lazy import
inside a function counts: it is the same dependency, only later). The method library
``moram`` imports nothing of the platform and none of its services (Ray, DeepSpeed, MLflow,
boto3). No two modules import each other, directly or round a circle, outside
``if TYPE_CHECKING:`` (a circle is one module in two files). A benchmark's package is imported
only by itself and the benchmark table (``moram_platform.benchmark.BENCHMARKS``).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from fixtures.paths import PROJECT_ROOT

PLATFORM = PROJECT_ROOT / "platform" / "moram_platform"

# Top first. Each entry: the platform modules (a package stands for everything in it) of a layer.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("jobs", ("jobs",)),
    ("cli/report", ("moram_platform.cli", "moram_platform.report", "moram_platform.serving",
                    "moram_platform.config_reference", "moram_platform.stack", "moram_platform.exits")),
    ("tune", ("moram_platform.tune",)),
    ("sequence", ("moram_platform.sequence",)),
    ("training/evaluation", ("moram_platform.training", "moram_platform.evaluation", "moram_platform.ray_train",
                             "moram_platform.engine", "moram_platform.generation",
                             "moram_platform.routing_diagnostics", "moram_platform.runs", "moram_platform.cluster")),
    ("benchmarks", ("moram_platform.benchmark", "moram_platform.trace", "moram_platform.xtail",
                    "moram_platform.config", "moram_platform.causal_lm", "moram_platform.preflight")),
    ("registry/tracking", ("moram_platform.registry", "moram_platform.tracking", "moram_platform.plots",
                           "moram_platform.console", "moram_platform.sections", "moram_platform.schedule",
                           "moram_platform.names", "moram_platform.credentials", "moram_platform.testing", "moram_platform")),
    ("moram", ("moram",)),
]
BENCHMARK_PACKAGES = ("moram_platform.trace", "moram_platform.xtail")
SERVICES = ("ray", "deepspeed", "mlflow", "boto3", "botocore")
# Circles kept on purpose, each with its reason.
KNOWN_CIRCLES = {
    # MoRAMModel.save_pretrained / .from_pretrained are PEFT's method-style API over the functions
    # of moram.pretrained, which build a MoRAMModel: one API in two files, imported lazily.
    frozenset({"moram.model", "moram.pretrained"}),
}


def _sources() -> dict[str, Path]:
    """module name -> file, for jobs/, moram/ and moram_platform/."""
    found = {}
    for root, prefix in ((PROJECT_ROOT / "moram", "moram"), (PLATFORM, "moram_platform"), (PROJECT_ROOT / "jobs", "jobs")):
        for path in sorted(root.rglob("*.py")):
            parts = [prefix, *path.relative_to(root).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


SOURCES = _sources()


def _imports(module: str, path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside ``if TYPE_CHECKING:``) for every import of the file,
    relative ones resolved; ``from pkg import name`` counts as ``pkg.name`` when that is a module."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    typing_only = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(block.test) for node in ast.walk(block)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if module.startswith("jobs") and base == "_cli":
                base = "jobs._cli"
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in SOURCES else base for alias in node.names]
        else:
            continue
        found += [(name, node.lineno, id(node) in typing_only) for name in dict.fromkeys(names)]
    return found


def _layer(module: str) -> int | None:
    """Index in LAYERS of the most specific entry naming ``module`` (or a package above it)."""
    best = None
    for index, (_, members) in enumerate(LAYERS):
        for member in members:
            inside = module.startswith(member + ".") and member != "moram_platform"   # a new module: place it
            if (module == member or inside) and (best is None or len(member) > best[1]):
                best = (index, len(member))
    return None if best is None else best[0]


def _own(name: str) -> str | None:
    """The project module ``name`` is (or lies in), else None (a third-party import)."""
    while name and name not in SOURCES:
        name = name.rpartition(".")[0]
    return name or None


def test_every_module_has_a_layer():
    missing = [module for module in SOURCES if _layer(module) is None]
    assert not missing, f"add these modules to a layer of LAYERS: {missing}"


def test_imports_run_downhill():
    upward = []
    for module, path in SOURCES.items():
        for name, line, _ in _imports(module, path):
            target = _own(name)
            if target is not None and None not in (_layer(target), _layer(module)) and _layer(target) < _layer(module):
                upward.append(f"{path.relative_to(PROJECT_ROOT)}:{line}: {module} ({LAYERS[_layer(module)][0]}) "
                              f"imports {target} ({LAYERS[_layer(target)][0]})")
    assert not upward, "imports that run uphill:\n" + "\n".join(upward)


def test_the_method_library_imports_no_platform_and_no_service():
    found = [f"{path.relative_to(PROJECT_ROOT)}:{line}: {name}"
             for module, path in SOURCES.items() if module.split(".")[0] == "moram"
             for name, line, _ in _imports(module, path)
             if name.split(".")[0] in ("moram_platform", "jobs", *SERVICES)]
    assert not found, "moram/ must stay plain PyTorch:\n" + "\n".join(found)


def test_no_import_circles():
    graph = {module: {_own(name) for name, _, typing_only in _imports(module, path) if not typing_only} - {None, module}
             for module, path in SOURCES.items()}
    for module in graph:   # a package's own __init__ re-exporting its modules is not a circle
        graph[module] = {t for t in graph[module] if not (module.startswith(t + ".") and SOURCES[t].name == "__init__.py")}
    circles, state = [], {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                circle = trail[trail.index(target):]
                if frozenset(circle) not in KNOWN_CIRCLES:
                    circles.append(" -> ".join(circle + [target]))
            elif target not in state:
                visit(target, trail + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_benchmark_packages_are_imported_only_by_themselves_and_the_table():
    found = []
    for module, path in SOURCES.items():
        for name, line, _ in _imports(module, path):
            target = _own(name) or ""
            package = next((p for p in BENCHMARK_PACKAGES if target == p or target.startswith(p + ".")), None)
            if package and not (module == package or module.startswith(package + ".")):
                found.append(f"{path.relative_to(PROJECT_ROOT)}:{line}: {module} imports {target}")
    assert not found, ("a benchmark is reached through moram_platform.benchmark (its protocol and BENCHMARKS), "
                       "not imported by name:\n" + "\n".join(found))


@pytest.mark.parametrize("module", ["moram_platform.report", "moram_platform.tune.study", "moram_platform.config"])
def test_the_modules_of_this_contract_exist(module):
    assert module in SOURCES   # a rename must update LAYERS, not silently drop the check


# -- packaging: `pip install` of the library is what moram/ imports -------------------------------
LIBRARY_DEPENDENCIES = {"torch", "transformers", "safetensors", "pydantic"}
# what moram/ may import beyond them: the standard library, transformers' own hub client, and
# triton where a GPU build has it (moram.kernels imports it only when asked, and says so)
LIBRARY_MAY_IMPORT = LIBRARY_DEPENDENCIES | {"huggingface_hub", "triton"}


def _requirement_names(requirements: list[str]) -> set[str]:
    import re

    return {re.split(r"[\[<>=!~; ]", line, maxsplit=1)[0].lower().replace("_", "-") for line in requirements}


def test_the_library_installs_with_torch_transformers_safetensors_pydantic_only():
    import sys
    import tomllib

    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    assert _requirement_names(project["dependencies"]) == LIBRARY_DEPENDENCIES
    assert "ray" in _requirement_names(project["optional-dependencies"]["platform"])   # the platform is an extra
    imported = {name.split(".")[0] for module, path in SOURCES.items() if module.split(".")[0] == "moram"
                for name, _, _ in _imports(module, path)}
    outside = sorted(imported - LIBRARY_MAY_IMPORT - set(sys.stdlib_module_names) - {"moram"})
    assert not outside, f"moram/ imports {outside}: not in the library's dependencies (pyproject.toml)"
