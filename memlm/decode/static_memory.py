"""Static-cache decoding of models with recurrent memory: Transformer-XL memory (one length per
layer), layerwise feedback, compressive memory, persistent vectors, adaptive span, kNN memory
and the registry's slot memories, one token at a time over buffers of fixed shapes.

Transformer-XL ("Transformer-XL: Attentive Language Models Beyond a Fixed-Length Context", Dai et
al., arXiv 1901.02860) evaluates with a cache of earlier states; at inference the projections do
not change, so caching their keys and values instead is exact, and it is what this module does.

The eager path (`memlm.generate` through the model's forward) keeps a layer's memory as hidden
states and projects all of them through the layer's key/value weights again for every new
token. Here layer i's keys and values live in one preallocated buffer (B, Hkv, R_i + T, D):

    slots 0 .. R_i-1        the memory the segment reads ([compressed | memory], right-aligned),
                            its keys and values projected once, when the segment starts
    slots R_i .. R_i+T-1    the segment's own positions, written in place as they are decoded

with T = seq_len and R_i the memory layer i keeps in evaluation plus the compressed memory's
length. The stream positions of the longest layer's slots are in `key_positions` (S,); a
shorter layer's slots are the last R_i + T of them. A key is visible
to the query at position p when it lies in the layer's memory window, at or before p, and at or
after its row's document start (`State.reset`). The step (`StaticDecoder._attention`, shared
with the plain decoder) therefore has the same shapes at every position, which is what
`torch.compile` with static shapes and CUDA-graph replay need.

When a segment completes, the memory rolls outside the step, through the model's own code
(`memlm.memory.xl.next_layers`: feedback, compression, kNN writes; the registry's writes) on
the inputs the step recorded, and the memory slots are projected anew. Between rolls the step
records each layer's input (and the top layer's output) in fixed buffers, as the forward's
`pending` state does. Prefill runs the prompt through the model's forward.

Not supported (`unsupported_reason`): memory tokens (they change the key set at segment
boundaries) and TUPE with memory (its positions are numbered in the attended window).

CUDA graphs: every buffer above keeps its address, so one capture serves the whole stream. An
exact kNN store is written in place at each roll (its counts too) and a captured search covers
its whole capacity (masked by the counts), so it is captured once as well, and again only when
a State with other stores is loaded (a new session's). The slot memories' readers, and stores
of other kinds, are new objects after each roll; for models with them the step is captured
again at the first step of each segment (in a pool of its own), a few step-times per seq_len tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from memlm.decode.static import StaticDecoder, rotated_keys
from memlm.memory import xl
from memlm.memory.knn.exact import ExactStore
from memlm.state import LayerState, State

MEMORY_ONLY = tuple(name for name in xl.MEMORY_FIELDS if name != "pending")
"""LayerState fields that a segment reads as memory from its start (oldest first)."""


def unsupported_reason(model: nn.Module) -> str | None:
    """Why `model` cannot decode with this static memory cache, or None when it can."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "blocks"):
        return "not a memlm LanguageModel"
    if not config.recurrent:
        return "it carries no recurrent memory (memlm.decode.static serves it)"
    if config.memory.tokens.count:
        return "memory tokens change the key set at segment boundaries"
    if config.position.kind == "tupe":
        return "TUPE with memory numbers positions in the attended window"
    return None


def captured_per_segment(model: nn.Module) -> bool:
    """Whether the step of `model` reads tensors that a segment's end replaces rather than
    overwrites (the slot memories' readers), so that a CUDA graph of it is captured again after
    each roll. kNN stores are judged by what they are (`store_signature`)."""
    return len(model.mechanisms) > 0


def store_signature(stores: dict) -> list | None:
    """What a captured step reads of a State's kNN stores: by layer, each store's tensors that its
    search reads (held, so that none is freed while a graph reads it); None when some store is
    not an exact store written in place (a graph must then be captured again after every roll)."""
    if any(not isinstance(store, ExactStore) for store in stores.values()):
        return None
    return [(i, store.tensors()) for i, store in sorted(stores.items())]


def same_stores(a: list | None, b: list | None) -> bool:
    """Whether two store signatures name the very same tensors (identity, not values)."""
    if a is None or b is None or len(a) != len(b):
        return False
    return all(i == j and len(x) == len(y) and all(s is t for s, t in zip(x, y)) for (i, x), (j, y) in zip(a, b))


class MemoryStaticDecoder(StaticDecoder):
    """Decoding of `batch_size` streams of a model with recurrent memory over fixed buffers.

    decoder = MemoryStaticDecoder(model, batch_size=1)
    logits = decoder.prefill(prompt)        # (B, V) after the prompt (B, T0), from an empty memory
    logits = decoder.prefill(prompt, state) # ... or continuing an earlier stream's State
    logits = decoder.step(next_ids)         # (B, V) after one more token (B, 1), for ever (StaticDecoder.step)
    decoder.reset(mask)                     # rows where mask (B,) is True start a new document
    state = decoder.state()                 # the model's State at this point (as the forward's)

    The stream has no length limit: the memory rolls every seq_len positions.
    """

    def __init__(self, model: nn.Module, batch_size: int, *, compile: bool = False, graph: bool | None = None,
                 dtype: torch.dtype | None = None):
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"static-cache decoding does not support this model: {reason}")
        c = model.config
        self.recapture = captured_per_segment(model)
        self.fullgraph = not (self.recapture or c.memory.knn.layers)  # the kNN search may leave the compiled graph
        self._captured_stores: list | None = None  # store_signature of the stores the captured step reads
        # R_i: the memory slots of layer i (its evaluation memory and the compressed memory); each
        # layer's cache holds its own R_i + T slots, so a layer with a short memory reads no slots
        # it never fills (depth-dependent lengths: 512 below, 2,048 above)
        self.layer_slots = [length + c.memory.compressive.length for length in c.memory_lengths(training=False)]
        self.memory_slots = max(self.layer_slots)  # R
        self.segment = c.seq_len  # T
        super().__init__(model, batch_size, self.memory_slots + self.segment, compile=compile, graph=graph,
                         dtype=dtype, cache_lengths=[r + self.segment for r in self.layer_slots])
        W, L, device = c.width, c.layers, self.device
        hidden = dtype or next(self.model.parameters()).dtype
        self.hidden_dtype = hidden
        # per layer, as the caches (StaticDecoder): the step writes them in place
        self.inputs = [torch.zeros(batch_size, self.segment, W, dtype=hidden, device=device) for _ in range(L)]  # L x (B, T, W)
        self.top = torch.zeros(batch_size, self.segment, W, dtype=hidden, device=device)  # (B, T, W)
        self.added = [torch.zeros(batch_size, self.segment, W, dtype=hidden, device=device) for _ in range(L)]  # feedback add
        self.first_visible = torch.zeros(L, dtype=torch.long, device=device)  # (L,) oldest memory position
        self.row_start = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,)
        self._segment_start = torch.zeros((), dtype=torch.long, device=device)
        self._host: State | None = None  # the State at the segment's start: memory, stores, extensions
        self._sources: dict[int, list] = {}
        self.segment_start = 0

    unsupported_reason = staticmethod(unsupported_reason)

    # ----- public -----------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, prompt: torch.Tensor, state: State | None = None) -> torch.Tensor:
        """Run the prompt (B, T0) through the model's forward from `state` (an earlier stream's
        State: a session's memory) or from an empty memory; logits (B, V) of its last position."""
        B, T0 = prompt.shape
        if B != self.batch_size:
            raise ValueError(f"the decoder holds {self.batch_size} rows, the prompt has {B}")
        if T0 < 1:
            raise ValueError("the prompt must hold at least one token")
        if state is not None and state.batch_size != B:
            raise ValueError(f"the state holds {state.batch_size} rows, the prompt has {B}")
        with self._precision():
            out = self.model(prompt, state=state if state is not None else self.model.init_state(B, device=prompt.device))
        self._load(out.state)
        return out.logits[:, -1]

    def _check_step(self) -> None:
        if self._host is None:
            raise RuntimeError("prefill a prompt before decoding")

    def _after_step(self) -> None:
        if self.length - self.segment_start == self.segment:  # the segment is complete
            self._roll()

    @torch.no_grad()
    def reset(self, mask: torch.Tensor) -> None:
        """Rows where mask (B,) is True forget their past (State.reset)."""
        if self._host is None:
            raise RuntimeError("prefill a prompt before resetting rows")
        self._load(self.state().reset(mask))

    def state(self) -> State:
        """The model's State after the tokens so far: what its forward would return."""
        if self._host is None:
            raise RuntimeError("prefill a prompt first")
        done = self.length - self.segment_start
        if not done:
            return self._host
        layers = [layer.replace(pending=self.inputs[i][:, :done].clone()) for i, layer in enumerate(self._host.layers)]
        layers[-1] = layers[-1].replace(top=self.top[:, :done].clone())
        return State(self.length, self._host.row_start, layers, self._host.masked, self._host.stores)

    # ----- segment boundaries (host side) -----------------------------------------------
    def _roll(self) -> None:
        """The segment is complete: roll every layer's memory through the model's own code."""
        host, model = self._host, self.model
        layers = [LayerState(cmem=layer.cmem, mem=layer.mem, feedback=layer.feedback, external=layer.external,
                             extensions=dict(layer.extensions)) for layer in host.layers]
        inputs = [buffer.clone() for buffer in self.inputs]
        writable = {i: store for i, store in host.stores.items() if not store.shared}
        with self._precision():
            layers, _, completed = xl.next_layers(model, layers, inputs, self.top.clone(), writable, self.length)
            state = State(self.length, host.row_start, layers, host.masked, host.stores)
            if completed is not None:
                model._write_mechanisms(layers, completed, state, self.length)
        self._load(state)

    def _load(self, state: State) -> None:
        """Fill the buffers from a State: memory slots, the unfinished segment, feedback, rows."""
        model, R = self.model, self.memory_slots
        pending = state.layers[0].pending
        done = pending.shape[1] if pending is not None else 0
        if done >= self.segment:
            raise ValueError(f"a state with {done} pending positions (a segment holds {self.segment})")
        self.length, self.segment_start = state.position, state.position - done
        self._segment_start.fill_(self.segment_start)
        self.key_positions.copy_(torch.arange(self.max_len, device=self.device) + self.segment_start - R)
        self.row_start.copy_(state.row_start)
        with self._precision():
            for i, (block, layer) in enumerate(zip(model.blocks, state.layers)):
                parts = [t for t in (getattr(layer, name) for name in MEMORY_ONLY) if t is not None and t.shape[1]]
                memory = torch.cat(parts, dim=1) if parts else None  # (B, n, W)
                n = memory.shape[1] if memory is not None else 0
                slots = self.layer_slots[i]
                if n > slots:
                    raise ValueError(f"layer {i} holds {n} memory positions, the decoder has {slots} slots for it")
                self.first_visible[i] = self.segment_start - n
                if n:
                    self._project_into(i, block, memory, slots - n)
                if done:
                    self._project_into(i, block, layer.pending, slots)
                    self.inputs[i][:, :done].copy_(layer.pending)
                feedback = layer.feedback
                self.added[i].zero_()
                if feedback is not None:
                    self.added[i][:, :feedback.shape[1]].copy_(feedback[:, :self.segment])
            if done:
                self.top[:, :done].copy_(state.layers[-1].top)
            self._sources = model._sources(state)
        stores = store_signature(state.stores)
        if self.recapture or not same_stores(stores, self._captured_stores):
            # the step would read new tensors: capture it again at the next step, in a pool of its
            # own (capturing into the pool of a graph already freed fails in the allocator)
            self._cuda_graph, self._graph_pool = None, None
            self._captured_stores = stores
        layers = [layer.replace(pending=None, top=None) for layer in state.layers]
        self._host = State(state.position, state.row_start, layers, state.masked, state.stores)

    def _project_into(self, i: int, block: nn.Module, states: torch.Tensor, first: int) -> None:
        """Keys and values of hidden states (B, n, W) into slots first..first+n-1 of layer i."""
        h = block.attn_norm(states) if block.pre_norm else states
        k, v = block.attention.project_kv(h.to(self.hidden_dtype))  # (B, Hkv, n, D)
        n = states.shape[1]
        self.k_cache[i][:, :, first:first + n].copy_(rotated_keys(block.attention, k, first))
        self.v_cache[i][:, :, first:first + n].copy_(v)

    # ----- the step ---------------------------------------------------------------------
    def _step(self, ids: torch.Tensor, position: torch.Tensor, k_cache: list[torch.Tensor],
              v_cache: list[torch.Tensor]) -> torch.Tensor:
        """ids (B, 1) at `position` (0-d long) -> logits (B, V); writes keys, values and inputs
        of the position in place."""
        model = self.model
        x = self._embed(ids, position)  # (B, 1, W)
        offset = (position - self._segment_start).view(1)  # index within the segment
        R, keys = self.memory_slots, self.key_positions  # (S,) positions of the longest layer's slots
        seen = (keys <= position)[None, :] & (keys[None, :] >= self.row_start[:, None])  # (B, S)
        bias = self._shared_bias(position)
        add_feedback = model.config.memory.feedback.mode == "add"
        h = x
        for i, block in enumerate(model.blocks):
            if add_feedback:
                h = h + self.added[i].index_select(1, offset).to(h.dtype)
            self.inputs[i][:, offset] = h.to(self.hidden_dtype)
            first = R - self.layer_slots[i]  # layer i's cache holds the last S - first of those slots
            layer_keys = keys[first:]  # (S_i,)
            visible = seen[:, first:] & (layer_keys >= self.first_visible[i])[None, :]  # (B, S_i)
            layer_bias = bias[0 if len(bias) == 1 else i][:, first:] if bias else None  # (H, S_i)
            store = self._host.stores.get(i) if block.attention.knn is not None else None

            def attend(a, i=i, block=block, visible=visible, layer_bias=layer_bias, store=store, layer_keys=layer_keys):
                return self._attention(block.attention, a, position, visible, layer_bias, k_cache[i], v_cache[i],
                                       slot=self.layer_slots[i] + offset, sources=self._sources.get(i, ()),
                                       store=store, key_positions=layer_keys)

            if block.pre_norm:
                h = h + attend(block.attn_norm(h))
                if block.feedforward is not None:
                    h = h + block.feedforward(block.ff_norm(h))
            else:
                h = block.attn_norm(h + attend(h))
                if block.feedforward is not None:
                    h = block.ff_norm(h + block.feedforward(h))
        self.top[:, offset] = h.to(self.top.dtype)
        return model.head(model.final_norm(h))[:, -1]  # (B, V)
