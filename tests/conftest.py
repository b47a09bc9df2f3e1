import os

import pytest
import torch

import memlm

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

POSITION_KINDS = ["none", "learned", "sinusoidal", "rope", "xpos", "t5", "tupe"]


def tiny_overrides(**extra):
    """A model small enough for many tests a second on a CPU."""
    base = {"layers": 2, "width": 32, "seq_len": 64, "attention.heads": 4}
    base.update(extra)
    return base


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def by_segments(model, ids, size, state=None):
    """Feed ids (B, T) in pieces of `size` with a state: (logits (B, T, V), final state)."""
    state = state or model.init_state(ids.shape[0])
    pieces = []
    for start in range(0, ids.shape[1], size):
        out = model(ids[:, start:start + size], state=state)
        pieces.append(out.logits)
        state = out.state
    return torch.cat(pieces, dim=1), state


def build_tiny(**extra):
    """seed-tiny shrunk to 2 layers and seq_len 8, with dotted overrides."""
    base = tiny_overrides(layers=2, seq_len=8)
    base.update(extra)
    return memlm.build("seed-tiny", **base)


def run_segments(model, ids, size=8):
    """Train-style pass over ids (B, T) in pieces of `size`, the state detached between them:
    (logits (B, T, V), final state, the outputs of every piece)."""
    state, pieces, outs = model.init_state(ids.shape[0]), [], []
    for start in range(0, ids.shape[1], size):
        out = model(ids[:, start:start + size], targets=ids[:, start:start + size], state=state)
        outs.append(out)
        pieces.append(out.logits)
        state = out.state.detach()
    return torch.cat(pieces, dim=1), state, outs
