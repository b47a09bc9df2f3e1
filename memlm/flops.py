"""Training FLOPs of a memlm model, memory counted: what `LanguageModel.flops_per_token` reports
and `memlm bench` divides the measured matmul peak by (a row's FLOP limit).

The PaLM / nanoGPT estimate ("PaLM: Scaling Language Modeling with Pathways", Chowdhery et al.,
arXiv 2204.02311, appendix B): 6 x matmul weights per token, plus 12 x heads x head_dim per key a
query is scored against; here every key a memory adds is counted (tests/test_flops.py checks
the count against torch's FlopCounterMode on tiny models), and the matmuls memory mechanisms add.
"""

from __future__ import annotations

from torch import nn


def flops_per_token(model, context: int | None = None) -> float:
    """Training FLOPs per token (forward + backward), the PaLM / nanoGPT estimate: 6 x matmul
    weights, plus 12 x heads x head_dim for every key a query is scored against (scores and
    values, forward and backward; masked keys included, as a dense kernel computes them).

    Without `context`, memory counted (`segment_flops` over seq_len): every key of
    `attended_keys_by_layer` (recurrent and compressed memory, persistent vectors, memory
    tokens, kNN top-k, NTM slots), the memory tokens' positions through the blocks and the
    matmuls memory mechanisms add (`memory_flops_per_segment`), in training with every memory
    full. Every attended key counts 12 x, also where the code computes less: no gradient reaches
    retrieved kNN pairs (unless straight_through) or the queries of the compressive
    reconstruction loss. The kNN search is not counted (`search_flops_per_token`). With an int
    `context`, the dense count of a model without memory: 6 x (block + head matmul weights) +
    12 x layers x heads x head_dim x context."""
    c = model.config
    if context is not None:
        context = context or c.seq_len
        attention = 12 * c.layers * c.attention.heads * c.head_dim * context
        return 6 * (_block_matmul_weights(model) + model.head.weight.numel()) + attention
    return segment_flops(model) / c.seq_len


def segment_flops(model) -> int:
    """Training FLOPs (forward + backward) of one row's segment of seq_len tokens with every
    memory full, as `flops_per_token` counts them: the head on the seq_len tokens, the blocks'
    weights and attention at every framed position (`segment_positions`), and the memory
    mechanisms' own matmuls."""
    c = model.config
    per_query = 12 * c.attention.heads * c.head_dim * sum(attended_keys_by_layer(model))
    blocks = segment_positions(model) * (6 * _block_matmul_weights(model) + per_query)
    return 6 * model.head.weight.numel() * c.seq_len + blocks + memory_flops_per_segment(model)


def segment_positions(model) -> int:
    """Positions a training segment runs through the blocks: its seq_len tokens and the memory
    tokens framed around them (read tokens; write tokens too in recurrent mode, memlm.memory.tokens)."""
    t = model.config.memory.tokens
    return model.config.seq_len + t.count * (2 if t.recurrent else 1)


def memory_positions_by_layer(model) -> list[int]:
    """Hidden states of earlier segments each layer holds in training once full, bottom to top: its
    recurrent memory (memory.xl training length; feedback chooses what it holds, not how much)
    plus the compressed memory (memory.compressive.length on every layer when on)."""
    m = model.config.memory
    compressed = m.compressive.length if m.compressive.rate else 0
    return [n + compressed for n in model.config.memory_lengths(training=True)]


def attended_keys_by_layer(model) -> list[int]:
    """Keys a query of a full training segment is scored against in each layer, bottom to top,
    with every memory full: the framed segment (`segment_positions`), the layer's recurrent and
    compressed memory, the persistent vectors, the kNN layers' top-k and the NTM layers' slots.
    Adaptive span and masks hide keys but a dense kernel still scores them: they count."""
    m = model.config.memory
    keys = []
    for layer, memory in enumerate(memory_positions_by_layer(model)):
        n = segment_positions(model) + memory + m.persistent.vectors
        n += m.knn.k if layer in (m.knn.layers or ()) else 0
        n += m.ntm.slots if layer in (m.ntm.layers or ()) else 0
        keys.append(n)
    return keys


def memory_flops_per_segment(model) -> int:
    """Matmul FLOPs memory mechanisms add to a training segment besides their keys' attention
    (`segment_flops`): projecting the memory, compressing it, writing the kNN stores and the NTM
    controller."""
    return (_memory_projection_flops(model) + _compression_flops(model) + _knn_write_flops(model)
            + _ntm_flops(model))


def search_flops_per_token(model) -> float:
    """FLOPs of the kNN search per token with full stores, not in `flops_per_token` (retrieval,
    not model FLOPs): the exact store scores each framed query against all `capacity` entries of
    its row, 2 x heads x head_dim x capacity per kNN layer, forward only (faiss indexes differ)."""
    c = model.config
    layers = len(c.memory.knn.layers or ())
    search = 2 * c.attention.heads * c.head_dim * c.memory.knn.capacity * layers
    return search * segment_positions(model) / c.seq_len


def _block_matmul_weights(model) -> int:
    """Weights of every nn.Linear in the blocks (each used once per position in a pass)."""
    return sum(linear.weight.numel() for linear in model.blocks.modules() if isinstance(linear, nn.Linear))


def _kv_weights(model) -> int:
    """Weights of one layer's key and value projections (the rows of qkv memory is projected with)."""
    c = model.config
    return 2 * c.kv_heads * c.head_dim * c.width


def _memory_projection_flops(model) -> int:
    """Recurrent and compressed memory are projected with the layer's key/value weights every
    segment (memlm.nn.attention `forward`): forward and weight gradient, and, pre-norm, the input
    gradient too (the detached memory passes through the layer's norm, whose weights train), so
    6 (pre-norm) or 4 (post-norm) x kv weights per memory position."""
    factor = 6 if model.config.norm.placement == "pre" else 4
    return factor * _kv_weights(model) * sum(memory_positions_by_layer(model))


def _compression_flops(model) -> int:
    """Compressive memory (memlm.memory.compressive), each layer per segment, with the overflow
    of a full memory: U = seq_len // rate x rate states leave it as n = U / rate slots.
    conv: the compressor, forward and weight gradient (its input is detached),
    4 x (rate x width^2) x n; the reconstruction loss: two query projections of the segment
    and the key/value projections of the old states (forward only, weights detached) and of
    the compressed ones (forward and input gradient), content attention over the old states
    (forward, 4 x heads x head_dim per query and key) and over the compressed ones (12 x, as
    every key). most_used: the usage scores (forward only): one query projection, the old
    states' key/value projection and the scores, 2 x heads x head_dim per query and key.
    max, mean: no matmul."""
    c = model.config
    rate, kind = c.memory.compressive.rate, c.memory.compressive.fn
    if not rate or kind in ("max", "mean"):
        return 0
    T, HD = c.seq_len, c.attention.heads * c.head_dim
    n = T // rate
    old, q_proj, kv = n * rate, 2 * c.width * HD * T, _kv_weights(model)
    if kind == "most_used":
        per_layer = q_proj + 2 * kv * old + 2 * HD * T * old
    else:
        compressor = 4 * rate * c.width ** 2 * n
        projections = 2 * q_proj + 2 * kv * old + 4 * kv * n
        per_layer = compressor + projections + 4 * HD * T * old + 12 * HD * T * n
    return c.layers * per_layer


def _knn_write_flops(model) -> int:
    """A completed segment's keys and values are projected into each kNN layer's store
    (memlm.memory.knn `write_segment`): forward only, 2 x kv weights per token."""
    c = model.config
    return 2 * _kv_weights(model) * c.seq_len * len(c.memory.knn.layers or ())


def _ntm_flops(model) -> int:
    """NTM memory (memlm.memory.ntm), each NTM layer per segment of T tokens, N slots: the
    slots' key/value projection, forward and both gradients, 6 x kv weights x N; the controller
    (width -> 3 width + 1) on the last segment's inputs, 6 x in the read (the pending write is
    replayed with gradients) and 2 x in the write, so 8 x its weights x T; the addressing
    (similarity, erase, add: 2 x N x width each per position forward), with both gradients in
    the read and forward in the write, 3 x (6 + 2) x N x width x T."""
    c = model.config
    layers, N, W, T = len(c.memory.ntm.layers or ()), c.memory.ntm.slots, c.width, c.seq_len
    controller = W * (3 * W + 1)
    return layers * (6 * _kv_weights(model) * N + 8 * controller * T + 24 * N * W * T)
