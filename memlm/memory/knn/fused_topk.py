"""Exact top-k inner-product search without the full score matrix: two Triton kernels around
two torch.topk calls, for `ExactStore._topk` on a GPU.

Problem: per group g (one batch row x key/value head) queries (M, D), keys (C, D), of which
the first counts[g] are live (slots >= counts[g] were never written and score -inf); find for
each query the k best keys by inner product. Brute force writes M x C scores per group (at
32 groups x 4096 queries x 65,536 keys: 8.6 G scores, 17-34 GB, a step's worth of HBM time)
and runs torch.topk over rows of 65,536.

Exactness argument. Partition the C keys into tiles of BN keys. Let m_t be the maximum score
of tile t for a query, and pick the k tiles with the largest maxima (any choice among tied
maxima) with smallest selected maximum m_(k). Every picked tile holds a key scoring its
maximum >= m_(k), so there are k candidate keys >= m_(k), and the k-th best candidate score is
>= m_(k); every key outside the picked tiles scores <= its tile's maximum <= m_(k). So the
top k of the candidates (the k x BN keys of the picked tiles) is a top k of all keys: its
scores, as a sorted list, are exactly the brute-force top-k scores. Ties: which of several
keys with the same score as the k-th is returned is unspecified (as in torch.topk itself);
the scores returned never differ from brute force. The partition may be any partition of
the slots into sets of BN; two layouts are implemented (`layout`):

- "strided" (default): the keys are scanned in blocks of BLOCK_N consecutive slots, and
  tile t = (s, c) of super-block s holds slots s*BLOCK_N*BN + r*BLOCK_N + c, r < BN: the
  running elementwise maximum of BN consecutive (BLOCK_M, BLOCK_N) score blocks, so kernel 1
  is a flash-attention-like loop (dot, max) with no in-register reshape. Each tile row is still
  a whole key (D contiguous values), so kernel 2's gathers are as efficient as with
  consecutive tiles.
- "consecutive": tile t holds slots t*BN .. t*BN + BN - 1 (a tl.reshape + tl.max per block).

Floating point. Kernel 1 computes scores on tensor cores (tl.dot, fp32 accumulation; fp32
keys use `precision`, "tf32x3" by default: three TF32 products, about fp32 accuracy), kernel
2 recomputes the candidates' scores with fp32 multiply-adds. If the two differ by at most e
for any (query, key), a key can be missed only when it scores within 2e of the k-th returned
score (the argument above with maxima off by e) - a float near-tie, the same freedom brute
force has (cuBLAS and a CPU disagree by as much). bf16 / fp16 inputs: products are exact in
fp32, so e is only summation-order rounding (~D * 2^-24 for unit vectors). fp32 with
precision="tf32x3": e ~ 2^-20; "ieee": fp32 FMA (slow, no tensor cores); "tf32": e ~ 2^-10,
*not* exact (keys within ~1e-3 of the k-th score may be missed). bf16 stores: ExactStore
ranks by bf16-rounded bmm outputs (many ties); this path ranks by the fp32 scores of the bf16
inputs and rounds the returned scores to bf16 afterwards (out_dtype), so its choice is one of
ExactStore's tied choices.

Pipeline (`fused_inner_product_topk`):
  1. kernel 1: per group and BLOCK_M queries, loop over key blocks, tl.dot, mask slots >=
     count to -inf, keep the tile maxima; write maxima (G, M, T), T ~ C / BN.
  2. selection (`row_topk`, or torch.topk) of the n_tiles (default k) best tiles per query.
  3. kernel 2: per BLOCK_Q queries, gather the BN keys of each selected tile (a group's keys
     are a few MB: L2 hits), fp32 scores -> candidates (G, M, n_tiles * BN), slots implied.
  4. selection of the k best candidates, best first; map (tile, row) -> slot; ranks >= count -> slot
     -1, score -inf; pad to k. Scores come back in `out_dtype` (default the keys' dtype, as
     ExactStore._topk returns them).

Traffic at the target size (G=32, M=4096, C=65536, D=64, k=32, BN=32), H100/H200:
  kernel 1: 2*G*M*C*D = 1.1 TFLOP (bf16 tensor cores: ~1.1 ms at the 990 TFLOP/s peak; fp32
    with tf32x3: 3 TF32 MMAs, ~6.7 ms at peak); keys re-read from L2 once per BLOCK_M block:
    G * (M / BLOCK_M) * C * D * bytes = 8.6 GB (bf16, BLOCK_M=128; halve with 256); HBM write
    of the maxima G*M*(C/BN)*4 = 1.07 GB.
  topk 1: reads 1.07 GB (rows of 2048, k=32).
  kernel 2: L2 gathers G*M*k*BN*D*bytes = 17 GB bf16 (34 GB fp32); writes G*M*k*BN*4 =
    0.54 GB of candidates.
  topk 2: reads 0.54 GB (rows of 1024).
  BN trades kernel 1's output (~ C/BN, HBM) against kernel 2's gathers (~ k*BN, L2): per
  query 2 * 4 * C/BN bytes written and read back against k*BN*D*bytes gathered; they balance
  near BN = 16-32 (BN=16 halves the gathers and doubles the maxima to 2.1 GB). Both grids put
  the query blocks of one group next to each other, so a group's keys (8 MB bf16, 16 MB fp32)
  stay in L2 while its queries run. Compare: brute force writes 8.6 G scores (17 GB bf16) and
  reads them back in torch.topk over rows of 65,536.

Triton's interpreter (CPU, for tests): TRITON_INTERPRET=1 must be set before triton is first
imported (tl.sum / tl.max are jit functions decorated at import, as are the device functions of
memlm.memory.knn.topk_kernels); this module decorates the kernels on first use, per mode
(`_kernels`). The interpreter's tl.dot cannot multiply bf16, so there (only)
bf16 tiles are upcast to fp32 first, which computes the same products.
"""

import os

import torch

# triton and triton.language as topk_kernels imported them: triton is None without it, tl a stand-in
from memlm.memory.knn.topk_kernels import candidates_kernel, row_topk_kernel, tile_max_kernel, tl, triton
from memlm.memory.knn.topk_reference import (brute_force_topk, check_inputs, finish_topk, tile_slots,
                                             two_stage_topk_reference)

__all__ = ["available", "brute_force_topk", "fused_inner_product_topk", "row_topk", "select_group",
           "two_stage_topk_reference",
           "tile_slots", "TopkConfig"]

LAYOUTS = ("strided", "consecutive")
PRECISIONS = ("tf32x3", "ieee", "tf32")
SELECTIONS = ("auto", "triton", "bitonic", "torch")


def available(device) -> bool:
    """True when the Triton path can run for tensors on `device` (a torch.device, a string or a
    tensor): a CUDA device and triton importable."""
    if isinstance(device, torch.Tensor):
        device = device.device
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.is_available() and triton is not None


# ----- configuration ------------------------------------------------------------------------
class TopkConfig:
    """Tile and block sizes of the fused search (all powers of two).

    tile (BN): keys per tile. block_m, block_n: queries and keys per kernel-1 dot (block_n a
    multiple of tile for the consecutive layout; the strided layout's tile stride is block_n).
    block_q, num_warps_2: queries and warps per kernel-2 program (block_q=1, 4 warps: 56 registers
    on sm_90, high occupancy for the gathers). num_warps, num_stages: kernel 1 (128 x 128 x 8
    warps: ~210 registers, no spills). n_tiles: tiles recomputed per query (default k, which
    exactness needs; more costs kernel-2 time and only narrows the near-tie window of the
    inexact precision="tf32"; fewer than k is approximate). selection: how the best tiles and
    then the best candidates are picked: "triton" (`row_topk`, one program of num_warps_select
    warps per row, k rounds of a row maximum), "bitonic" (`row_topk` with Triton's bitonic
    tl.topk, Triton versions that have it), "auto" (bitonic where Triton has tl.topk, else
    triton) or "torch" (torch.topk); select_group: row_topk's group (0: its automatic choice,
    1: rank whole rows).

    Defaults: the fastest setting of `scripts/knn_topk_bench.py --sweep` at the kNN presets' size
    (32 rows x 65,536 bf16 keys, 32 x 4,096 queries, k 32); the timings are in BENCHMARKS.md.
    """

    def __init__(self, tile: int = 32, layout: str = "strided", block_m: int = 128, block_n: int = 128,
                 block_q: int = 1, n_tiles: int | None = None, num_warps: int = 8, num_stages: int = 3,
                 num_warps_2: int = 4, precision: str = "tf32x3", selection: str = "auto",
                 num_warps_select: int = 1, select_group: int = 0):
        for name, value in (("tile", tile), ("block_m", block_m), ("block_n", block_n), ("block_q", block_q)):
            if value < 1 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two, got {value}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if select_group < 0 or select_group & (select_group - 1):
            raise ValueError(f"select_group must be 0 (automatic) or a power of two, got {select_group}")
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if block_m < 16 or block_n < 16:
            raise ValueError("block_m and block_n must be >= 16 (tl.dot)")
        if layout == "consecutive" and block_n % tile:
            raise ValueError(f"consecutive layout: block_n ({block_n}) must be a multiple of tile ({tile})")
        self.tile, self.layout, self.block_m, self.block_n, self.block_q = tile, layout, block_m, block_n, block_q
        self.n_tiles, self.num_warps, self.num_stages, self.num_warps_2 = n_tiles, num_warps, num_stages, num_warps_2
        if selection == "auto":
            selection = "bitonic" if triton is not None and hasattr(tl, "topk") else "triton"
        self.precision, self.selection, self.num_warps_select = precision, selection, num_warps_select
        self.select_group = select_group

    @property
    def stride(self) -> int:
        """Slot distance between consecutive keys of one tile."""
        return self.block_n if self.layout == "strided" else 1

    def n_tiles_total(self, C: int) -> int:
        """T: tiles covering C slots (the strided layout rounds up to whole super-blocks)."""
        span = self.tile * self.stride
        return -(-C // span) * self.stride

    def __repr__(self) -> str:
        return (f"TopkConfig(tile={self.tile}, layout={self.layout!r}, block_m={self.block_m}, "
                f"block_n={self.block_n}, block_q={self.block_q}, n_tiles={self.n_tiles}, "
                f"num_warps={self.num_warps}, num_stages={self.num_stages}, num_warps_2={self.num_warps_2}, "
                f"precision={self.precision!r}, selection={self.selection!r}, "
                f"num_warps_select={self.num_warps_select}, select_group={self.select_group})")


_KERNELS: dict = {}


def _kernels():
    """(kernel 1, kernel 2, selection), jit-decorated on first use for the current TRITON_INTERPRET mode
    (triton.jit reads it when it decorates)."""
    if triton is None:
        raise RuntimeError("fused_inner_product_topk needs triton (see available())")
    mode = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if mode not in _KERNELS:
        _KERNELS[mode] = tuple(triton.jit(kernel) for kernel in (tile_max_kernel, candidates_kernel, row_topk_kernel))
    return _KERNELS[mode]


def _launch_guard(device: torch.device):
    if device.type == "cuda":
        return torch.cuda.device(device)
    import contextlib
    return contextlib.nullcontext()


def tile_maxima(queries: torch.Tensor, keys: torch.Tensor, counts: torch.Tensor, cfg: TopkConfig) -> torch.Tensor:
    """Kernel 1: (G, M, T) fp32 tile maxima (T = cfg.n_tiles_total(C))."""
    k1 = _kernels()[0]
    G, M, D = queries.shape
    C = keys.shape[1]
    T = cfg.n_tiles_total(C)
    out = torch.empty(G, M, T, dtype=torch.float32, device=keys.device)
    BLOCK_D = max(16, 1 << (D - 1).bit_length())
    strided = cfg.layout == "strided"
    n_blocks = -(-C // (cfg.block_n * cfg.tile)) if strided else -(-C // cfg.block_n)
    grid = (-(-M // cfg.block_m), G)
    with _launch_guard(keys.device):
        k1[grid](queries, keys, counts, out, M, C, D, n_blocks,
                 *queries.stride(), *keys.stride(), *out.stride(),
                 BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=BLOCK_D, BN=cfg.tile, STRIDED=strided,
                 EVEN_D=BLOCK_D == D, FP32=keys.dtype == torch.float32, PRECISION=cfg.precision,
                 UPCAST=keys.dtype == torch.bfloat16 and keys.device.type != "cuda",
                 num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def candidate_scores(queries: torch.Tensor, keys: torch.Tensor, counts: torch.Tensor, chosen: torch.Tensor,
                     cfg: TopkConfig) -> torch.Tensor:
    """Kernel 2: (G, M, nt * BN) fp32 scores of the keys of the chosen tiles (G, M, nt)."""
    k2 = _kernels()[1]
    G, M, D = queries.shape
    C, nt = keys.shape[1], chosen.shape[2]
    out = torch.empty(G, M, nt * cfg.tile, dtype=torch.float32, device=keys.device)
    BLOCK_D = max(16, 1 << (D - 1).bit_length())
    grid = (-(-M // cfg.block_q), G)
    with _launch_guard(keys.device):
        k2[grid](queries, keys, counts, chosen, out, M, C, D, nt,
                 *queries.stride(), *keys.stride(), *chosen.stride(), *out.stride(),
                 BLOCK_Q=cfg.block_q, BN=cfg.tile, BLOCK_D=BLOCK_D, STRIDE=cfg.stride,
                 num_warps=cfg.num_warps_2)
    return out


def select_group(n: int, k: int) -> int:
    """row_topk's automatic GROUP for rows of n and top k: the power of two g minimising the
    entries ranked, n / g group maxima + k * g candidates (n, k rounded up to powers of two), among
    those leaving at least k groups; 1 (no grouping) unless that is fewer than n (8 at 2,048 and 32;
    4 at 1,024 and 32)."""
    block_n, kp = max(16, 1 << (n - 1).bit_length()), 1 << (k - 1).bit_length()
    options = [g for g in (2 ** i for i in range(1, block_n.bit_length())) if block_n // g >= kp]
    best = min(options, key=lambda g: (block_n // g + kp * g, g), default=1)
    return best if best > 1 and block_n // best + kp * best < block_n else 1


ROW_TOPK_MAX_N = 2 ** 15
"""The widest row `row_topk` takes (it holds a row in registers). Wider rows, the tile maxima of
a knowledge memory of more than ~2M keys, are selected by torch.topk instead."""


def row_topk(x: torch.Tensor, k: int, num_warps: int = 4, bitonic: bool = False,
             group: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest entries of each row of x (..., n) fp32, best first: (values (..., k) fp32,
    indices (..., k) long), like torch.topk(x, k) (ties: the lower index first). One Triton program
    per row; n up to 2^15 (the row is held in registers). bitonic: Triton's tl.topk instead of k
    rounds of a row maximum (the same result; needs a Triton that has tl.topk). group: rank only
    the entries of the best groups of `group` consecutive columns (a power of two; 1 = off, 0 =
    `select_group`'s choice; see topk_kernels.row_topk_kernel)."""
    n = x.shape[-1]
    if not 1 <= k <= n or n > ROW_TOPK_MAX_N:
        raise ValueError(f"row_topk needs 1 <= k <= n <= {ROW_TOPK_MAX_N}, got k={k}, n={n}")
    if bitonic and not hasattr(tl, "topk"):
        raise RuntimeError(f"triton {triton.__version__} has no tl.topk: use selection='triton'")
    block_n, kp = max(16, 1 << (n - 1).bit_length()), 1 << (k - 1).bit_length()
    group = select_group(n, k) if group == 0 else group
    if group < 1 or group & (group - 1) or (group > 1 and block_n // group < kp):
        raise ValueError(f"row_topk: group must be 0 or a power of two leaving at least {kp} groups of "
                         f"{block_n} columns, got {group}")
    rows = x.reshape(-1, n)
    values = torch.empty(rows.shape[0], k, dtype=torch.float32, device=x.device)
    indices = torch.empty(rows.shape[0], k, dtype=torch.long, device=x.device)
    if rows.shape[0]:
        with _launch_guard(x.device):
            _kernels()[2][(rows.shape[0],)](rows, values, indices, n, k, *rows.stride(), *values.stride(),
                                            *indices.stride(), BLOCK_N=block_n, BITONIC=bitonic, KP=kp,
                                            GROUP=group, num_warps=num_warps)
    return values.view(*x.shape[:-1], k), indices.view(*x.shape[:-1], k)


MAX_MAXIMA_ELEMENTS = 2 ** 28
"""Tile maxima held at once (1 GiB of fp32): queries are searched in chunks below it. A shared
knowledge store (one group, every batch row's queries, millions of keys) would otherwise need
tens of GB, and torch.topk over more than 2^31 elements fails (an illegal memory access on an
H200 at 131,072 queries x 2M keys)."""


@torch.no_grad()
def fused_inner_product_topk(queries: torch.Tensor, keys: torch.Tensor, counts: torch.Tensor, k: int,
                             config: TopkConfig | None = None, out_dtype: torch.dtype | None = None,
                             max_elements: int = MAX_MAXIMA_ELEMENTS, **options):
    """Exact top-k inner products per group, ExactStore._topk's semantics.

    queries (G, M, D) (cast to the keys' dtype, as the store does), keys (G, C, D) (any strides:
    a slice [:, :filled] of the store is fine), counts (G,) long: slots >= counts[g] score -inf.
    Returns scores (G, M, k) in out_dtype (default the keys' dtype) and slots (G, M, k) long,
    best first; ranks >= counts[g] (fewer than k live keys) are -1 / -inf. fp32, bf16 and fp16
    keys; CUDA tensors (or CPU ones under TRITON_INTERPRET=1, for tests). Tie behaviour and
    precision: see the module docstring. `config` or keyword options of TopkConfig tune it.
    Queries are searched in chunks of M so that at most `max_elements` tile maxima exist at once.
    """
    check_inputs(queries, keys, counts, k)
    if keys.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"keys must be float32, bfloat16 or float16, got {keys.dtype}")
    cfg = config or TopkConfig(**options)
    out_dtype = out_dtype or keys.dtype
    G, M, D = queries.shape
    C = keys.shape[1]
    queries = queries.to(keys.device, keys.dtype)
    counts = counts.to(keys.device, torch.long).contiguous()
    if C == 0 or G == 0 or M == 0:
        return finish_topk(torch.full((G, M, 0), float("-inf"), device=keys.device), lambda i: i, counts, k, out_dtype)
    chunk = max(1, max_elements // (G * cfg.n_tiles_total(C)))  # queries per search
    if M > chunk:
        parts = [fused_inner_product_topk(queries[:, i:i + chunk].contiguous(), keys, counts, k, cfg, out_dtype,
                                          max_elements) for i in range(0, M, chunk)]
        return torch.cat([scores for scores, _ in parts], dim=1), torch.cat([slots for _, slots in parts], dim=1)
    maxima = tile_maxima(queries, keys, counts, cfg)  # (G, M, T)
    nt = min(cfg.n_tiles or k, maxima.shape[-1])

    def topk(x, n):  # the configured selection; torch.topk where it is "torch" or rows are too wide
        if cfg.selection == "torch" or x.shape[-1] > ROW_TOPK_MAX_N:
            return x.topk(n, dim=-1)
        return row_topk(x, n, cfg.num_warps_select, cfg.selection == "bitonic", cfg.select_group)

    chosen = topk(maxima, nt)[1]  # (G, M, nt)
    del maxima
    cand = candidate_scores(queries, keys, counts, chosen, cfg)  # (G, M, nt * BN)
    BN, S = cfg.tile, cfg.stride

    def slot_of(i):
        t = chosen.gather(-1, i // BN)
        return (t // S) * (S * BN) + t % S + (i % BN) * S

    return finish_topk(cand, slot_of, counts, k, out_dtype, topk)


@torch.library.custom_op("memlm::fused_inner_product_topk", mutates_args=())
def fused_topk_op(queries: torch.Tensor, keys: torch.Tensor, counts: torch.Tensor,
                  k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`fused_inner_product_topk` with its defaults, as one operator (torch.ops.memlm.
    fused_inner_product_topk) that torch.compile calls without tracing into it. Traced, the
    Triton launches and the configuration code broke the graph in every kNN layer's forward, so
    dynamo compiled each block as a frame of its own (and gave up past its recompile limit)."""
    return fused_inner_product_topk(queries, keys, counts, k)


@fused_topk_op.register_fake
def _fused_topk_shapes(queries, keys, counts, k):
    G, M, _ = queries.shape
    return keys.new_empty(G, M, k), keys.new_empty(G, M, k, dtype=torch.long)
