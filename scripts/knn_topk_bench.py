"""Time one kNN-memory search on a GPU: ExactStore (bmm + torch.topk) against the fused Triton
top-k (memlm.memory.fused_topk), float32 and bf16 stores.

    python scripts/knn_topk_bench.py [--rows 32] [--capacity 65536] [--heads 8] [--seq-len 512]
                                        [--k 32] [--sweep] [--dtypes float32 bfloat16]

The store: `rows` rows x 1 kv head x `capacity` entries of dim 64, filled; the search: queries
(rows, heads, seq_len, 64) (multi-query attention: heads x seq_len = 4096 queries per group), k.
Prints ms per search for
  exact  search   ExactStore.search (top-k + gathering keys and values, as a kNN layer calls it)
  exact  _topk    ExactStore._topk alone (the part the fused path replaces)
  fused  _topk    fused_inner_product_topk on the same tensors (per config), with a per-stage split
  fused  search   ExactStore.search with _topk replaced by the fused path (FusedExactStore below)
and checks the fused result against ExactStore's on a few rows. Default run < 60 s on an H100;
--sweep times more tile / block configurations (longer: each one compiles).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from memlm.device import cuda_ms
from memlm.memory.knn.fused_topk import (TopkConfig, available, candidate_scores, fused_inner_product_topk, row_topk,
                                         tile_maxima)
from memlm.memory.knn.exact import ExactStore

DEFAULT_CONFIGS = [  # (name, TopkConfig options): the default (bitonic selection, 1 warp, best groups) first
    ("default", {}),
    ("torch-select", dict(selection="torch")),
    ("rounds-w1", dict(selection="triton")),
    ("rounds-w4-whole-rows", dict(selection="triton", num_warps_select=4, select_group=1)),  # the 5th session's
    ("tile16", dict(tile=16)),
    ("bm256-bn64", dict(block_m=256, block_n=64)),
]
SWEEP_CONFIGS = DEFAULT_CONFIGS + [
    ("consecutive", dict(layout="consecutive")),
    ("tile64", dict(tile=64)),
    ("bm128-bn64-w4", dict(block_m=128, block_n=64, num_warps=4)),
    ("bm64-bn128-w4", dict(block_m=64, block_n=128, num_warps=4)),
    ("stages2", dict(num_stages=2)),
    ("stages4", dict(num_stages=4)),
    ("q2-w4", dict(block_q=2, num_warps_2=4)),
    ("q1-w2", dict(block_q=1, num_warps_2=2)),
    ("q4-w8", dict(block_q=4, num_warps_2=8)),
    ("tile16-bm256-bn64", dict(tile=16, block_m=256, block_n=64)),
    ("tf32 (inexact, fp32)", dict(precision="tf32")),
    ("bitonic-w2", dict(num_warps_select=2)),
    ("bitonic-w4", dict(num_warps_select=4)),
    ("bitonic-whole-rows", dict(select_group=1)),
    ("bitonic-group4", dict(select_group=4)),
    ("bitonic-group16", dict(select_group=16)),
    ("rounds-w2", dict(selection="triton", num_warps_select=2)),
    ("rounds-w4", dict(selection="triton", num_warps_select=4)),
]


class FusedExactStore(ExactStore):
    """ExactStore whose _topk runs the fused Triton search on a GPU (the proposed wiring)."""

    def _topk(self, x: torch.Tensor, k: int):
        if not available(self.device) or self.filled == 0:
            return super()._topk(x, k)
        B, Hkv, N, D = x.shape
        C = self.filled
        x = x.to(self.device, self.dtype)
        if self.shared:
            x = x.transpose(0, 1).reshape(1, Hkv, B * N, D)
        R, M = x.shape[0], x.shape[2]
        keys = self.keys.view(R * Hkv, self.capacity, D)[:, :C]
        counts = self.counts.repeat_interleave(Hkv)
        scores, slots = fused_inner_product_topk(x.reshape(R * Hkv, M, D), keys, counts, k)  # (R*Hkv, M, k)
        scores, slots = scores.view(R, Hkv, M, k), slots.view(R, Hkv, M, k)
        if self.shared:
            scores = scores.view(Hkv, B, N, k).transpose(0, 1)
            slots = slots.view(Hkv, B, N, k).transpose(0, 1)
        return scores, slots


def stages(queries, keys, counts, k, cfg: TopkConfig) -> dict[str, float]:
    """ms of each stage of the fused path, with both selections (torch.topk and row_topk)."""
    maxima = tile_maxima(queries, keys, counts, cfg)
    nt = min(cfg.n_tiles or k, maxima.shape[-1])
    chosen = maxima.topk(nt, dim=-1, sorted=False).indices
    cand = candidate_scores(queries, keys, counts, chosen, cfg)
    out = {"kernel1": cuda_ms(lambda: tile_maxima(queries, keys, counts, cfg), 0.3),
           "topk(tiles)": cuda_ms(lambda: maxima.topk(nt, dim=-1, sorted=False), 0.3),
           "kernel2": cuda_ms(lambda: candidate_scores(queries, keys, counts, chosen, cfg), 0.3),
           "topk(cand)": cuda_ms(lambda: cand.topk(k, dim=-1), 0.3),
           "row_topk(tiles)": cuda_ms(lambda: row_topk(maxima, nt, cfg.num_warps_select, group=cfg.select_group), 0.3),
           "row_topk(cand)": cuda_ms(lambda: row_topk(cand, k, cfg.num_warps_select, group=cfg.select_group), 0.3)}
    try:  # Triton's bitonic tl.topk, where this Triton has it
        out["bitonic(tiles)"] = cuda_ms(lambda: row_topk(maxima, nt, cfg.num_warps_select, True, cfg.select_group),
                                        0.3)
        out["bitonic(cand)"] = cuda_ms(lambda: row_topk(cand, k, cfg.num_warps_select, True, cfg.select_group), 0.3)
    except RuntimeError as error:
        print(f"  ({error})")
    del maxima, cand
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--capacity", type=int, default=65536)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"])
    parser.add_argument("--sweep", action="store_true", help="time more configurations (slower)")
    parser.add_argument("--no-exact", action="store_true", help="skip the ExactStore baseline")
    args = parser.parse_args()
    if not available("cuda"):
        raise SystemExit("needs a CUDA GPU and triton")
    t_start = time.perf_counter()
    R, C, H, T, D, k = args.rows, args.capacity, args.heads, args.seq_len, args.dim, args.k
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
          f"{__import__('triton').__version__}; rows {R} x 1 kv head x {C} entries x dim {D}, queries "
          f"{R} x {H} x {T}, k {k}; allow_tf32 (matmul) {torch.backends.cuda.matmul.allow_tf32}")
    torch.manual_seed(0)
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        store = ExactStore(R, 1, D, C, device="cuda", dtype=dtype)
        keys = F.normalize(torch.randn(R, 1, C, D, device="cuda"), dim=-1)
        store.write(keys, keys, torch.arange(C, device="cuda"))
        del keys
        fused = FusedExactStore.__new__(FusedExactStore)
        fused.__dict__.update(store.__dict__)  # the same tensors, the fused _topk
        q = F.normalize(torch.randn(R, H, T, D, device="cuda"), dim=-1)
        x = q.reshape(R, 1, H * T, D)
        print(f"\n{dtype_name} store ({store.keys.numel() * store.keys.element_size() / 2**20:.0f} MiB of keys)")
        if not args.no_exact:
            ms = cuda_ms(lambda: store._topk(x, k), 2.0, 5)
            print(f"  exact  _topk   {ms:9.2f} ms")
            ms = cuda_ms(lambda: store.search(q, k), 2.0, 5)
            print(f"  exact  search  {ms:9.2f} ms")
        # the fused path on the store's own tensors, per configuration
        queries = x.reshape(R, H * T, D).to(dtype)
        keys = store.keys.view(R, C, D)[:, :store.filled]
        counts = store.counts
        for name, options in (SWEEP_CONFIGS if args.sweep else DEFAULT_CONFIGS):
            cfg = TopkConfig(**options)
            try:
                ms = cuda_ms(lambda: fused_inner_product_topk(queries, keys, counts, k, config=cfg), 1.0)
            except Exception as error:  # a configuration that does not compile or fit here
                print(f"  fused  _topk   {name:>18}: failed: {type(error).__name__}: {str(error)[:200]}")
                continue
            split = stages(queries, keys, counts, k, cfg) if name == "default" or args.sweep else {}
            detail = ", ".join(f"{s} {v:.2f}" for s, v in split.items())
            print(f"  fused  _topk   {ms:9.2f} ms  {name:>18}  {detail}")
        if not args.no_exact:  # against ExactStore: the same scores up to float near-ties (and bf16 rounding)
            want_scores, want_slots = (t.view(R, H * T, k) for t in store._topk(x, k))
            got_scores, got_slots = fused_inner_product_topk(queries, keys, counts, k)
            err = (got_scores.float() - want_scores.float()).abs().max().item()
            same = (got_slots == want_slots).float().mean().item()
            print(f"  check vs ExactStore: max |score diff| {err:.2e} (in {dtype_name}), same slot at the same "
                  f"rank {same:.4f}")
            del want_scores, want_slots, got_scores, got_slots
        ms = cuda_ms(lambda: fused.search(q, k), 1.0, 10)
        print(f"  fused  search  {ms:9.2f} ms  (ExactStore.search with the fused _topk)")
        del store, fused, queries, keys, q, x
        torch.cuda.empty_cache()
    print(f"\ntotal {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
