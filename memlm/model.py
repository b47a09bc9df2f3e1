"""The decoder-only language model that assembles every switch of ModelConfig.

    input_ids (B, T)
        -> token embedding (+ learned / sinusoidal positions)
        -> N x Block [norm -> attention(+ state) -> residual, norm -> feed-forward -> residual]
        -> final norm -> output head (tied to the embedding by default)
        -> logits (B, T, vocab)

One forward serves training, prefill and decoding (`_run_piece`): each layer reads its
recurrent memory or its key/value cache from the State, and memory mechanisms act through
their hooks: memory tokens frame the input as [read | tokens | write] and cut it at segment
boundaries (memlm.memory.tokens), the recurrent memory rolls after each piece
(memlm.memory.xl, with feedback, compression and kNN writes), and persistent, kNN and
adaptive-span terms act inside attention (attached by `attach_memory`, memlm.protocols).

Forgetful causal masking ("Forgetful Causal Masking Makes Causal Language Models Better
Zero-Shot Learners", Liu et al., arXiv 2210.13432) is drawn here once per forward: in
training, each row draws a ratio r ~ U[0, eta] and hides each of its segment's keys with
probability r from every query but the key's own position. Keys held in a state are never
hidden. Init follows GPT-2: normal(0, 0.02), residual output projections scaled by
1/sqrt(2 * layers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from memlm import flops
from memlm.config import ModelConfig
from memlm.memory import feedback, tokens, xl
from memlm.memory.adaptive_span import AdaptiveSpan
from memlm.memory.compressive import Compressor
from memlm.memory.knn import KnnAttention, Store, WithKnowledge, make_store
from memlm.memory.persistent import PersistentMemory, rename_legacy_keys
from memlm.memory.registry import MECHANISMS
from memlm.nn.attention import Attention, SegmentContext
from memlm.nn.block import Block
from memlm.nn.norms import make_norm
from memlm.nn.positions import AbsolutePositions, T5RelativeBias, TupeBias
from memlm.state import LayerState, State


KNOWLEDGE_MODES = (*WithKnowledge.MODES, "replace")
"""How init_state uses a knowledge memory: with each kNN layer's own store (fill: the slots the own
past leaves empty; add: the best of both by score; memlm.memory.knn.stores.WithKnowledge), or instead
of it (replace)."""


@dataclass
class ModelOutput:
    logits: torch.Tensor
    """(B, T, vocab)."""
    loss: torch.Tensor | None
    """Mean cross-entropy in nats over targets != -100, or None without targets."""
    aux_loss: torch.Tensor
    """Extra training losses (span penalty, reconstruction); 0 when none."""
    state: State | None
    """What the next segment needs; None when no state was passed."""


class LanguageModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config.validate()
        c, p = config, config.position
        self.embed = nn.Embedding(c.vocab_size, c.width)
        self.positions = AbsolutePositions(p.kind, c.width, c.positions_limit) \
            if p.kind in ("learned", "sinusoidal") else None
        self.relative_bias = None
        if p.kind == "t5" or (p.kind == "tupe" and p.tupe_t5):
            tables = 1 if p.t5_shared else c.layers
            self.relative_bias = nn.ModuleList(
                T5RelativeBias(c.attention.heads, p.t5_buckets, p.t5_max_distance) for _ in range(tables))
        self.tupe = TupeBias(c.width, c.attention.heads, c.head_dim, c.positions_limit) \
            if p.kind == "tupe" else None
        self.dropout = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c, i) for i in range(c.layers))
        for block in self.blocks:
            attach_memory(block.attention, c)
        if c.memory.persistent.vectors:
            self.register_load_state_dict_pre_hook(rename_legacy_keys)
        self.compressors = nn.ModuleList(
            Compressor(c.memory.compressive.fn, c.width, c.memory.compressive.rate, c.bias) for _ in range(c.layers)
        ) if c.memory.compressive.rate else None
        self.final_norm = make_norm(c.norm.kind, c.width, c.norm.eps, c.bias) \
            if c.norm.final and c.norm.placement == "pre" else nn.Identity()
        self.head = nn.Linear(c.width, c.vocab_size, bias=False)
        self.apply(self._init_weights)
        if c.tie_embeddings:
            self.head.weight = self.embed.weight
        self.memory_tokens = tokens.MemoryTokens(c) if c.memory.tokens.count else None
        self.mechanisms = nn.ModuleDict({cls.name: cls(c) for cls in MECHANISMS if cls.enabled(c)})
        # knowledge memory (memlm.memorize): shared read-only kNN stores by layer that init_state
        # puts in place of those layers' per-row stores; plain objects, not parameters or buffers
        self.knowledge: dict[int, Store] = {}
        self.knowledge_mode = "fill"  # how init_state uses it (KNOWLEDGE_MODES)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.init_std
        if isinstance(module, nn.Linear):
            scale = 1 / math.sqrt(2 * self.config.layers) if getattr(module, "residual_projection", False) else 1
            nn.init.normal_(module.weight, 0.0, std * scale)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, std)

    # ----- state ----------------------------------------------------------------------
    def init_state(self, batch_size: int, device: torch.device | str | None = None,
                   knowledge: dict[int, Store] | None = None) -> State:
        """Empty memory for `batch_size` streams. For a model without memory mechanisms the
        state is a growing key/value cache.

        knowledge: shared read-only kNN stores by layer (None = `self.knowledge`), read by every
        row. `self.knowledge_mode` "fill" (default) or "add": searched together with the layer's own
        per-row store (memlm.memory.knn.stores.WithKnowledge), which completed segments still fill;
        "replace": in place of it, so the layer reads the knowledge only and nothing is written."""
        device = device if device is not None else self.embed.weight.device
        state = State.empty(batch_size, len(self.blocks), device)
        m = self.config.memory
        knowledge = self.knowledge if knowledge is None else knowledge
        bad = [i for i, store in knowledge.items() if i not in (m.knn.layers or ()) or not store.shared]
        if bad:
            raise ValueError(f"knowledge memory of layers {bad}: each must be a shared store (store.share()) "
                             f"of a kNN layer (memory.knn.layers = {m.knn.layers})")
        if self.knowledge_mode not in KNOWLEDGE_MODES:
            raise ValueError(f"knowledge_mode must be one of {', '.join(KNOWLEDGE_MODES)}, got {self.knowledge_mode!r}")
        for layer in m.knn.layers or ():
            if layer in knowledge and self.knowledge_mode == "replace":
                state.stores[layer] = knowledge[layer]
                continue
            own = make_store(m.knn.backend, rows=batch_size, heads=self.config.kv_heads, dim=self.config.head_dim,
                             capacity=m.knn.capacity, device=device,
                             **({"dtype": m.knn.dtype} if m.knn.backend == "exact" else {}))
            state.stores[layer] = (WithKnowledge(own, knowledge[layer], self.knowledge_mode) if layer in knowledge
                                   else own)
        return state

    def load_state(self, data: dict, device: torch.device | str | None = None) -> State:
        """A State from `State.state_dict()` output, kNN stores included."""
        state = State.from_state_dict(data)
        if device is not None:
            state = state.to(device)
        fresh = self.init_state(state.batch_size, device=state.row_start.device)
        for layer, store in fresh.stores.items():
            if not store.shared:  # knowledge memory is not part of a saved state
                store.load_state_dict(data["stores"][layer])
        state.stores = fresh.stores
        return state

    # ----- forward --------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                state: State | None = None) -> ModelOutput:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if T == 0:
            raise ValueError("input_ids holds no tokens (shape (B, 0)): give at least one position")
        if state is not None and state.batch_size != B:
            raise ValueError(f"state holds {state.batch_size} rows but input_ids has {B}")
        if state is not None and len(state.layers) != len(self.blocks):
            raise ValueError(f"state was made for a model of {len(state.layers)} layers, this one has "
                             f"{len(self.blocks)}: use model.init_state")
        position = state.position if state is not None else 0
        x = self.embed(input_ids)  # (B, T, W)
        if self.positions is not None:
            x = x + self.positions(position, T, x.device).to(x.dtype)
        if self.memory_tokens is not None and state is None and not self.config.stateful:
            hidden, stream, losses = self._independent_segments(x), None, []
        else:
            stream = state
            if stream is None and self.memory_tokens is not None:  # one stream from an empty state, not returned
                stream = State.empty(B, len(self.blocks), x.device)
            hidden, stream, losses = self._run(x, stream)
        logits = self.head(self.final_norm(hidden))  # (B, T, vocab)
        aux_loss = self._span_penalty(x.device)
        if losses:
            aux_loss = aux_loss + self.config.memory.compressive.loss_weight * torch.stack(losses).mean()
        return ModelOutput(logits=logits, loss=self._loss(logits, targets), aux_loss=aux_loss,
                           state=stream if state is not None else None)

    @staticmethod
    def _loss(logits: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor | None:
        if targets is None:
            return None
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)

    def _run(self, x: torch.Tensor, state: State | None) -> tuple[torch.Tensor, State | None, list[torch.Tensor]]:
        """Run x (B, T, W) piece by piece: one piece, unless memory tokens cut it at segment
        boundaries. Returns the top hidden states (B, T, W), the state after it and the
        compression losses of the pieces that computed one."""
        position = state.position if state is not None else 0
        T = x.shape[1]
        lengths = self.memory_tokens.pieces(position, T) if self.memory_tokens is not None else [T]
        outputs, losses, done = [], [], 0
        for n in lengths:
            out, state, loss = self._run_piece(x[:, done:done + n], state, position + done)
            outputs.append(out)
            losses += [loss] if loss is not None else []
            done += n
        return (outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)), state, losses

    def _independent_segments(self, x: torch.Tensor) -> torch.Tensor:
        """Memory tokens without a state or recurrence: every seq_len piece of x (B, T, W) is a
        segment of its own, read from the learned memory, so the full pieces run side by side in
        one batch. Returns the top hidden states (B, T, W)."""
        B, T, W = x.shape
        L = self.config.seq_len
        full, outputs = T // L, []
        if full:
            pieces = x[:, :full * L].reshape(B * full, L, W)
            outputs.append(self._run_piece(pieces, None, 0)[0].reshape(B, full * L, W))
        if T % L:
            outputs.append(self._run_piece(x[:, full * L:], None, full * L)[0])
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)

    def _run_piece(self, x: torch.Tensor, state: State | None, position: int
                   ) -> tuple[torch.Tensor, State | None, torch.Tensor | None]:
        """The one pass through the blocks, for training, prefill and decoding alike.

        x (B, T, W): embedded tokens at stream positions position..position+T-1 (within one
        segment when memory tokens frame it). Each layer reads its recurrent memory
        (memlm.memory.xl) or its key/value cache from `state`; persistent, kNN and adaptive-span
        terms act inside attention. Returns the top hidden states at the token positions
        (B, T, W), the state after the piece (None without one) and its compression loss."""
        B, T, _ = x.shape
        if self.memory_tokens is not None:  # [read | x | write] (memlm.memory.tokens)
            h, before, ctx = self.memory_tokens.frame(self, x, position, state)
        else:
            h, before = self.dropout(x), 0
            ctx = SegmentContext(q_start=position,
                                 row_start=state.row_start if state is not None and state.masked else None,
                                 keep=self.forgetful_keep(B, T, x.device), bias=self.position_bias(position, T, x.device),
                                 stores=state.stores if state is not None else None)
        if state is not None:
            ctx.sources = self._sources(state)
        recurrent = state is not None and self.config.recurrent
        add_feedback = recurrent and self.config.memory.feedback.mode == "add"
        inputs, caches = [], []  # inputs[i]: (B, before + T + after, W) input of block i
        for i, block in enumerate(self.blocks):
            layer = state.layers[i] if state is not None else None
            if recurrent:
                if add_feedback:
                    h = feedback.add(layer, h, before, T)
                inputs.append(h)
                h, _ = block(h, ctx, memory=xl.memory_source(layer))
            else:
                past = (layer.k, layer.v) if layer is not None and layer.k is not None else None
                h, kv = block(h, ctx, past, cache=state is not None)
                caches.append(kv)
        top = h[:, before:before + T]  # (B, T, W)
        if state is None:
            return top, None, None
        loss = None
        if recurrent:
            writable = {i: store for i, store in state.stores.items() if not store.shared}  # knowledge is read-only
            layers, loss, completed = xl.next_layers(self, state.layers, [t[:, before:before + T] for t in inputs],
                                                     top, writable, position + T)
            if completed is not None:
                self._write_mechanisms(layers, completed, state, position + T)
        else:
            layers = [layer.replace(k=k, v=v) for layer, (k, v) in zip(state.layers, caches)]
        if self.memory_tokens is not None:
            layers = self.memory_tokens.after_piece(state.layers, layers, inputs, h, before, position, T)
        return top, state.advanced(T, layers), loss

    def _write_mechanisms(self, layers: list[LayerState], completed: list[torch.Tensor], state: State,
                          end: int) -> None:
        """The registry mechanisms write the segment that ended at stream position `end` (its
        inputs completed[i] (B, L, W) of layer i); a reset row writes only its own document."""
        length = completed[0].shape[1]
        keep = None
        if state.masked:
            positions = torch.arange(end - length, end, device=state.row_start.device)
            keep = positions[None, :] >= state.row_start[:, None]  # (B, L)
        for mechanism in self.mechanisms.values():
            for i in mechanism.layers():
                extension = mechanism.write(i, self.blocks[i], layers[i].extensions.get(mechanism.name),
                                            completed[i], keep)
                layers[i].extensions = {**layers[i].extensions, mechanism.name: extension}

    def _sources(self, state: State) -> dict[int, list]:
        """The registry mechanisms' reads for this piece, by layer (memlm.protocols.SourceRead)."""
        sources: dict[int, list] = {}
        for mechanism in self.mechanisms.values():
            for i in mechanism.layers():
                read = mechanism.reader(i, self.blocks[i], state.layers[i].extensions.get(mechanism.name))
                if read is not None:
                    sources.setdefault(i, []).append(read)
        return sources

    def _span_penalty(self, device: torch.device) -> torch.Tensor:
        spans = [block.attention.span for block in self.blocks if block.attention.span is not None]
        if not spans:
            return torch.zeros((), device=device)
        return self.config.memory.adaptive_span.penalty * torch.stack([s.penalty() for s in spans]).sum()

    # ----- hooks for the trainer --------------------------------------------------------
    def after_optimizer_step(self) -> None:
        """Keep learned quantities in range (adaptive spans clamped to [0, span_max])."""
        for block in self.blocks:
            if block.attention.span is not None:
                block.attention.span.clamp_()

    def spans(self) -> list[list[float]] | None:
        """Learned adaptive spans in positions, [layer][head], or None without adaptive span."""
        if self.blocks[0].attention.span is None:
            return None
        return [block.attention.span.span.detach().cpu().tolist() for block in self.blocks]

    def forgetful_keep(self, batch: int, length: int, device: torch.device) -> torch.Tensor | None:
        """(batch, length) bool keep flags of forgetful causal masking for a segment's keys, or None
        (evaluation, or the mask is off)."""
        eta = self.config.attention.forgetful
        if not self.training or eta == 0:
            return None
        ratio = torch.rand(batch, 1, device=device) * eta  # (B, 1)
        return torch.rand(batch, length, device=device) >= ratio  # (B, T)

    def position_bias(self, q_start: int, q_len: int, device: torch.device):
        """For queries at q_start..q_start+q_len-1: a function (layer, k_offset, Tk) -> (H, Tq, Tk)
        relative-position bias (T5, TUPE) or None; terms shared by layers are computed once."""
        if self.relative_bias is None and self.tupe is None:
            return lambda layer, k_offset, k_len: None
        computed: dict = {}

        def bias(layer: int, k_offset: int, k_len: int) -> torch.Tensor:
            table = 0 if len(self.relative_bias or ()) <= 1 else layer
            key = (table, k_offset, k_len)
            if key not in computed:
                total = None
                if self.relative_bias is not None:
                    total = self.relative_bias[table](q_len, k_len, k_offset, device)
                if self.tupe is not None:
                    term = self.tupe(q_len, k_len, k_offset)
                    total = term if total is None else total + term
                computed[key] = total
            return computed[key]

        return bias

    # ----- accounting -----------------------------------------------------------------
    def num_parameters(self, non_embedding: bool = False) -> int:
        """Parameter count (tied weights once); non_embedding drops token/position tables."""
        params = {id(p): p for p in self.parameters()}
        total = sum(p.numel() for p in params.values())
        if non_embedding:
            total -= self.embed.weight.numel()
            if self.positions is not None and self.positions.table is not None:
                total -= self.positions.table.weight.numel()
        return total

    def flops_per_token(self, context: int | None = None) -> float:
        """Training FLOPs per token, forward + backward (memlm.flops.flops_per_token): with memory
        counted, or with an int `context`, the dense count of a model without memory."""
        return flops.flops_per_token(self, context)

    def estimate_mfu(self, tokens_per_second: float, peak_flops: float, context: int | None = None) -> float:
        """Model FLOPs utilisation: achieved training FLOP/s over the device's peak."""
        return tokens_per_second * self.flops_per_token(context) / peak_flops


def attach_memory(attention: Attention, config: ModelConfig) -> None:
    """Plug the memory mechanisms the config turns on into one layer's attention (memlm.protocols)."""
    m, layer = config.memory, attention.layer
    if m.adaptive_span.enabled:
        attention.span = AdaptiveSpan(config.attention.heads, config.span_max, m.adaptive_span.ramp,
                                      m.adaptive_span.init, m.adaptive_span.gradient)
    if m.persistent.vectors:
        attention.persistent = PersistentMemory(config.kv_heads, m.persistent.vectors, config.head_dim,
                                                config.init_std)
    if layer in (m.knn.layers or ()):
        attention.knn = KnnAttention(config.attention.heads, m.knn.k, m.knn.combine, m.knn.straight_through)
