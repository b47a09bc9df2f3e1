"""memlm_bench is built on memlm's public names only: it imports no private name (nor a private
module) of memlm and reads no private attribute of what it imports from memlm."""

import ast
from pathlib import Path

import memlm_bench

PACKAGE = Path(memlm_bench.__file__).parent


def private_uses(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    from_memlm: set[str] = set()  # local names bound to memlm modules or objects
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "memlm":
            found += [f"{node.module}" for part in node.module.split(".") if part.startswith("_")]
            for alias in node.names:
                if alias.name.startswith("_"):
                    found.append(f"{node.module}.{alias.name}")
                from_memlm.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "memlm":
                    found += [alias.name for part in alias.name.split(".") if part.startswith("_")]
                    from_memlm.add((alias.asname or alias.name).split(".")[0])
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in from_memlm:
                found.append(f"{ast.unparse(node)} (line {node.lineno})")
    return [f"{path.relative_to(PACKAGE)}: {use}" for use in found]


def test_the_harness_uses_only_memlms_public_names():
    files = sorted(PACKAGE.rglob("*.py"))  # subpackages (memlm_bench.ablate) included
    assert len(files) > 10 and any(path.parent.name == "ablate" for path in files)
    assert [use for path in files for use in private_uses(path)] == []
