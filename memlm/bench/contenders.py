"""What the bench measures: one `Contender` per table row, built lazily for one `Shape`.

A contender hands the harness three things, so every model is timed by the same code:
an `objective` module, forward(inputs (B, T), targets (B, T)) -> scalar loss, which the
harness compiles (if asked) and trains with AdamW; its training FLOPs per token; and
optionally a `Decoder` for cached greedy generation, split into an untimed prefill and the
timed decode steps.

Decode modes (`BenchConfig.decode`) are chosen in `decode_step`: `eager` runs the model as is,
`compile` runs torch.compile(model, dynamic=True) so the growing cache does not recompile
every step. A CUDA-graph decode over a static cache plugs in there as another mode.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

import memlm
from memlm.bench import reference
from memlm.config import ModelConfig

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
"""(model, inputs (B, T), targets (B, T)) -> scalar training loss."""


@dataclass(frozen=True)
class Shape:
    """The dimensions every model of one comparison shares."""

    batch_size: int
    seq_len: int
    layers: int
    width: int
    heads: int
    vocab_size: int

    @classmethod
    def of(cls, config: ModelConfig, batch_size: int) -> "Shape":
        return cls(batch_size, config.seq_len, config.layers, config.width, config.attention.heads,
                   config.vocab_size)

    @property
    def label(self) -> str:
        return (f"B{self.batch_size} T{self.seq_len} L{self.layers} W{self.width} "
                f"H{self.heads} V{self.vocab_size}")


@dataclass(frozen=True)
class Decoder:
    """Cached greedy generation in two phases, so only decode steps are timed."""

    prefill: Callable[[torch.Tensor], Any]
    """prompt (B, T0) -> context: the cache after all but the prompt's last token (not timed)."""
    extend: Callable[[Any, int], torch.Tensor]
    """(context, n) -> ids holding n new tokens, one single-token forward each (timed)."""


@dataclass
class Contender:
    objective: nn.Module
    """forward(inputs (B, T), targets (B, T)) -> scalar loss; what is compiled and trained."""
    flops_per_token: float
    """Training FLOPs per token at the shape's context (forward + backward)."""
    params: int
    """Parameter count, tied weights once."""
    decoder: Decoder | None = None
    """Cached greedy generation, or None where the model has no cached decode."""
    notes: list[str] = field(default_factory=list)
    """What the table should say about this row (configuration choices)."""
    close: Callable[[], None] = lambda: None
    """Releases what the contender holds outside torch (files of an external memory)."""


@dataclass(frozen=True)
class ContenderSpec:
    """A row to measure: its name, kind (reference, memlm or peer) and how to build it."""

    name: str
    kind: str
    build: Callable[[Shape, torch.device, str], Contender]
    """(shape, device, decode mode) -> Contender."""


class Objective(nn.Module):
    """Wraps a model and its loss so the harness compiles and trains every model the same way."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self.model, inputs, targets)


def decode_step(model: nn.Module, mode: str) -> nn.Module:
    """The module the decode loop calls: the model itself (eager) or compiled for growing caches."""
    if mode == "compile":
        return torch.compile(model, dynamic=True)
    return model


def count_params(module: nn.Module) -> int:
    """Parameters, tied ones once (module.parameters() yields each once)."""
    return sum(p.numel() for p in module.parameters())


def dense_flops_per_token(model: nn.Module, shape: Shape, context: int) -> float:
    """The PaLM / nanoGPT estimate for a model that is not memlm's: 6 x matmul weights +
    12 x layers x width x context. Matmul weights are every nn.Linear and RNN-cell weight
    (shared ones once), plus vocab x width when no Linear produces the logits (a head tied to
    an embedding that is not a Linear)."""
    weights = {id(p): p for m in model.modules() if isinstance(m, (nn.Linear, nn.RNNCellBase))
               for name, p in m.named_parameters(recurse=False) if p.dim() == 2 and "weight" in name}
    matmul = sum(p.numel() for p in weights.values())
    has_head = any(isinstance(m, nn.Linear) and m.out_features == shape.vocab_size for m in model.modules())
    if not has_head:
        matmul += shape.vocab_size * shape.width
    return 6 * matmul + 12 * shape.layers * shape.width * context


# ----- memlm ------------------------------------------------------------------------------

def memlm_decoder(step: nn.Module) -> Decoder:
    """memlm.generate over `step` (the model, or it compiled), continuing the prefilled state."""

    def prefill(prompt: torch.Tensor):
        _, state = memlm.generate(step, prompt[:, :-1], 0, temperature=0, return_state=True)
        return state, prompt[:, -1:]  # the state and the last prompt token (B, 1)

    def extend(context, n: int) -> torch.Tensor:
        state, last = context
        return memlm.generate(step, last, max_new_tokens=n, temperature=0, state=state)

    return Decoder(prefill, extend)


def memlm_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    out = model(inputs, targets=targets)
    return out.loss + out.aux_loss


def memlm_spec(preset: str, config: ModelConfig) -> ContenderSpec:
    """A memlm preset as a row."""

    def build(shape: Shape, device: torch.device, decode_mode: str) -> Contender:
        model = memlm.LanguageModel(config).to(device)
        return Contender(
            objective=Objective(model, memlm_loss),
            flops_per_token=model.flops_per_token(shape.seq_len),
            params=model.num_parameters(),
            decoder=memlm_decoder(decode_step(model, decode_mode)),
        )

    return ContenderSpec(f"memlm {preset}", "memlm", build)


# ----- the reference ----------------------------------------------------------------------

def reference_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return model(inputs, targets)[1]


def reference_decoder(step: nn.Module) -> Decoder:
    """reference.generate over `step` (the model, or it compiled), continuing the prefilled cache."""

    def prefill(prompt: torch.Tensor):
        cache: reference.Cache = [{} for _ in step.blocks]
        step(prompt[:, :-1], cache=cache)
        return cache, prompt[:, -1:]  # the cache and the last prompt token (B, 1)

    def extend(context, n: int) -> torch.Tensor:
        cache, last = context
        return reference.generate(step, last, n, cache=cache)

    return Decoder(prefill, extend)


def build_reference(shape: Shape, device: torch.device, decode_mode: str) -> Contender:
    model = reference.ReferenceGPT(shape.vocab_size, shape.width, shape.layers, shape.heads,
                                   shape.seq_len).to(device)
    return Contender(
        objective=Objective(model, reference_loss),
        flops_per_token=dense_flops_per_token(model, shape, shape.seq_len),
        params=count_params(model),
        decoder=reference_decoder(decode_step(model, decode_mode)),
    )


REFERENCE = ContenderSpec("reference GPT", "reference", build_reference)
