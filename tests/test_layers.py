"""The import graph of ddim_plus/: one-way layers and no circles.

The floors, lowest first: 1 the paper's equations; 2 the scheduler, image I/O, the bundled digits, the version;
3 solvers over the scheduler and the trainer's building blocks; 4 pipelines and the Hub; 5 evaluation; 6 the trainer
and the command line. A module imports its own floor and those below. Every import is read with `ast`, those inside
functions included, so a deferred import cannot hide a circle. Only the tops import the package root
(`ddim_plus/__init__.py`, which imports every pipeline to register them with diffusers).
"""

import ast
import sys

from conftest import REPO_ROOT

PACKAGE = "ddim_plus"
ROOT = PACKAGE  # the package's __init__
# Floor of every module, lowest first. A new module gets a row here.
LAYERS = {
    "ddim_plus.ddim_math": 1,
    "ddim_plus._version": 2,
    "ddim_plus.scheduling_ddim_plus": 2,
    "ddim_plus.images": 2,
    "ddim_plus.digits": 2,
    "ddim_plus.inversion": 3,
    "ddim_plus.timestep_tuning": 3,
    "ddim_plus.sampler_tuning": 3,
    "ddim_plus.training": 3,
    "ddim_plus.training.data": 3,
    "ddim_plus.training.loss": 3,
    "ddim_plus.training.ema": 3,
    "ddim_plus.training.checkpoints": 3,
    "ddim_plus.pipeline_utils": 4,
    "ddim_plus.pipeline_ddim_plus": 4,
    "ddim_plus.pipeline_ddim_inversion": 4,
    "ddim_plus.hub": 4,
    "ddim_plus.evaluation": 5,
    "ddim_plus.evaluation.digits": 5,
    "ddim_plus.evaluation.fid": 5,
    "ddim_plus.evaluation.gmm": 5,
    "ddim_plus.evaluation.quality": 5,
    "ddim_plus.evaluation.reconstruction": 5,
    "ddim_plus.evaluation.sampling": 5,
    "ddim_plus.train": 6,
    # the trainer's flags and its outputs (export, card, report): parts of the trainer, beside it at the top
    "ddim_plus.training.args": 6,
    "ddim_plus.training.outputs": 6,
    "ddim_plus.cli": 6,
    ROOT: 6,
}
# The only modules that may import the package root.
TOPS = {"ddim_plus.train", "ddim_plus.cli"}


def module_files():
    """{module name: path} for every .py file of the package."""
    files = {}
    for path in sorted((REPO_ROOT / PACKAGE).rglob("*.py")):
        parts = path.relative_to(REPO_ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        files[name] = path
    return files


def imported_modules(name, source, modules, is_package=False):
    """The package's modules that module `name` (its code `source`) imports anywhere, as (line, module) pairs."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            # `from X import Y` imports the submodule X.Y when there is one, else a name defined in X.
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
        else:
            continue
        for target in targets:
            # `import ddim_plus.x.y` binds the package but loads ddim_plus.x.y: the module is what counts.
            while target not in modules and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in modules and target != name:
                found.append((node.lineno, target))
    return found


def import_graph():
    modules = module_files()
    graph = {
        name: imported_modules(name, path.read_text(encoding="utf-8"), modules, path.name == "__init__.py")
        for name, path in modules.items()
    }
    return modules, graph


def test_every_module_has_a_layer():
    modules, _ = import_graph()
    missing = sorted(set(modules) - set(LAYERS))
    assert not missing, f"add these modules to LAYERS in tests/test_layers.py: {missing}"


def test_no_module_imports_a_layer_above_it_or_the_package_root():
    modules, graph = import_graph()
    wrong = []
    for name, imports in graph.items():
        for line, target in imports:
            where = f"{modules[name].relative_to(REPO_ROOT)}:{line}: {name} (layer {LAYERS.get(name)})"
            if target == ROOT and name not in TOPS:
                wrong.append(f"{where} imports the package root; import from the defining module")
            elif LAYERS.get(target, 0) > LAYERS.get(name, sys.maxsize):
                wrong.append(f"{where} imports {target} (layer {LAYERS[target]})")
    assert not wrong, "imports that go up the layers:\n" + "\n".join(wrong)


def test_training_building_blocks_never_import_evaluation():
    _, graph = import_graph()
    wrong = [
        f"{name} imports {target}"
        for name, imports in graph.items()
        if LAYERS.get(name) == LAYERS["ddim_plus.training"] and name.startswith("ddim_plus.training")
        for _, target in imports
        if target.startswith("ddim_plus.evaluation")
    ]
    assert not wrong, wrong


def find_cycle(graph):
    """One import circle of `graph` as a list of modules (first == last), or None."""
    state = {}  # 1: on the current path, 2: done
    path = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for _, target in graph.get(node, []):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_no_import_circle():
    _, graph = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_checks_catch_a_circle_and_a_deferred_import():
    assert find_cycle({"a": [(1, "b")], "b": [(2, "c")], "c": [(3, "a")], "d": [(4, "a")]}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": [(1, "b")], "b": [], "c": [(1, "a")]}) is None
    modules = module_files()
    source = "\n".join(
        [
            "import torch",
            "def f():",
            "    from .evaluation.fid import FrechetDistance",
            "    from . import hub, __version__",
        ]
    )
    found = sorted(target for _, target in imported_modules("ddim_plus.images", source, modules))
    assert found == ["ddim_plus", "ddim_plus.evaluation.fid", "ddim_plus.hub"]
    source = "from ..images import make_grid\nimport ddim_plus.evaluation.fid\n"
    found = sorted(target for _, target in imported_modules("ddim_plus.training.data", source, modules))
    assert found == ["ddim_plus.evaluation.fid", "ddim_plus.images"]
