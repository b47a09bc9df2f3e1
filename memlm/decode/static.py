"""Fast cached decoding: a key/value cache of fixed size and a decode step that can be captured
in a CUDA graph.

`memlm.decode.generate` decodes through the model's own forward with a growing cache: every token
concatenates the cache and launches a few hundred small kernels from Python, so at batch 1 a
small model spends its time on launches ("launch-bound"), not on reading its weights. This
module keeps each layer's keys and values in one preallocated buffer (B, Hkv, S, D) and
writes each new position in place, so the decode step has the same shapes at every position
and takes the position as a tensor. One step then does no host work that depends on the
position, which lets it be compiled once (`compile=True`, torch.compile with static shapes,
the approach of gpt-fast, PyTorch blog "Accelerating Generative AI with PyTorch II", 2023) and
recorded once as a CUDA graph (`torch.cuda.CUDAGraph`) that every later token replays with one
launch.

The step recomputes what the model's forward computes for one query, from the same modules:
projections, QK-norm, RoPE/xPos (each key rotated once, when it is written, at its cache slot,
and the query at its own slot: a score then sees the difference of two slots, which is the
distance of the two positions, as the forward's relative rotation does), T5 and TUPE biases, persistent memory (one softmax over cached and persistent keys,
equal to the forward's exact log-sum-exp merge), pre- or post-norm blocks. It attends over the
whole buffer and masks positions not yet written, so the work per token is that of the
buffer's length. Models with recurrent memory decode through memlm.decode.static_memory, which
builds on this step.

Precision: with `dtype` (e.g. torch.bfloat16) the decoder runs its own copy of the model cast
to that dtype, outside autocast, so each step reads half the bytes and launches no weight
casts; without it the model runs as it is, under whatever autocast surrounds the calls.
"""

from __future__ import annotations

import contextlib
import copy
import math

import torch
from torch import nn

from memlm.nn.kernels import merge_partials
from memlm.nn.positions import check_positions, sinusoidal_table, t5_buckets


def unsupported_reason(model: nn.Module) -> str | None:
    """Why `model` cannot decode with a static cache, or None when it can."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "blocks"):
        return "not a memlm LanguageModel"
    m = config.memory
    if config.recurrent:
        return "its state carries recurrent or kNN memory, not only a key/value cache"
    if m.tokens.count:
        return "memory tokens change the cache at segment boundaries"
    if m.adaptive_span.enabled:
        return "adaptive span is not implemented in the static decode step"
    return None


def rotated_keys(attention: nn.Module, k: torch.Tensor, first_slot: int | torch.Tensor) -> torch.Tensor:
    """Keys (B, Hkv, n, D) as the cache holds them: rotated (RoPE / xPos) at their slots
    first_slot..first_slot+n-1 (or, given a tensor (n,), at those slots). The step rotates its query at its own slot, so a score sees the
    difference of the two slots, which is the difference of their stream positions: what the
    forward's relative rotation gives, with one rotation per key instead of one per key and step."""
    return attention.rotary.rotate(k, first_slot, -1.0) if attention.rotary is not None else k


def _cast_parameters(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """An eval-mode copy of `model` with parameters in `dtype` and buffers (rotary tables,
    frequencies) shared with the original at their own precision."""
    cast = copy.deepcopy(model).to(dtype).eval()
    for copied, original in zip(cast.modules(), model.modules()):
        for name, buffer in original.named_buffers(recurse=False):
            setattr(copied, name, buffer)
    return cast


class StaticDecoder:
    """Greedy or sampled decoding of `batch_size` rows over a cache of `max_len` positions.

    decoder = StaticDecoder(model, batch_size=1, max_len=512, compile=True)
    logits = decoder.prefill(prompt)        # (B, V) logits after the prompt (B, T0)
    logits = decoder.step(next_ids)         # (B, V) logits after one more token (B, 1)

    One decoder serves many generations (prefill restarts it), so compilation and graph
    capture happen once. `graph` (default: on CUDA) captures the step in a CUDA graph at the
    first `step`; `compile` applies torch.compile to the step first (fewer, fused kernels).
    """

    def __init__(self, model: nn.Module, batch_size: int, max_len: int, *, compile: bool = False,
                 graph: bool | None = None, dtype: torch.dtype | None = None,
                 cache_lengths: list[int] | None = None):
        """cache_lengths: slots of each layer's cache (default max_len each); a shorter cache holds
        the last slots of the max_len the positions are numbered over."""
        reason = self.unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"static-cache decoding does not support this model: {reason}")
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"batch_size and max_len must be positive, got {batch_size} and {max_len}")
        c = model.config
        if c.position.kind in ("learned", "tupe"):
            check_positions(c.position.kind, 0, max_len, c.positions_limit)
        self.source = model
        self.model = _cast_parameters(model, dtype) if dtype is not None else model
        self.dtype = dtype
        self.batch_size, self.max_len = batch_size, max_len
        device = next(self.model.parameters()).device
        self.device = device
        self.graph = device.type == "cuda" if graph is None else graph
        if self.graph and device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA model")
        cache_dtype = dtype or (torch.get_autocast_dtype("cuda") if device.type == "cuda"
                                and torch.is_autocast_enabled("cuda") else next(self.model.parameters()).dtype)
        # one tensor per layer, not one (L, ...) tensor: compiled, a write into a view of a stacked
        # buffer became a copy of the whole buffer per step (BENCHMARKS.md)
        self.cache_lengths = cache_lengths if cache_lengths is not None else [max_len] * c.layers
        shapes = [(batch_size, c.kv_heads, n, c.head_dim) for n in self.cache_lengths]
        self.k_cache = [torch.zeros(shape, dtype=cache_dtype, device=device) for shape in shapes]  # L x (B, Hkv, S_i, D)
        self.v_cache = [torch.zeros(shape, dtype=cache_dtype, device=device) for shape in shapes]
        self.key_positions = torch.arange(max_len, device=device)  # (S,)
        self._tupe_keys = None  # (S, H, D) TUPE key-side projections of every slot, set by prefill
        if self.model.tupe is not None:
            tupe = self.model.tupe
            self._tupe_keys = torch.zeros(max_len, tupe.heads, tupe.head_dim, dtype=tupe.key.weight.dtype,
                                          device=device)
        self.length = 0  # positions written (host-side, so bounds are checked without a sync)
        self.step_fn = torch.compile(self._step, dynamic=False, fullgraph=self.fullgraph) if compile else self._step
        self._ids = torch.zeros(batch_size, 1, dtype=torch.long, device=device)  # static inputs of the graph
        self._position = torch.zeros((), dtype=torch.long, device=device)
        self._logits = None
        self._cuda_graph = None
        self._graph_pool = None  # the captures' memory pool, shared when a step is captured again

    fullgraph = True
    """Compile the step as one graph (no Python left between its kernels)."""

    @staticmethod
    def unsupported_reason(model: nn.Module) -> str | None:
        return unsupported_reason(model)

    # ----- public -----------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, prompt: torch.Tensor) -> torch.Tensor:
        """Run the prompt (B, T0) through the model's forward, store its keys and values, and
        return the logits of its last position (B, V)."""
        B, T0 = prompt.shape
        if B != self.batch_size:
            raise ValueError(f"the decoder holds {self.batch_size} rows, the prompt has {B}")
        if not 1 <= T0 <= self.max_len:
            raise ValueError(f"prompt length {T0} must lie in 1..{self.max_len} (the cache size)")
        with self._precision():
            out = self.model(prompt, state=self.model.init_state(B, device=prompt.device))
        for i, (block, layer) in enumerate(zip(self.model.blocks, out.state.layers)):
            self.k_cache[i][:, :, :T0].copy_(rotated_keys(block.attention, layer.k, 0))
            self.v_cache[i][:, :, :T0].copy_(layer.v)
        self.length = T0
        if self.model.tupe is not None:  # TUPE's key-side term depends only on the slot: once per prompt
            tupe = self.model.tupe
            self._tupe_keys.copy_(tupe.key(tupe.table(self.key_positions)).view(-1, tupe.heads, tupe.head_dim))
        return out.logits[:, -1]

    @torch.no_grad()
    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """Append ids (B, 1) at the next position; logits (B, V) there. The returned tensor is
        overwritten by the next step when a CUDA graph runs it: copy it to keep it."""
        self._check_step()
        self._ids.copy_(ids)
        self._position.fill_(self.length)
        if self.graph:
            if self._cuda_graph is None:
                self._capture()
            self._cuda_graph.replay()
        else:
            with self._precision():
                self._logits = self.step_fn(self._ids, self._position, self.k_cache, self.v_cache)
        self.length += 1
        self._after_step()
        return self._logits

    def _check_step(self) -> None:
        """Refuse a step before a prefill or past the cache."""
        if self.length == 0:
            raise RuntimeError("prefill a prompt before decoding")
        if self.length >= self.max_len:
            raise ValueError(f"the cache holds {self.max_len} positions and is full")

    def _after_step(self) -> None:
        """Host-side work after a step (the memory decoder rolls its memory here)."""

    # ----- the step ---------------------------------------------------------------------
    def _precision(self):
        """Outside autocast when the decoder holds its own cast copy of the model."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, enabled=False)

    def _capture(self) -> None:
        """Warm up on a side stream (compiles, fills allocator caches), then record one step.
        Warm-up writes the current position's slot, which the real step overwrites."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream), self._precision():
            for _ in range(3):
                self.step_fn(self._ids, self._position, self.k_cache, self.v_cache)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool), self._precision():
            self._logits = self.step_fn(self._ids, self._position, self.k_cache, self.v_cache)
        self._cuda_graph = graph
        self._graph_pool = graph.pool()

    def _step(self, ids: torch.Tensor, position: torch.Tensor, k_cache: list[torch.Tensor],
              v_cache: list[torch.Tensor]) -> torch.Tensor:
        """ids (B, 1) at `position` (0-d long tensor) -> logits (B, V); writes the caches (one per
        layer) in place."""
        model = self.model
        x = self._embed(ids, position)  # (B, 1, W)
        visible = self.key_positions <= position  # (S,)
        bias = self._shared_bias(position)
        for i, block in enumerate(model.blocks):
            layer_bias = bias[0 if len(bias) == 1 else i] if bias else None

            def attend(h, i=i, block=block, layer_bias=layer_bias):
                return self._attention(block.attention, h, position, visible, layer_bias, k_cache[i], v_cache[i])

            if block.pre_norm:
                x = x + attend(block.attn_norm(x))
                if block.feedforward is not None:
                    x = x + block.feedforward(block.ff_norm(x))
            else:
                x = block.attn_norm(x + attend(x))
                if block.feedforward is not None:
                    x = block.ff_norm(x + block.feedforward(x))
        return model.head(model.final_norm(x))[:, -1]  # (B, V)

    def _embed(self, ids: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, 1, W) of ids (B, 1) at `position`, with absolute positions if any."""
        model = self.model
        x = model.embed(ids)
        if model.positions is not None:
            where = position.view(1)
            table = model.positions.table(where) if model.positions.table is not None \
                else sinusoidal_table(where, model.config.width)
            x = x + table.to(x.dtype)
        return x

    def _shared_bias(self, position: torch.Tensor) -> list[torch.Tensor]:
        """T5 / TUPE score terms (H, S) of the query at `position` against every cache slot, one
        per T5 table (shared: one for all layers); [] without such terms."""
        model = self.model
        distance = position - self.key_positions  # (S,)
        tables = []
        if model.relative_bias is not None:
            for t5 in model.relative_bias:
                tables.append(t5.table(t5_buckets(distance, t5.buckets, t5.max_distance)).t())  # (H, S)
        if model.tupe is not None:
            tupe = model.tupe
            uq = tupe.query(tupe.table(position.view(1))).view(tupe.heads, tupe.head_dim)  # (H, D)
            term = torch.einsum("hd,shd->hs", uq, self._tupe_keys.to(uq.dtype)) / math.sqrt(2 * tupe.head_dim)  # (H, S)
            tables = [t + term for t in tables] if tables else [term]
        return tables

    def _attention(self, attention, h: torch.Tensor, position: torch.Tensor, visible: torch.Tensor,
                   bias: torch.Tensor | None, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot: torch.Tensor | None = None, sources=(), store=None,
                   key_positions: torch.Tensor | None = None) -> torch.Tensor:
        """One query per row: h (B, 1, W) -> (B, 1, W); writes this position's key and value at
        `slot` (0-d long; default: the position) of the caches (B, Hkv, S, D).

        visible: (S,) or (B, S) bool, the cache slots the query sees; their stream positions are
        `key_positions` (S,), default `self.key_positions`. Persistent memory, the registry's per-row sources and the kNN
        store are merged as the model's attention merges them (memlm.nn.attention)."""
        B = h.shape[0]
        H, Hkv, D = attention.heads, attention.kv_heads, attention.head_dim
        G = H // Hkv
        q, k, v = attention.project(h)  # (B, H, 1, D), (B, Hkv, 1, D) x 2
        where = (position if slot is None else slot).view(1)  # this position's slot
        k_cache[:, :, where] = rotated_keys(attention, k, where).to(k_cache.dtype)  # (B, Hkv, S, D)
        v_cache[:, :, where] = v.to(v_cache.dtype)
        scale = attention.scale
        if attention.qk_scale is not None:
            q = q * attention.qk_scale.to(q.dtype)
            scale = 1.0
        q_unrotated = q  # for the position-free sources (persistent, registry, kNN)
        if attention.rotary is not None:  # at its slot, as every cached key is: the scores see slot differences
            q = attention.rotary.rotate(q, where, +1.0)
        q = q.view(B, Hkv, G, D)
        key_positions = self.key_positions if key_positions is None else key_positions
        distance = key_positions - position  # (S,) <= 0 for every visible key
        scores = (q @ k_cache.to(q.dtype).transpose(-1, -2)).float() * scale  # (B, Hkv, G, S)
        if bias is not None:
            scores = scores + bias.view(1, Hkv, G, -1).float()
        if attention.span is not None:  # adaptive span's soft mask over the distance
            mask = attention.span.mask((-distance).clamp_min(0).float()[None])  # (H, 1, S)
            span = torch.where(mask > 0, mask.clamp_min(1e-30).log(), float("-inf"))
            scores = scores + span.view(1, Hkv, G, -1)
        scores = scores.masked_fill(~(visible if visible.dim() == 1 else visible[:, None, None, :]), float("-inf"))
        lse = scores.logsumexp(dim=-1)  # (B, Hkv, G)
        probs = (scores - lse[..., None]).exp().to(q.dtype)
        y = (probs @ v_cache.to(q.dtype)).view(B, H, 1, D)
        lse = lse.view(B, H, 1)
        if attention.persistent is not None:  # no position, always visible: merged exactly
            y, lse = merge_partials(y, lse, *attention.persistent(q_unrotated, scale, 0.0,
                                                                   attention.qk_scale is not None))
        for read in sources:  # per-row memories without position (memlm.memory.registry)
            y, lse = merge_partials(y, lse, *read(q_unrotated, 0.0))
        if store is not None:  # kNN memory
            y = attention.knn(y, lse, store, q_unrotated, scale, 0.0)
        return attention.out(y.reshape(B, 1, H * D))
