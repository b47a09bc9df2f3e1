"""What `memlm bench` measures: one `Entry` per table row, whose `build` makes its `Workload` for
one `Shape` just before it is measured.

A workload hands the harness three things, so every model is timed by the same code:
an `objective` module, forward(inputs (B, T), targets (B, T)) -> scalar loss, which the
harness compiles (if asked) and trains with AdamW; its training FLOPs per token; and
optionally a `Decoder` for cached greedy generation, split into an untimed prefill and the
timed decode steps.

Decode modes (`BenchConfig.decode`) are chosen in `decode_step`: `eager` runs the model as is,
`compile` runs torch.compile(model, dynamic=True) so the growing cache does not recompile
every step; `graph` decodes memlm models through memlm.decode.static (a static cache,
the step compiled and replayed as a CUDA graph, weights in bf16 on CUDA) where they support it.

Presets with memory that lives in a state (`ModelConfig.stateful`: recurrent, compressive or
kNN memory, recurrent memory tokens) train as `memlm train` trains them, on streams: a
`StreamObjective` passes each step the detached state the previous step returned, and kNN
stores are filled to capacity before the first step, so search costs what it costs in a long
run (see `StreamObjective` for how it meets torch.compile).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

import memlm
from memlm import flops
from memlm_bench import reference
from memlm.compile_modes import compile_module, keep
from memlm.config import ModelConfig
from memlm.decode import static_decoder
from memlm.decode.static import unsupported_reason as static_unsupported
from memlm.decode.static_memory import unsupported_reason as memory_static_unsupported
from memlm.state import State, allow_memory_recompiles
from memlm.train.warmup import memory_warmup

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
    unbounded: bool = False
    """Decodes past seq_len positions (models with recurrent memory roll it); others stop there."""


@dataclass
class Workload:
    """What the harness trains, times and decodes for one entry."""

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
    """Releases what the workload holds outside torch (files of an external memory)."""
    warmup: int = 0
    """Untimed steps the row needs at least when compiled: a memory that fills over the first
    steps changes the shapes the compiled model sees until it is full."""
    search_flops_per_token: float = 0.0
    """FLOPs a token of a kNN memory's search over full stores (not model FLOPs; memlm.flops)."""


@dataclass(frozen=True)
class Entry:
    """A row to measure: its name, kind (reference, memlm or peer) and how to build its workload."""

    name: str
    kind: str
    build: Callable[[Shape, torch.device, str], Workload]
    """(shape, device, decode mode) -> Workload."""
    baseline: str | None = None
    """The row (its name) of the same preset family and size without memory, measured in the same
    run, that this row's train rate is also compared with; None when there is none."""


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

def memlm_decoder(step: nn.Module, unbounded: bool = False) -> Decoder:
    """memlm.decode.generate over `step` (the model, or it compiled), continuing the prefilled state."""

    def prefill(prompt: torch.Tensor):
        _, state = memlm.generate(step, prompt[:, :-1], 0, temperature=0, return_state=True)
        return state, prompt[:, -1:]  # the state and the last prompt token (B, 1)

    def extend(context, n: int) -> torch.Tensor:
        state, last = context
        return memlm.generate(step, last, max_new_tokens=n, temperature=0, state=state)

    return Decoder(prefill, extend, unbounded)


def memlm_static_decoder(model: nn.Module, max_len: int) -> Decoder:
    """memlm.decode.static_decoder: one per batch size (compiled and captured as a CUDA graph on
    CUDA; for kNN and slot memories captured again at each segment), prefilled with all but the
    prompt's last token, then stepped greedily. Models with recurrent memory decode past max_len, their memory rolling."""
    decoders: dict[int, Any] = {}

    def prefill(prompt: torch.Tensor):
        B = prompt.shape[0]
        if B not in decoders:
            cuda = prompt.is_cuda
            decoders[B] = static_decoder(model, B, max_len, compile=cuda, dtype=torch.bfloat16 if cuda else None)
        decoders[B].prefill(prompt[:, :-1])
        return decoders[B], prompt[:, -1:]

    def extend(context, n: int) -> torch.Tensor:
        decoder, ids = context
        pieces = []
        for _ in range(n):
            ids = decoder.step(ids).argmax(dim=-1, keepdim=True)  # (B, 1)
            pieces.append(ids)
        return torch.cat(pieces, dim=1)

    return Decoder(prefill, extend, unbounded=model.config.recurrent)


def memlm_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    out = model(inputs, targets=targets)
    return out.loss + out.aux_loss


class StreamObjective(nn.Module):
    """Trains a memlm model with memory as `memlm train` does: each step continues the batch's
    streams with the state the previous step returned, detached (no backpropagation through
    time), so every memory is read and written as in training.

    torch.compile: the harness compiles this objective, but the state stays out of its graph.
    `forward` only asks whether it is being compiled and hands over to `_step`, which dynamo
    skips (torch.compiler.disable: one deliberate graph break); `_step` keeps the state in
    Python and calls the model compiled on its own, torch.compile(model) in `compile_mode`, with
    the state as an argument, exactly as the trainer calls it. As an argument (not an attribute
    of a module, whose ints dynamo always specialises), State.position, the int that grows every
    step, is an unspecialised int: it never causes a recompile. The compiled model recompiles
    only while the memory fills and its tensors' shapes and strides settle (no memory, memory
    sliced from one segment, then from the rolled memory; compressed memory likewise): 3 graphs
    for seed-xl, 4 with compressive memory, 2 for kNN memory with filled stores, compiled
    within `memory_warmup` steps; a memory longer than a segment adds one graph per length
    while it fills, each static (State.mark_static, as the Trainer). kNN store writes (`Store.write`, called in the model's forward
    when a segment completes) are traced into the graph as in-place updates of the store's
    tensors. `fill_stores` fills them first, so that the timed steps search full stores, as
    most steps of a long run do."""

    def __init__(self, model: nn.Module, state: State):
        super().__init__()
        self.model = model
        self.state = state
        self.steps = 0  # training steps taken, each one segment further along the streams
        self.__dict__["compiled"] = None  # torch.compile(model) once compiled; not a submodule
        self.compile_mode = "default"  # set by measure_training: torch.compile's mode (memlm.compile_modes)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self._step(inputs, targets, torch.compiler.is_compiling())

    @torch.compiler.disable
    def _step(self, inputs: torch.Tensor, targets: torch.Tensor, compile: bool) -> torch.Tensor:
        model = self.model
        if compile:
            if self.compiled is None:
                allow_memory_recompiles()  # as the Trainer does: memories filling are new graphs
                self.__dict__["compiled"] = compile_module(self.model, self.compile_mode)
            model = self.compiled
            self.state.mark_static()  # as the Trainer: static memory shapes
        out = model(inputs, targets=targets, state=self.state)
        self.state = keep(out.state, self.compile_mode if compile else "default")
        self.steps += 1
        return out.loss + out.aux_loss


@torch.no_grad()
def fill_stores(state: State, seed: int = 0, chunk: int = 8192) -> int:
    """Fill every writable kNN store of the state to capacity with random unit keys and random
    values at stream positions 0 .. capacity - 1, through the store's public `write`, as if each
    stream had already run that many tokens; the state's position moves past them. Returns the
    entries each row holds afterwards (0 without stores)."""
    filled = 0
    for layer, store in sorted(state.stores.items()):
        if store.shared:  # knowledge memory: read-only, already as full as it is
            continue
        generator = torch.Generator(store.device).manual_seed(seed + layer)
        for start in range(0, store.capacity, chunk):
            n = min(chunk, store.capacity - start)
            size = (store.rows, store.heads, n, store.dim)
            keys = torch.randn(size, generator=generator, device=store.device)
            values = torch.randn(size, generator=generator, device=store.device)
            store.write(F.normalize(keys, dim=-1), values, torch.arange(start, start + n, device=store.device))
        filled = max(filled, store.capacity)
    state.position = max(state.position, filled)
    return filled


def memlm_notes(config: ModelConfig, filled: int) -> list[str]:
    """What a memlm row's table notes say about how its memory was used."""
    m = config.memory
    if config.stateful:
        notes = ["streams with memory: state carried across steps"]
        return notes + [f"kNN stores filled to {filled:,}/row"] if filled else notes
    if m.persistent.vectors or m.tokens.count or m.adaptive_span.enabled:
        return ["no state: this memory needs none"]
    return []


def memlm_entry(preset: str, config: ModelConfig, baseline: str | None = None) -> Entry:
    """A memlm preset as a row (`preset` names it: the preset, then any row overrides); models
    with memory in a state train on streams (StreamObjective), kNN stores filled first."""

    def build(shape: Shape, device: torch.device, decode_mode: str) -> Workload:
        model = memlm.LanguageModel(config).to(device)
        unsupported = memory_static_unsupported if config.recurrent else static_unsupported
        static = decode_mode == "graph" and unsupported(model) is None
        filled = 0
        if config.stateful:
            # masked, as training on documents is after the first document boundary: the attention
            # then applies each row's start (a key mask), which picks other kernels than unmasked memory
            state = model.init_state(shape.batch_size).reset(torch.zeros(shape.batch_size, dtype=torch.bool))
            filled = fill_stores(state)
            objective, warmup = StreamObjective(model, state), memory_warmup(config)
        else:
            objective, warmup = Objective(model, memlm_loss), 0
        return Workload(
            objective=objective,
            flops_per_token=model.flops_per_token(),
            search_flops_per_token=flops.search_flops_per_token(model),  # memory counted (LanguageModel.flops_per_token)
            params=model.num_parameters(),
            decoder=memlm_static_decoder(model, config.seq_len) if static
            else memlm_decoder(decode_step(model, "eager" if decode_mode == "graph" else decode_mode),
                               unbounded=config.recurrent),
            notes=memlm_notes(config, filled) + ([] if static or decode_mode != "graph"
                                                 else ["decodes eagerly: no static-cache path for its memory"]),
            warmup=warmup,
        )

    return Entry(f"memlm {preset}", "memlm", build, baseline)


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


def build_reference(shape: Shape, device: torch.device, decode_mode: str) -> Workload:
    model = reference.ReferenceGPT(shape.vocab_size, shape.width, shape.layers, shape.heads,
                                   shape.seq_len).to(device)
    return Workload(
        objective=Objective(model, reference_loss),
        flops_per_token=dense_flops_per_token(model, shape, shape.seq_len),
        params=count_params(model),
        decoder=reference_decoder(decode_step(model, "eager" if decode_mode == "graph" else decode_mode)),
        notes=["decodes eagerly (graph mode is memlm's)"] if decode_mode == "graph" else [],
    )


REFERENCE = Entry("reference GPT", "reference", build_reference)
