"""Callbacks: what a Trainer tells the code that runs it, so that a harness (a race, a sweep)
records what it needs without reaching inside the loop.

    class Steps(Callback):
        def on_metrics(self, trainer, record):
            if record["kind"] == "train":
                print(record["step"], record["loss"])

    Trainer(model_config, config, info, callbacks=[Steps()]).fit()

Every hook gets the trainer first; the base class's hooks do nothing, so a callback overrides
only those it needs. Hooks run on every rank, except `on_metrics`, which runs where metrics are
written (rank 0).
"""

from __future__ import annotations

from typing import Any


class Callback:
    def on_warmup_end(self, trainer, seconds: float) -> None:
        """After `Trainer.warm_up`: the seconds it took (0.0 when there was nothing to compile)."""

    def on_evaluate(self, trainer, split: str, result: dict[str, Any]) -> None:
        """After each evaluation of the run: the validation evaluations during training (at
        `trainer.step`) and the final test. `result` is memlm.eval.evaluate's (bpb, loss,
        perplexity, tokens, by_position), as `Trainer.evaluate` returns it."""

    def on_metrics(self, trainer, record: dict[str, Any]) -> None:
        """After each record written to metrics.jsonl ({"kind": "train" | "eval" | "test",
        "step", ...}, the same dict); rank 0 only."""

    def on_fit_end(self, trainer, summary: dict[str, Any]) -> None:
        """At the end of `Trainer.fit`, with the summary it returns."""


def notify(callbacks: list[Callback], hook: str, trainer, *args: Any) -> None:
    """Call `hook` of every callback, in order."""
    for callback in callbacks:
        getattr(callback, hook)(trainer, *args)
