"""The package's layering: imports between memlm's subpackages form no cycle and only go down, and the
benchmark harness (memlm_bench) sits outside: memlm imports it only inside the CLI's command functions."""

import ast
from pathlib import Path

import memlm

PACKAGE = Path(memlm.__file__).parent

LAYERS = [
    {"config", "fileio", "device", "tables", "compile_modes", "flops"},
    {"protocols", "state"},
    {"nn"},
    {"memory"},
    {"model"},
    {"decode"},
    {"data", "eval", "tasks", "memorize", "train", "serve"},
    {"cli", "hf", "lm_eval_harness", "__main__"},
]
"""Bottom to top. A subpackage may import its own layer (if no cycle forms) and the layers below."""


def part_of(module: str) -> str | None:
    """'memlm.nn.attention' -> 'nn'; None for the root package and names outside memlm."""
    parts = module.split(".")
    return parts[1] if parts[0] == "memlm" and len(parts) > 1 else None


def import_edges() -> set[tuple[str, str]]:
    """(importer, imported) subpackage pairs, from every import statement, lazy ones included."""
    edges = set()
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        source = part_of(".".join(relative.parts))
        if source in (None, "__init__"):  # memlm/__init__.py: the public API, which names every layer
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            for name in names:
                target = part_of(name)
                if target is not None and target != source and (PACKAGE / target).exists() | (
                        PACKAGE / f"{target}.py").exists():
                    edges.add((source, target))
    return edges


def layer_of(part: str) -> int:
    for i, layer in enumerate(LAYERS):
        if part in layer:
            return i
    raise AssertionError(f"memlm.{part} is in no layer of tests/test_architecture.py: place it")


def test_imports_only_go_down_the_layers():
    upward = sorted((a, b) for a, b in import_edges() if layer_of(b) > layer_of(a))
    assert upward == [], f"imports that go up the layers: {upward}"


def test_nn_knows_nothing_of_memory():
    edges = import_edges()
    assert ("nn", "memory") not in edges and ("nn", "model") not in edges


def test_the_import_graph_between_subpackages_is_acyclic():
    edges = import_edges()
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
    visiting, done = set(), set()

    def visit(node: str, path: list[str]) -> None:
        if node in done:
            return
        assert node not in visiting, f"import cycle: {' -> '.join(path + [node])}"
        visiting.add(node)
        for nxt in graph.get(node, ()):
            visit(nxt, path + [node])
        visiting.discard(node)
        done.add(node)

    for node in list(graph):
        visit(node, [])
    assert len(edges) > 10  # the walk saw the package's imports


def module_level_imports(tree: ast.Module) -> list[ast.AST]:
    """The import statements a module runs when it is imported: those outside function bodies."""
    found, todo = [], list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            todo.extend(ast.iter_child_nodes(node))
    return found


def imports_harness(node: ast.AST) -> bool:
    names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
    return any(name.split(".")[0] == "memlm_bench" for name in names)


def test_memlm_imports_the_harness_only_inside_cli_functions():
    lazy = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        eager = [node.lineno for node in module_level_imports(tree) if imports_harness(node)]
        assert eager == [], f"{path.relative_to(PACKAGE.parent)} imports memlm_bench at module level (lines {eager})"
        every = [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]
        if any(imports_harness(node) for node in every):
            lazy.append(path.relative_to(PACKAGE).as_posix())
    assert lazy and all(name.startswith("cli/") for name in lazy), lazy  # the bench and race commands only


def test_cli_is_the_top_layer():
    assert LAYERS[-1] == {"cli", "hf", "lm_eval_harness", "__main__"}
    assert [(a, b) for a, b in import_edges() if b == "cli"] == [("__main__", "cli")]  # only `python -m memlm`
    # the Hugging Face bridge: only its command and the lm-evaluation-harness model (which loads exports)
    assert {a for a, b in import_edges() if b == "hf"} <= {"cli", "lm_eval_harness"}


def imports_transformers(node: ast.AST) -> bool:
    names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
    return any(name.split(".")[0] == "transformers" for name in names)


def test_only_the_hf_remote_code_imports_transformers():
    """memlm imports transformers only in memlm/hf's remote-code modules (copied into every export),
    which nothing of memlm imports: exporting and memlm.from_pretrained need no transformers."""
    importers = set()
    for path in PACKAGE.rglob("*.py"):
        if any(imports_transformers(node) for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, (ast.Import, ast.ImportFrom))):
            importers.add(path.relative_to(PACKAGE).as_posix())
    remote = {"hf/configuration_memlm.py", "hf/modeling_memlm.py", "hf/tokenization_memlm.py"}
    assert importers == remote
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
                stems = {name.split(".")[-1] for name in names if name.startswith("memlm.hf")}
                assert not stems & {f.split("/")[1][:-3] for f in remote}, f"{path} imports the remote code"
