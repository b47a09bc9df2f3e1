"""Mutation testing of one memlm module against its own tests, with mutmut 3.

    python scripts/mutate.py memlm.nn.positions          # or: make mutate MODULE=memlm.nn.positions
    python scripts/mutate.py memlm.nn.positions --show   # also print the diff of every survivor
    python scripts/mutate.py --list                         # the modules and the tests they answer to

mutmut changes one thing in a function at a time (an operator, a constant, an argument) and runs
the tests that reach that function; a mutant that no test notices "survives". Each module is
mutated in a scratch copy of the repository under `.mutate/<module>/` (ignored by git), so several
modules can run at once and the working tree is never touched.

A survivor that cannot change behaviour (an equivalent mutant: a default argument every caller
passes, a tile size that changes speed only) is listed with its reason in
`scripts/mutation_equivalents/<module>.txt`; the score leaves those out:

    score = killed / (mutants - equivalent)

A mutant whose function no selected test reaches counts as a survivor. The last line printed is
the module's summary; `--json` prints it as one JSON object instead.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EQUIVALENTS = ROOT / "scripts" / "mutation_equivalents"

OWN_TESTS: dict[str, list[str]] = {
    "memlm.nn.positions": ["tests/nn/test_positions.py", "tests/test_cache.py"],
    "memlm.nn.attention": ["tests/nn/test_attention.py", "tests/test_model.py", "tests/test_cache.py"],
    "memlm.nn.kernels": ["tests/nn/test_kernels.py"],
    "memlm.nn.norms": ["tests/nn/test_norms.py", "tests/test_model.py"],
    "memlm.nn.feedforward": ["tests/nn/test_feedforward.py", "tests/test_model.py"],
    "memlm.memory.adaptive_span": ["tests/memory/test_adaptive_span.py"],
    "memlm.compile_modes": ["tests/train/test_compile_modes.py"],
    "memlm.flops": ["tests/test_flops.py"],
    "memlm.memory.compressive": ["tests/memory/test_compressive.py"],
    "memlm.memory.xl": ["tests/memory/test_xl.py"],
    "memlm.memory.feedback": ["tests/memory/test_xl.py", "tests/memory/test_tokens_combined.py"],
    "memlm.memory.persistent": ["tests/memory/test_persistent.py", "tests/memory/test_xl.py",
                                 "tests/nn/test_attention.py"],
    "memlm.memory.ntm": ["tests/memory/test_ntm.py"],
    "memlm.memory.knn.attention": ["tests/memory/knn/test_knn_attention.py"],
    "memlm.memory.knn.stores": ["tests/memory/knn/test_stores.py"],
    "memlm.state": ["tests/test_state.py", "tests/memory/test_xl.py"],
    "memlm.memory.tokens": ["tests/memory/test_tokens.py", "tests/memory/test_tokens_combined.py"],
}
"""Each formula-bearing module and its own tests (files that do not exist yet are skipped)."""


def load_equivalents(module: str) -> dict[str, str]:
    """{mutant name: reason} from the module's lines `name  # reason` (blank and `#` lines skipped)."""
    path = EQUIVALENTS / f"{module}.txt"
    if not path.exists():
        return {}
    equivalents = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, reason = line.partition("#")
        equivalents[name.strip()] = reason.strip()
    return equivalents


def module_path(module: str) -> Path:
    return Path(*module.split(".")).with_suffix(".py")


def prepare(module: str, tests: list[str]) -> Path:
    """A fresh scratch copy of the package and tests under .mutate/<module>, with mutmut's config."""
    work = ROOT / ".mutate" / module
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "memlm", work / "memlm", ignore=ignore)
    shutil.copytree(ROOT / "tests", work / "tests", ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", work / "pyproject.toml")
    selection = "\n".join(f"    {t}" for t in tests)
    (work / "setup.cfg").write_text(
        "[mutmut]\n"
        "source_paths=memlm/\n"
        f"only_mutate={module_path(module)}\n"
        f"pytest_add_cli_args_test_selection=\n{selection}\n"
        "pytest_add_cli_args=\n    -p\n    no:cacheprovider\n    -q\n"
        "process_isolation=forkserver\n")
    return work


def results(work: Path, mutmut: str) -> dict[str, str]:
    """{mutant name: status} of the last run in `work`."""
    out = subprocess.run([mutmut, "results", "--all", "true"], cwd=work, capture_output=True, text=True,
                         check=True).stdout
    statuses = {}
    for line in out.splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if sep:
            statuses[name] = status
    return statuses


def summarise(module: str, statuses: dict[str, str], equivalents: dict[str, str]) -> dict:
    prefix = module + "."
    mine = {n: s for n, s in statuses.items() if n.startswith(prefix)}
    equivalent = sorted(n for n in mine if n in equivalents)
    killed = sum(1 for n, s in mine.items() if s in ("killed", "timeout") and n not in equivalents)
    survivors = sorted(n for n, s in mine.items() if s not in ("killed", "timeout") and n not in equivalents)
    considered = len(mine) - len(equivalent)
    return {"module": module, "mutants": len(mine), "killed": killed, "equivalent": len(equivalent),
            "survived": len(survivors), "score": round(killed / considered, 4) if considered else 1.0,
            "survivors": survivors, "equivalents": {n: equivalents[n] for n in equivalent}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("module", nargs="?", help="dotted module name, e.g. memlm.nn.positions")
    parser.add_argument("--tests", nargs="+", help="test files to run instead of the module's own")
    parser.add_argument("--children", type=int, default=2, help="mutants tested at once (default 2)")
    parser.add_argument("--show", action="store_true", help="print the diff of every survivor")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object last")
    parser.add_argument("--list", action="store_true", help="list the modules and their tests")
    args = parser.parse_args(argv)
    if args.list:
        for module, tests in OWN_TESTS.items():
            print(f"{module}: {' '.join(tests)}")
        return 0
    if not args.module:
        parser.error("name a module (see --list)")
    if not (ROOT / module_path(args.module)).exists():
        parser.error(f"no module {args.module} ({module_path(args.module)} does not exist)")
    tests = args.tests or [t for t in OWN_TESTS.get(args.module, []) if (ROOT / t).exists()]
    if not tests:
        parser.error(f"no tests known for {args.module}: pass --tests")
    mutmut = shutil.which("mutmut", path=str(Path(sys.executable).parent)) or shutil.which("mutmut")
    if mutmut is None:
        parser.error("mutmut is not installed: pip install -e '.[mutate]'")

    work = prepare(args.module, tests)
    print(f"mutating {module_path(args.module)} against {' '.join(tests)} in {work.relative_to(ROOT)}",
          flush=True)
    run = subprocess.run([mutmut, "run", "--max-children", str(args.children)], cwd=work)
    if run.returncode not in (0, 1):
        print(f"mutmut run failed with exit code {run.returncode}", file=sys.stderr)
        return 2
    summary = summarise(args.module, results(work, mutmut), load_equivalents(args.module))
    (work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if args.show:
        for name in summary["survivors"]:
            print(subprocess.run([mutmut, "show", name], cwd=work, capture_output=True, text=True).stdout)
    else:
        for name in summary["survivors"]:
            print(f"survived: {name}")
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k != "equivalents"}))
    else:
        print(f"{args.module}: {summary['killed']} killed of {summary['mutants']} mutants, "
              f"{summary['equivalent']} equivalent, {summary['survived']} survived: "
              f"score {summary['score']:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
