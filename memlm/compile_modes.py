"""How a training loop compiles its model: torch.compile's modes, and what the CUDA-graph ones
ask of the loop.

A step of a small model launches several hundred kernels; when the host takes longer to launch
them than the device takes to run them, the GPU idles between kernels and the step is bound by
the host (BENCHMARKS.md shows memlm's small presets so on some machines). torch.compile's
"reduce-overhead" and "max-autotune" modes record the compiled forward and backward as CUDA graphs
and replay them: one launch a graph. A replay writes its outputs into the same memory as the
last one, so a loop must not keep an output of one step into the next: the state a memory model
hands to its next segment is copied out (`keep`), and each step is marked as a new one
(`begin_step`). On a CPU the modes compile as the default one does (no CUDA graphs).

The model stays a plain module; these helpers are applied from outside by whoever compiles it
(Trainer, bench). Importing this module imports no torch (configs name the modes).
"""

from __future__ import annotations

from typing import Any

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
"""torch.compile's modes, by their torch names."""

_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def check_mode(mode: str) -> str:
    """mode, or ValueError naming the allowed ones."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r}: allowed: {', '.join(COMPILE_MODES)}")
    return mode


def uses_cuda_graphs(mode: str) -> bool:
    """Whether torch.compile in this mode replays CUDA graphs (on CUDA tensors)."""
    return check_mode(mode) in _GRAPH_MODES


def compile_module(module, mode: str):
    """torch.compile(module) in `mode` ("default": no mode argument, torch's default)."""
    import torch
    return torch.compile(module) if check_mode(mode) == "default" else torch.compile(module, mode=mode)


def begin_step(mode: str) -> None:
    """Before a training step's forward: tell the CUDA-graph runtime that a new step starts, so
    that the last step's outputs may be overwritten (a no-op in the other modes)."""
    if uses_cuda_graphs(mode):
        import torch
        torch.compiler.cudagraph_mark_step_begin()


def keep(value: Any, mode: str) -> Any:
    """An output that the loop carries into the next step (a State, a peer's list of memory
    tensors), copied out of the CUDA-graph pool in the graph modes (detached either way); in
    the other modes the value itself, detached. An object with `detach` (a memlm State, the bench
    peers' PeerState) is detached or copied by its own `detach` / `clone`: `State.clone` leaves kNN
    stores in place (they are written in place, not replayed outputs)."""
    import torch
    copy = uses_cuda_graphs(mode)
    if hasattr(value, "detach") and not isinstance(value, torch.Tensor):  # a State (memlm's, a peer's)
        if not copy:
            return value.detach()
        if not hasattr(value, "clone"):
            raise TypeError(f"{type(value).__name__} has no clone(): it cannot be carried across CUDA-graph replays")
        return value.clone()
    return torch.utils._pytree.tree_map(
        lambda t: (t.detach().clone() if copy else t.detach()) if isinstance(t, torch.Tensor) else t, value)
