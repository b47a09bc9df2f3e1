"""`memlm lm-eval`: lm-evaluation-harness tasks on a trained model (memlm.lm_eval_harness; the `eval` extra)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import tyro

from memlm.cli.common import RunPath, UsageError


@dataclass
class LmEvalCommand:
    path: RunPath
    """Run directory (its checkpoints/latest), checkpoint directory, or `memlm export --hf` directory."""
    tasks: list[str]
    """Harness task names (wikitext, lambada_openai, ...), or tasks defined under --include-path."""
    include_path: Path | None = None
    """A directory of task YAML files of your own (local data: `dataset_path: json` and `data_files`)."""
    builtin_tasks: bool = True
    """Index the harness's own tasks too (--no-builtin-tasks: only those under --include-path, quicker)."""
    limit: float | None = None
    """Documents per task (or a fraction of them, < 1); None = all."""
    num_fewshot: int | None = None
    """Few-shot examples per prompt; None = the task's default."""
    batch_size: int = 1
    """Requests scored in parallel (rows padded at their end)."""
    no_memory: bool = False
    """Score a memory model without its state (windows of seq_len), the no-memory baseline."""
    device: str = "auto"
    """Device: auto, cpu, cuda, cuda:N."""
    output: Path | None = None
    """Write the harness's results (JSON) here."""
    json: bool = False
    """Print the results per task as one JSON object on the last line."""


def run(argv: list[str]) -> int:
    args = tyro.cli(LmEvalCommand, args=argv, prog="memlm lm-eval",
                    description="lm-evaluation-harness tasks on a trained model, its memory carried across segments.")
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import make_table
    except ImportError:
        raise UsageError("memlm lm-eval needs lm-evaluation-harness: pip install 'memlm[eval]'") from None
    from memlm.lm_eval_harness import MemlmLM

    if args.include_path is not None and not args.include_path.is_dir():
        raise UsageError(f"--include-path {args.include_path}: no such directory")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be positive, got {args.batch_size}")
    manager = TaskManager(include_path=str(args.include_path) if args.include_path is not None else None,
                          include_defaults=args.builtin_tasks)
    unknown = [task for task in args.tasks if task not in manager.all_tasks]
    if unknown:
        raise UsageError(f"unknown task(s) {', '.join(unknown)}: name harness tasks or tasks under --include-path")
    model = MemlmLM(args.path, device=args.device, batch_size=args.batch_size, stateful=False if args.no_memory else None)
    results = lm_eval.simple_evaluate(model=model, tasks=args.tasks, task_manager=manager, limit=args.limit,
                                      num_fewshot=args.num_fewshot)
    print(make_table(results))
    if args.output is not None:
        args.output.write_text(json.dumps(results["results"], indent=2, default=str) + "\n")
    if args.json:
        print(json.dumps({"stateful": model.stateful, "results": results["results"]}, default=str))
    return 0
