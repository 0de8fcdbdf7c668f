"""The package's import graph, read from the source: no import circle anywhere (an import inside a
function or under TYPE_CHECKING counts too), and imports flow one way, rl -> model -> kernels.

A module's imports are every `import score.x` / `from score.x import y` / relative import in it; a
name imported from a package that is one of its submodules counts as that submodule. A module
importing its own package's `__init__` is not an edge (Python runs the parent first anyway)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"kernels": "score.kernels", "model": "score.model", "rl": "score.rl"}


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join((package, *parts))
            found[name.removesuffix(".__init__")] = path
    return found


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    is_package = path.name == "__init__.py"
    here = name if is_package else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.rsplit(".", node.level - 1)[0] if node.level > 1 else here
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            for alias in node.names:  # `from package import submodule`
                targets.add(f"{module}.{alias.name}" if f"{module}.{alias.name}" in known else module)
    ours = {t for t in targets if t in known}
    return {t for t in ours if not (name.startswith(t + ".") and known[t].name == "__init__.py")}


def test_no_module_imports_itself_back():
    known = modules()
    graph = {name: imports_of(name, path, known) for name, path in known.items()}
    state, circles = {}, []

    def visit(name, stack):
        state[name] = "open"
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                circles.append(" -> ".join([*stack[stack.index(target) :], target]))
            elif target not in state:
                visit(target, [*stack, target])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_imports_flow_from_rl_to_model_to_kernels():
    known = modules()
    allowed = {"score.kernels": ("score.kernels",), "score.model": ("score.model", "score.kernels")}
    wrong = []
    for name, path in known.items():
        for package, may in allowed.items():
            if name == package or name.startswith(package + "."):
                wrong += [f"{name} imports {t}" for t in imports_of(name, path, known) if not t.startswith(may)]
    assert not wrong, "\n".join(wrong)


def test_the_graph_sees_relative_and_nested_imports():
    known = modules()
    engine = imports_of("score.model.engine.engine", known["score.model.engine.engine"], known)
    assert {"score.model.model", "score.model.engine.inference_model", "score.kernels.dispatch"} <= engine
    assert "score.model.engine.onednn" in imports_of(
        "score.model.engine.inference_model", known["score.model.engine.inference_model"], known
    )


def test_the_checkpoint_store_and_the_parallel_seam_do_not_import_each_other_both_ways():
    known = modules()
    reach = {
        package: {t for n, p in known.items() if n.startswith(package + ".") for t in imports_of(n, p, known)}
        for package in ("score.rl.checkpoints", "score.rl.parallel")
    }
    assert not any(t.startswith("score.rl.parallel") for t in reach["score.rl.checkpoints"])
