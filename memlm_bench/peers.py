"""Peer libraries measured at the same shapes as memlm, when they are importable.

None is a dependency of memlm: a peer whose package is missing is skipped with a note, and
one that fails to build, compile or run is recorded as a failed row. Each is built at the
shape's width, depth, heads, vocabulary and length, with the output head tied to the
embedding where the library allows it and its flash/fused attention switched on.

- x-transformers (lucidrains): `TransformerWrapper` + `Decoder`, plain; with the programme's
  features (RoPE, QK-norm, squared ReLU, one key/value head, ScaleNorm, bias-free feed-forward);
  and with Transformer-XL memory (`max_mem_len` = seq_len).
- compressive-transformer-pytorch (lucidrains): "Compressive Transformers for Long-Range
  Sequence Modelling" (arXiv 1911.05507), memory seq_len, compressed memory seq_len / 4.
- memorizing-transformers-pytorch (lucidrains): "Memorizing Transformers" (arXiv 2203.08913),
  kNN memory (faiss) in the middle layer, 32 retrieved memories.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from memlm.compile_modes import keep
from memlm_bench.workloads import (Decoder, Entry, Objective, Shape, Workload, count_params,
                                  dense_flops_per_token)

SEED_FEATURES = dict(rotary_pos_emb=True, attn_qk_norm=True, ff_relu_squared=True, attn_one_kv_head=True,
                     use_scalenorm=True, ff_no_bias=True)
"""x-transformers switches matching memlm's seed presets."""


@dataclass(frozen=True)
class Peer:
    entry: Entry
    module: str
    """The import name whose presence enables this peer."""

    def installed(self) -> bool:
        return importlib.util.find_spec(self.module) is not None


def logits_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of a model that returns logits (B, T, V)."""
    return F.cross_entropy(model(inputs).float().flatten(0, 1), targets.flatten())


class RecurrentObjective(nn.Module):
    """Trains a model with recurrent memory on consecutive segments: each step passes in the
    (detached) memory the previous step returned, as segment-level training does.

    `step(model, inputs, targets, memory) -> (loss, new memory)`."""

    def __init__(self, model: nn.Module, step: Callable):
        super().__init__()
        self.model = model
        self.step = step
        self.memory = None

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss, self.memory = self.step(self.model, inputs, targets, self.memory)
        return loss

    def keep_outputs(self, mode: str) -> None:
        """After a step: the memory it returned, copied out of a replayed CUDA graph's memory in
        the graph modes (the next replay overwrites it; memlm.compile_modes)."""
        self.memory = keep(self.memory, mode)


# ----- x-transformers ---------------------------------------------------------------------

def x_transformer(shape: Shape, features: dict, max_mem_len: int = 0, dropout: float = 0.0) -> nn.Module:
    """x-transformers at `shape`; dropout > 0 sets its emb_dropout, ff_dropout and attn_dropout (its
    nearest to memlm's dropout on embeddings and residual branches)."""
    from x_transformers import Decoder, TransformerWrapper
    drop = {"ff_dropout": dropout, "attn_dropout": dropout} if dropout else {}
    return TransformerWrapper(
        num_tokens=shape.vocab_size, max_seq_len=shape.seq_len, tie_embedding=True, max_mem_len=max_mem_len,
        emb_dropout=dropout,
        attn_layers=Decoder(dim=shape.width, depth=shape.layers, heads=shape.heads,
                            attn_dim_head=shape.width // shape.heads, attn_flash=True, **drop, **features))


def x_transformers_decoder(model: nn.Module) -> Decoder:
    """AutoregressiveWrapper.generate with its key/value cache. Its cache cannot be passed in,
    so the timed call includes the prompt's forward (one of n + 1)."""
    from x_transformers import AutoregressiveWrapper
    wrapper = AutoregressiveWrapper(model)
    return Decoder(prefill=lambda prompt: prompt,
                   extend=lambda prompt, n: wrapper.generate(prompt, n, temperature=0.0, cache_kv=True))


def x_transformers_workload(features: dict, notes: list[str]):
    def build(shape: Shape, device: torch.device, decode_mode: str) -> Workload:
        model = x_transformer(shape, features).to(device)
        return Workload(Objective(model, logits_loss), dense_flops_per_token(model, shape, shape.seq_len),
                         count_params(model), decoder=x_transformers_decoder(model),
                         notes=notes + ["generation timed with its prompt pass"])
    return build


def xl_step(model, inputs, targets, memory):
    logits, memory = model(inputs, mems=memory, return_mems=True)  # memory comes back detached
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()), memory


def x_transformers_xl_workload(features: dict, dropout: float, notes: list[str]):
    """A bench builder of x-transformers with Transformer-XL memory of seq_len, trained on streams."""

    def build(shape: Shape, device: torch.device, decode_mode: str) -> Workload:
        model = x_transformer(shape, features, max_mem_len=shape.seq_len, dropout=dropout).to(device)
        return Workload(RecurrentObjective(model, xl_step), dense_flops_per_token(model, shape, shape.seq_len),
                        count_params(model), notes=["XL memory = seq_len"] + notes + ["no cached decode with memory"])
    return build


RACE_PEER_DROPOUT = 0.2
"""The peers' dropout of the races in BENCHMARKS.md (`memlm race --peer-dropout 0.2`)."""

build_x_transformers_xl = x_transformers_xl_workload({}, 0.0, [])
build_x_transformers_xl_race = x_transformers_xl_workload(
    {"rotary_pos_emb": True}, RACE_PEER_DROPOUT,
    [f"as the race's x-transformers-XL: rotary, dropout {RACE_PEER_DROPOUT:g} (emb, ff, attn)"])


# ----- compressive transformer ------------------------------------------------------------

def compressive_step(model, inputs, targets, memory):
    logits, memory, aux_loss = model(inputs, memories=memory)  # memory comes back detached
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()) + aux_loss, memory


def build_compressive(shape: Shape, device: torch.device, decode_mode: str) -> Workload:
    from compressive_transformer_pytorch import CompressiveTransformer
    model = CompressiveTransformer(
        num_tokens=shape.vocab_size, dim=shape.width, seq_len=shape.seq_len, depth=shape.layers,
        heads=shape.heads, mem_len=shape.seq_len, cmem_len=shape.seq_len // 4, cmem_ratio=4,
        gru_gated_residual=False).to(device)
    return Workload(RecurrentObjective(model, compressive_step),
                     dense_flops_per_token(model, shape, shape.seq_len), count_params(model),
                     notes=["memory seq_len, compressed seq_len/4", "plain residual", "no cached decode"])


# ----- memorizing transformer -------------------------------------------------------------

class KnnObjective(nn.Module):
    """The memorizing transformer's loss with its kNN memories (one faiss index per row)."""

    def __init__(self, model: nn.Module, knn_memories):
        super().__init__()
        self.model = model
        self.knn_memories = knn_memories

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.model(inputs, self.knn_memories, labels=targets)


def build_memorizing(shape: Shape, device: torch.device, decode_mode: str) -> Workload:
    from memorizing_transformers_pytorch import MemorizingTransformer
    directory = tempfile.mkdtemp(prefix="memlm-bench-knn-")
    model = MemorizingTransformer(
        num_tokens=shape.vocab_size, dim=shape.width, depth=shape.layers, heads=shape.heads,
        dim_head=shape.width // shape.heads, max_knn_memories=4 * shape.seq_len, num_retrieved_memories=32,
        knn_memories_directory=directory).to(device)
    knn_memories = model.create_knn_memories(batch_size=shape.batch_size)

    def close() -> None:
        knn_memories.cleanup()
        shutil.rmtree(directory, ignore_errors=True)

    return Workload(KnnObjective(model, knn_memories), dense_flops_per_token(model, shape, shape.seq_len),
                     count_params(model), close=close,
                     notes=["kNN memory 4 x seq_len per row, 32 retrieved", "no cached decode"])


PEERS = [
    Peer(Entry("x-transformers", "peer", x_transformers_workload({}, [])), "x_transformers"),
    Peer(Entry("x-transformers seed features", "peer",
                       x_transformers_workload(SEED_FEATURES, ["rope, qk-norm, relu^2, 1 kv head, scalenorm"])),
         "x_transformers"),
    Peer(Entry("x-transformers XL", "peer", build_x_transformers_xl), "x_transformers"),
    Peer(Entry("x-transformers XL race", "peer", build_x_transformers_xl_race), "x_transformers"),
    Peer(Entry("compressive-transformer-pytorch", "peer", build_compressive),
         "compressive_transformer_pytorch"),
    Peer(Entry("memorizing-transformers-pytorch", "peer", build_memorizing),
         "memorizing_transformers_pytorch"),
]
