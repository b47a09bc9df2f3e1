"""Exact top-k inner-product search in plain torch: brute force over the full score matrix, and
the two-stage tile algorithm of memlm.memory.knn.fused_topk (tile maxima, then the best tiles
rescored) computed from that matrix, the references the Triton kernels are tested against on any
device; plus the input checks and the final selection (`finish_topk`) the fused search shares.
The search is ExactStore's, the exact kNN lookup of "Memorizing Transformers" (Wu et al., arXiv
2203.08913); why the two-stage algorithm is exact: fused_topk's module docstring.
"""

import torch

__all__ = ["brute_force_topk", "check_inputs", "finish_topk", "tile_slots", "two_stage_topk_reference"]


def tile_slots(tiles: torch.Tensor, tile: int, stride: int) -> torch.Tensor:
    """Slots of the keys of `tiles` (...,) -> (..., tile): tile t of the layout with `stride`
    holds slots (t // stride) * stride * tile + t % stride + r * stride, r < tile."""
    r = torch.arange(tile, device=tiles.device)
    base = (tiles // stride) * (stride * tile) + tiles % stride
    return base[..., None] + r * stride



def _masked_scores(queries: torch.Tensor, keys: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(G, M, C) fp32 scores, -inf at slots >= counts[g]."""
    C = keys.shape[1]
    scores = torch.bmm(queries.float(), keys.float().transpose(1, 2))
    dead = torch.arange(C, device=keys.device) >= counts.to(keys.device)[:, None]  # (G, C)
    return scores.masked_fill_(dead[:, None, :], float("-inf"))


def finish_topk(cand: torch.Tensor, slot_of, counts: torch.Tensor, k: int, out_dtype: torch.dtype, topk=None):
    """Top k of candidate scores (G, M, n) -> (scores (G, M, k) out_dtype, slots (G, M, k) long),
    best first; `slot_of(indices)` maps candidate indices to slots. Ranks >= count: -1 / -inf.
    topk(x, k) -> (values, indices), best first: torch.topk by default."""
    G, M, n = cand.shape
    kk = min(k, n)
    top = cand.topk(kk, dim=-1) if topk is None or n == 0 else topk(cand, kk)
    slots = slot_of(top[1])
    found = torch.arange(kk, device=cand.device) < counts.to(cand.device)[:, None, None]  # (G, 1, kk)
    slots = slots.masked_fill(~found, -1)
    scores = top[0].masked_fill(~found, float("-inf")).to(out_dtype)
    if kk < k:
        scores = torch.nn.functional.pad(scores, (0, k - kk), value=float("-inf"))
        slots = torch.nn.functional.pad(slots, (0, k - kk), value=-1)
    return scores, slots


def check_inputs(queries, keys, counts, k):
    if queries.dim() != 3 or keys.dim() != 3 or queries.shape[0] != keys.shape[0] \
            or queries.shape[2] != keys.shape[2]:
        raise ValueError(f"expected queries (G, M, D) and keys (G, C, D), got {tuple(queries.shape)} and "
                         f"{tuple(keys.shape)}")
    if counts.shape != (keys.shape[0],):
        raise ValueError(f"expected counts ({keys.shape[0]},), got {tuple(counts.shape)}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")


@torch.no_grad()
def brute_force_topk(queries: torch.Tensor, keys: torch.Tensor, counts: torch.Tensor, k: int,
                     out_dtype: torch.dtype | None = None):
    """ExactStore._topk's inner loop in fp32, all at once (for tests): full (G, M, C) scores."""
    check_inputs(queries, keys, counts, k)
    scores = _masked_scores(queries, keys, counts)
    return finish_topk(scores, lambda i: i, counts, k, out_dtype or keys.dtype)


@torch.no_grad()
def two_stage_topk_reference(queries: torch.Tensor, keys: torch.Tensor, counts: torch.Tensor, k: int,
                             tile: int = 32, stride: int = 1, n_tiles: int | None = None,
                             out_dtype: torch.dtype | None = None):
    """The fused algorithm in plain torch (tile maxima taken from the full score matrix): the
    logic of `fused_inner_product_topk` with layout stride `stride` (1: consecutive tiles; the
    Triton strided layout is stride = block_n), for testing on any device."""
    check_inputs(queries, keys, counts, k)
    G, M, _ = queries.shape
    C = keys.shape[1]
    out_dtype = out_dtype or keys.dtype
    if C == 0:
        return finish_topk(torch.full((G, M, 0), float("-inf"), device=keys.device), lambda i: i, counts, k, out_dtype)
    scores = _masked_scores(queries, keys, counts)
    span = tile * stride
    padded = torch.nn.functional.pad(scores, (0, -(-C // span) * span - C), value=float("-inf"))
    maxima = padded.view(G, M, -1, tile, stride).amax(dim=3).reshape(G, M, -1)  # tile s*stride + c
    nt = min(n_tiles or k, maxima.shape[-1])
    chosen = maxima.topk(nt, dim=-1, sorted=False).indices  # (G, M, nt)
    slots = tile_slots(chosen, tile, stride).flatten(2)  # (G, M, nt * tile), may point past C (-inf)
    cand = padded.gather(-1, slots)
    return finish_topk(cand, lambda i: slots.gather(-1, i), counts, k, out_dtype)

