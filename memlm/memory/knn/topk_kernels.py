"""The Triton kernels of the fused exact top-k search (memlm.memory.knn.fused_topk, whose module
docstring gives the algorithm, its exactness argument and its costs), the search of ExactStore,
the exact kNN lookup of "Memorizing Transformers" (Wu et al., arXiv 2203.08913):

- `tile_max_kernel` (kernel 1): per query, the maximum score of every tile of keys;
- `candidates_kernel` (kernel 2): fp32 scores of the keys of each query's selected tiles;
- `row_topk_kernel` (selection): the best k entries of each row, best first.

The kernels are plain functions here: fused_topk jit-decorates them on first use, per
TRITON_INTERPRET mode. The device functions they share (one key block's scores, the
program's queries, values packed with their columns for selection) are jit-decorated at import.
"""

try:  # optional: without triton nothing here is decorated or run
    import triton
    import triton.language as tl
except Exception:  # ImportError, or a broken install
    triton = None

    class tl:  # noqa: N801 - stand-in so that the kernels' annotations evaluate without triton
        constexpr = "constexpr"

# (no `from __future__ import annotations` here: older Triton interpreters recognise constexpr
# parameters only by their evaluated annotation)

__all__ = ["candidates_kernel", "row_topk_kernel", "tile_max_kernel"]


def _device_function(fn):
    """triton.jit for a function the kernels call, decorated at import (in the mode TRITON_INTERPRET
    has then, as triton.language's own tl.sum / tl.max are): a compiled kernel resolves it by its
    global name, an interpreted one calls it."""
    return triton.jit(fn) if triton is not None else fn


@_device_function
def _program_queries(Q, CNT, M, C, D, sqg, sqm, sqd, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """What program (query block, group) of kernel 1 or 2 reads first: (its group g, int64; its
    BLOCK query rows offs_m; offs_d = 0 .. BLOCK_D - 1; the group's live slots, CNT[g] clamped to
    [0, C], int32; its queries q (BLOCK, BLOCK_D) as stored, 0 past M and D)."""
    g = tl.program_id(1).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    cnt = tl.minimum(tl.maximum(tl.load(CNT + g), 0), C).to(tl.int32)
    q = tl.load(Q + g * sqg + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=(offs_m < M)[:, None] & (offs_d < D)[None, :], other=0.0)
    return g, offs_m, offs_d, cnt, q


@_device_function
def _block_scores(q, kptr, cols, cnt, offs_d, D, skc, LIVE: tl.constexpr, EVEN_D: tl.constexpr,
                  FP32: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Kernel 1's step: fp32 scores (BLOCK_M, BLOCK_N) of the queries q (BLOCK_M, BLOCK_D) against
    the keys at slots `cols` (BLOCK_N,), loaded transposed from kptr (BLOCK_D, 1). LIVE: slots >=
    cnt are masked (loaded as 0, scored -inf); else all of `cols` are live and only the padding of
    D is masked (unless EVEN_D)."""
    ok = cols < cnt
    if LIVE:
        kt = tl.load(kptr + cols[None, :] * skc, mask=ok[None, :] & (offs_d[:, None] < D), other=0.0)
    elif EVEN_D:
        kt = tl.load(kptr + cols[None, :] * skc)
    else:
        kt = tl.load(kptr + cols[None, :] * skc, mask=offs_d[:, None] < D, other=0.0)
    if UPCAST:  # interpreter only: its tl.dot cannot multiply bf16 (exact in fp32 anyway)
        kt = kt.to(tl.float32)
    if FP32 or UPCAST:
        s = tl.dot(q, kt, input_precision=PRECISION)
    else:
        s = tl.dot(q, kt)
    if LIVE:
        s = tl.where(ok[None, :], s, float("-inf"))
    return s


@_device_function
def _packed(x, col, BLOCK_N: tl.constexpr):
    """fp32 values x and their columns col (< BLOCK_N) packed into int64s whose order is the
    values' order, the lower column first among equal values (unique per column)."""
    bits = x.to(tl.int32, bitcast=True)
    order = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # int32 in the floats' order
    return (order.to(tl.int64) << 32) + (BLOCK_N - 1 - col).to(tl.int64)


@_device_function
def _unpacked(best, BLOCK_N: tl.constexpr):
    """(values fp32, columns) of `_packed` entries."""
    col = BLOCK_N - 1 - (best & 0xFFFFFFFF)
    top = (best >> 32).to(tl.int32)
    return tl.where(top >= 0, top, top ^ 0x7FFFFFFF).to(tl.float32, bitcast=True), col


def tile_max_kernel(Q, K, CNT, OUT, M, C, D, n_blocks,
                    sqg, sqm, sqd, skg, skc, skd, sog, som, sot,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    BN: tl.constexpr, STRIDED: tl.constexpr, EVEN_D: tl.constexpr,
                    FP32: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Kernel 1: program (query block, group) -> tile maxima OUT[g, m, t] of its BLOCK_M queries.
    strided: n_blocks = super-blocks of BLOCK_N * BN slots; consecutive: blocks of BLOCK_N."""
    g, offs_m, offs_d, cnt, q = _program_queries(Q, CNT, M, C, D, sqg, sqm, sqd, BLOCK_M, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    if UPCAST:  # interpreter only: its tl.dot cannot multiply bf16 (exact in fp32 anyway)
        q = q.to(tl.float32)
    kptr = K + g * skg + offs_d[:, None] * skd  # (BLOCK_D, 1): keys are loaded transposed
    optr = OUT + g * sog + offs_m[:, None] * som
    if STRIDED:
        for sb in range(0, n_blocks):
            base = sb * (BLOCK_N * BN)
            live = tl.maximum(cnt - base, 0)
            full = tl.minimum(live // BLOCK_N, BN)  # blocks entirely below cnt
            acc = tl.full((BLOCK_M, BLOCK_N), float("-inf"), tl.float32)
            for r in range(0, full):
                acc = tl.maximum(acc, _block_scores(q, kptr, base + r * BLOCK_N + offs_n, cnt, offs_d, D, skc,
                                                    False, EVEN_D, FP32, PRECISION, UPCAST))
            if full < BN:  # at most one block straddles cnt; later blocks are dead (-inf)
                acc = tl.maximum(acc, _block_scores(q, kptr, base + full * BLOCK_N + offs_n, cnt, offs_d, D, skc,
                                                    True, EVEN_D, FP32, PRECISION, UPCAST))
            tl.store(optr + (sb * BLOCK_N + offs_n)[None, :] * sot, acc, mask=m_ok[:, None])
    else:
        offs_t = tl.arange(0, BLOCK_N // BN)  # tiles per block
        n_tiles = (C + BN - 1) // BN
        for b in range(0, n_blocks):
            s = _block_scores(q, kptr, b * BLOCK_N + offs_n, cnt, offs_d, D, skc, True, EVEN_D, FP32, PRECISION,
                              UPCAST)
            mx = tl.max(tl.reshape(s, (BLOCK_M, BLOCK_N // BN, BN)), axis=2)  # (BLOCK_M, BLOCK_N // BN)
            t = b * (BLOCK_N // BN) + offs_t
            tl.store(optr + t[None, :] * sot, mx, mask=m_ok[:, None] & (t[None, :] < n_tiles))


def candidates_kernel(Q, K, CNT, SEL, OUT, M, C, D, nt,
                      sqg, sqm, sqd, skg, skc, skd, ssg, ssm, ssj, sog, som, soc,
                      BLOCK_Q: tl.constexpr, BN: tl.constexpr, BLOCK_D: tl.constexpr,
                      STRIDE: tl.constexpr):
    """Kernel 2: program (query block, group) -> fp32 scores OUT[g, m, j * BN + r] of key r of
    the j-th selected tile SEL[g, m, j]; -inf for slots >= count."""
    g, offs_q, offs_d, cnt, q = _program_queries(Q, CNT, M, C, D, sqg, sqm, sqd, BLOCK_Q, BLOCK_D)
    q = q.to(tl.float32)  # (BLOCK_Q, BLOCK_D)
    offs_r = tl.arange(0, BN)
    q_ok = offs_q < M
    d_ok = offs_d < D
    sel = SEL + g * ssg + offs_q * ssm
    out = OUT + g * sog + offs_q[:, None] * som + offs_r[None, :] * soc
    for j in range(0, nt):
        t = tl.load(sel + j * ssj, mask=q_ok, other=0).to(tl.int64)  # (BLOCK_Q,) tile ids
        rows = ((t // STRIDE) * (STRIDE * BN) + t % STRIDE)[:, None] + offs_r[None, :] * STRIDE  # (BLOCK_Q, BN)
        ok = (rows < cnt) & q_ok[:, None]
        kv = tl.load(K + g * skg + rows[:, :, None] * skc + offs_d[None, None, :] * skd,
                     mask=ok[:, :, None] & d_ok[None, None, :], other=0.0).to(tl.float32)  # (BLOCK_Q, BN, BLOCK_D)
        s = tl.sum(q[:, None, :] * kv, axis=2)
        tl.store(out + j * BN * soc, tl.where(ok, s, float("-inf")), mask=q_ok[:, None])


def row_topk_kernel(X, VAL, IDX, N, K, sxr, sxn, svr, svk, sir, sik,
                    BLOCK_N: tl.constexpr, BITONIC: tl.constexpr, KP: tl.constexpr, GROUP: tl.constexpr):
    """Selection: program r -> the K largest of row X[r, :N] (fp32), best first: VAL[r, j] and
    their column IDX[r, j]. Each value is packed with its column into one int64 whose order is the
    values' order (ties: the lower column first). Then either K rounds of a row maximum take them
    out one by one, or (BITONIC) Triton's bitonic tl.topk takes the best KP (a power of two >= K)
    at once; the same keys give the same result. Exact, with no full sort: the rows are short
    (2,048 tile maxima, 1,024 candidates) and K small (32), where torch.topk's radix selection
    reads them several times.

    GROUP > 1 first narrows the row the way the search narrows the keys: the row is cut into
    groups of GROUP consecutive columns, the KP groups with the largest maxima are picked (ties:
    the lower group), and only their KP * GROUP entries are ranked. Exact, ties included: an entry
    of a group left out is beaten by the maximum of each of the KP picked groups (larger, or equal
    and in a lower group, hence a lower column). The rounds then run over N / GROUP + KP * GROUP
    entries instead of N (512 instead of 2,048 at GROUP 8, KP 32). Needs N / GROUP >= KP."""
    r = tl.program_id(0).to(tl.int64)
    lowest = -9223372036854775807 - 1
    if GROUP > 1:
        NG: tl.constexpr = BLOCK_N // GROUP
        gi = tl.arange(0, NG)
        gj = tl.arange(0, GROUP)
        grid = gi[:, None] * GROUP + gj[None, :]  # (NG, GROUP) columns
        gmax = tl.max(tl.load(X + r * sxr + grid * sxn, mask=grid < N, other=float("-inf")), axis=1)  # (NG,)
        gpacked = _packed(gmax, gi, NG)  # unique: no group is picked twice
        if BITONIC:
            chosen = NG - 1 - (tl.topk(gpacked, KP) & 0xFFFFFFFF)  # (KP,) group ids
        else:
            slot = tl.arange(0, KP)
            chosen = tl.zeros((KP,), tl.int64)
            for j in range(0, KP):
                best = tl.max(gpacked, axis=0)
                gpacked = tl.where(gpacked == best, lowest, gpacked)
                chosen = tl.where(slot == j, NG - 1 - (best & 0xFFFFFFFF), chosen)
        cols = chosen[:, None] * GROUP + gj[None, :]  # (KP, GROUP) columns of the picked groups
        ok = cols < N
        x = tl.load(X + r * sxr + cols * sxn, mask=ok, other=float("-inf"))
        packed = tl.where(ok, _packed(x, cols, BLOCK_N), lowest)
        packed = tl.reshape(packed, (KP * GROUP,))
    else:
        offs = tl.arange(0, BLOCK_N)
        ok = offs < N
        x = tl.load(X + r * sxr + offs * sxn, mask=ok, other=float("-inf"))
        packed = tl.where(ok, _packed(x, offs, BLOCK_N), lowest)  # unique; the lower column wins ties
    if BITONIC:
        best = tl.topk(packed, KP)  # (KP,) largest first
        j = tl.arange(0, KP)
        value, col = _unpacked(best, BLOCK_N)
        tl.store(VAL + r * svr + j * svk, value, mask=j < K)
        tl.store(IDX + r * sir + j * sik, col, mask=j < K)
    else:
        for j in range(0, K):
            best = tl.max(packed, axis=0)
            packed = tl.where(packed == best, lowest, packed)
            value, col = _unpacked(best, BLOCK_N)
            tl.store(VAL + r * svr + j * svk, value)
            tl.store(IDX + r * sir + j * sik, col)
