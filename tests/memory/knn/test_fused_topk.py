"""Exact top-k by tile maxima (memlm.memory.knn.fused_topk): the two-stage algorithm in plain torch
against brute force (CPU), the Triton kernels under Triton's interpreter (CPU, skipped without
triton), and the Triton kernels at the real size on a GPU with timings (`pytest -s`; skipped
without CUDA)."""

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from memlm.device import cuda_ms
from memlm.memory.knn import fused_topk
from memlm.memory.knn.fused_topk import (TopkConfig, available, brute_force_topk, fused_inner_product_topk, row_topk,
                                     select_group, tile_slots, two_stage_topk_reference)


def exact_scores(queries, keys, slots):
    """fp32 scores of the given slots (G, M, k) (-1: -inf), from the inputs as stored."""
    G, M, D = queries.shape
    picked = keys.float().gather(1, slots.clamp(min=0).reshape(G, -1, 1).expand(-1, -1, D)).view(G, M, -1, D)
    s = torch.einsum("gmd,gmkd->gmk", queries.to(keys.dtype).double(), picked.double()).float()
    return s.masked_fill(slots < 0, float("-inf"))


def assert_topk(scores, slots, queries, keys, counts, k, atol):
    """The returned (scores, slots) are a top k of brute force up to `atol`: shapes, -1 / -inf
    exactly at ranks >= count, distinct live slots whose scores are the reported ones, the
    brute-force scores, and any brute-force slot left out scores within 2 atol of the k-th."""
    G, M, _ = queries.shape
    C = keys.shape[1]
    assert scores.shape == slots.shape == (G, M, k) and slots.dtype == torch.long
    want_scores, want_slots = brute_force_topk(queries, keys, counts, k, out_dtype=torch.float32)
    live = torch.arange(k, device=counts.device)[None, None, :] < counts.clamp(max=C)[:, None, None]  # (G, 1, k)
    live = live.expand(G, M, k)
    assert torch.equal(slots >= 0, live), "slot -1 exactly at ranks >= count"
    assert bool((scores[~live] == float("-inf")).all())
    assert bool((slots[live] < counts.clamp(max=C)[:, None, None].expand(G, M, k)[live]).all())
    sorted_slots = slots.sort(dim=-1).values
    assert bool(((sorted_slots[..., 1:] != sorted_slots[..., :-1]) | (sorted_slots[..., 1:] < 0)).all()), \
        "a slot returned twice"
    got = scores.float()
    torch.testing.assert_close(exact_scores(queries, keys, slots)[live], got[live], rtol=0, atol=max(atol, 1e-5))
    torch.testing.assert_close(got[live], want_scores[live], rtol=0, atol=atol)
    assert bool((got[..., 1:] <= got[..., :-1] + atol).all()), "best first"
    # slots the brute force has and we do not: only near-ties with the k-th score
    kth = want_scores.masked_fill(~live, float("inf")).amin(dim=-1, keepdim=True)  # (G, M, 1)
    missing = ~(want_slots[..., :, None] == slots[..., None, :]).any(-1) & live
    assert bool((want_scores[missing] <= kth.expand(G, M, k)[missing] + 2 * atol).all())
    return missing.float().mean().item()


CASES = [  # G, M, C, D, k, counts
    (2, 9, 64, 8, 5, [64, 64]),        # C a multiple of every tile span
    (3, 7, 100, 16, 6, [100, 37, 3]),  # C not a multiple; k > count in one group
    (2, 5, 33, 4, 40, [33, 20]),       # k > C
    (2, 4, 50, 8, 3, [0, 50]),         # an empty group
    (1, 6, 1, 8, 2, [1]),              # one key
]


@pytest.mark.parametrize("tile,stride", [(4, 1), (8, 1), (4, 16), (8, 32), (16, 4), (1, 1)])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_two_stage_reference_equals_brute_force(case, tile, stride):
    G, M, C, D, k, counts = CASES[case]
    queries, keys = torch.randn(G, M, D), torch.randn(G, C, D)
    counts = torch.tensor(counts)
    got = two_stage_topk_reference(queries, keys, counts, k, tile=tile, stride=stride)
    want = brute_force_topk(queries, keys, counts, k)
    assert torch.equal(got[0], want[0])  # same score matrix: identical scores, no float slack
    assert torch.equal(got[1], want[1])  # continuous random data: no ties, identical slots
    assert_topk(*got, queries, keys, counts, k, atol=0)


@pytest.mark.parametrize("tile,stride", [(4, 1), (8, 8), (16, 1)])
def test_two_stage_reference_with_ties(tile, stride):
    """Integer-valued keys and queries: many exact ties, also at the k-th score and among tile
    maxima. The scores equal brute force exactly; slots are a valid choice among the ties."""
    G, M, C, D, k = 3, 20, 203, 4, 12
    keys = torch.randint(-1, 2, (G, C, D)).float()
    keys[:, 100:150] = keys[:, :50]  # duplicates
    queries = torch.randint(-1, 2, (G, M, D)).float()
    counts = torch.tensor([203, 150, 7])
    scores, slots = two_stage_topk_reference(queries, keys, counts, k, tile=tile, stride=stride)
    want, _ = brute_force_topk(queries, keys, counts, k)
    assert torch.equal(scores, want)
    assert_topk(scores, slots, queries, keys, counts, k, atol=0)


def test_n_tiles_above_k_and_all_tiles():
    G, M, C, D, k = 2, 5, 70, 8, 4
    queries, keys, counts = torch.randn(G, M, D), torch.randn(G, C, D), torch.tensor([70, 61])
    want = brute_force_topk(queries, keys, counts, k)
    for n_tiles in (k + 3, 1000):
        got = two_stage_topk_reference(queries, keys, counts, k, tile=8, n_tiles=n_tiles)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_tile_slots_partition_the_slots():
    for tile, stride in [(4, 1), (4, 8), (8, 16), (1, 4)]:
        T = 3 * stride  # three super-blocks of tile * stride slots
        slots = tile_slots(torch.arange(T), tile, stride).flatten()
        assert torch.equal(slots.sort().values, torch.arange(T * tile))
    assert TopkConfig(tile=8, block_n=32).n_tiles_total(300) == 2 * 32  # strided: whole super-blocks
    assert TopkConfig(tile=8, block_n=32, layout="consecutive").n_tiles_total(300) == 38


def test_available_is_false_off_cuda():
    assert not available("cpu") and not available(torch.zeros(1))


# ----- the Triton kernels under the interpreter (CPU) -------------------------------------
INTERPRETER_CASES = [  # G, M, C, D, k, counts, dtype, config
    (2, 17, 200, 32, 8, [200, 123], torch.float32, dict(tile=4, block_m=16, block_n=32)),
    (2, 17, 200, 32, 8, [200, 123], torch.bfloat16, dict(tile=4, block_m=16, block_n=32)),
    (2, 9, 200, 32, 8, [200, 5], torch.float32, dict(tile=8, block_m=16, block_n=32, layout="consecutive")),
    (2, 9, 150, 32, 8, [150, 60], torch.bfloat16, dict(tile=4, block_m=16, block_n=16, layout="consecutive",
                                                       block_q=2)),
    (1, 10, 77, 24, 20, [77], torch.float32, dict(tile=4, block_m=16, block_n=16)),   # D not a power of 2
    (2, 6, 40, 16, 50, [40, 33], torch.float32, dict(tile=8, block_m=16, block_n=16)),  # k > C
    (2, 8, 64, 8, 4, [0, 64], torch.float32, dict(tile=16, block_m=16, block_n=16)),  # D < 16, an empty group
    (2, 8, 96, 16, 4, [96, 50], torch.float16, dict(tile=8, block_m=16, block_n=32, n_tiles=6)),
    (2, 17, 200, 32, 8, [200, 123], torch.float32, dict(tile=4, block_m=16, block_n=32, selection="torch")),
    (2, 17, 200, 32, 8, [200, 123], torch.float32, dict(tile=4, block_m=16, block_n=32, selection="triton")),
    (2, 17, 200, 32, 8, [200, 123], torch.float32, dict(tile=4, block_m=16, block_n=32, selection="triton",
                                                        num_warps_select=4, select_group=1)),
    (2, 9, 150, 32, 8, [150, 60], torch.bfloat16, dict(tile=4, block_m=16, block_n=16, layout="consecutive",
                                                       selection="torch")),
    (2, 6, 40, 16, 20, [40, 33], torch.float32, dict(tile=8, block_m=16, block_n=16, selection="bitonic")),
    # queries searched in chunks of 5 (2 groups x 64 tiles x 5 queries of maxima at once)
    (2, 17, 200, 32, 8, [200, 123], torch.float32, dict(tile=4, block_m=16, block_n=32, max_elements=2 * 64 * 5)),
    # rows of tile maxima wider than row_topk takes (a knowledge memory of > 2M keys): torch.topk selects
    (2, 17, 200, 32, 8, [200, 123], torch.float32, dict(tile=4, block_m=16, block_n=32, row_topk_max_n=32)),
]


def has_bitonic() -> bool:
    """Whether this Triton has tl.topk (selection="bitonic")."""
    import triton.language

    return hasattr(triton.language, "topk")


def test_the_default_selection_is_bitonic_where_triton_has_it():
    """selection="auto" (the default) resolves to Triton's bitonic tl.topk where it exists (the
    fastest on an H200) and to k rounds of a row maximum elsewhere; explicit choices stay."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    assert TopkConfig().selection == ("bitonic" if has_bitonic() else "triton")
    assert TopkConfig(selection="triton").selection == "triton"
    with pytest.raises(ValueError, match="selection"):
        TopkConfig(selection="heap")
    with pytest.raises(ValueError, match="select_group"):
        TopkConfig(select_group=3)


def _row_topk_case():
    """row_topk against torch.topk: the same values, best first, indices that hold them, ties
    taken lower index first, -inf entries last (rows of maxima with dead tiles); whole rows
    (group 1) and rows narrowed to their best groups (automatic and explicit group sizes) alike."""
    assert (select_group(2048, 32), select_group(1024, 32), select_group(33, 33)) == (8, 4, 1)
    for n, k in [(2048, 32), (1000, 7), (33, 33), (16, 1), (100, 20)]:
        x = torch.randn(4, n)
        x[0, 5:] = float("-inf")
        x[1, :10] = 0.5
        x[1, 10:] = torch.rand(n - 10) * 0.4  # ten tied maxima
        x[2, ::3] = 9.0  # ties spread over every group
        for group in (1, 0, 2, 16):
            if group > 1 and max(16, 1 << (n - 1).bit_length()) // group < 1 << (k - 1).bit_length():
                continue  # fewer groups than k
            values, indices = row_topk(x, k, group=group)
            assert torch.equal(values, x.topk(k, dim=-1).values), (n, k, group)
            assert torch.equal(x.gather(-1, indices), values)
            assert all(len(set(row.tolist())) == k for row in indices)
            assert indices[1, :min(k, 10)].tolist() == list(range(min(k, 10)))
            assert indices[2, :min(k, (n + 2) // 3)].tolist() == list(range(0, 3 * min(k, (n + 2) // 3), 3))
            if has_bitonic():  # the bitonic variant: the same packed keys, the same result
                bitonic = row_topk(x, k, bitonic=True, group=group)
                assert torch.equal(bitonic[0], values) and torch.equal(bitonic[1], indices), (n, k, group)
    with pytest.raises(ValueError, match="row_topk"):
        row_topk(torch.zeros(2, 4), 5)
    with pytest.raises(ValueError, match="group"):
        row_topk(torch.zeros(2, 64), 32, group=4)  # 16 groups cannot hold the best 32


def _interpreter_case(case):
    """One INTERPRETER_CASES entry; runs in a child process with TRITON_INTERPRET=1."""
    if case == 0:
        _row_topk_case()
    torch.manual_seed(case)
    G, M, C, D, k, counts, dtype, options = INTERPRETER_CASES[case]
    options = dict(options)
    if options.get("selection") == "bitonic" and not has_bitonic():
        return
    max_elements = options.pop("max_elements", None)
    row_limit = options.pop("row_topk_max_n", None)
    fused_topk.ROW_TOPK_MAX_N = row_limit or 2 ** 15
    if row_limit is not None:
        assert TopkConfig(**options).n_tiles_total(C) > row_limit
        with pytest.raises(ValueError, match="row_topk"):
            row_topk(torch.zeros(1, row_limit + 1), 1)
    queries = F.normalize(torch.randn(G, M, D), dim=-1).to(dtype)
    keys = F.normalize(torch.randn(G, C + 5, D), dim=-1).to(dtype)[:, :C]  # a slice, as the store passes
    counts = torch.tensor(counts)
    scores, slots = fused_inner_product_topk(queries, keys, counts, k, out_dtype=torch.float32, **options)
    assert_topk(scores, slots, queries, keys, counts, k, atol=1e-5)
    if max_elements is not None:  # chunked queries: the same result as one search
        assert TopkConfig(**options).n_tiles_total(C) * G * 5 == max_elements  # 4 chunks of M = 17
        chunked = fused_inner_product_topk(queries, keys, counts, k, out_dtype=torch.float32,
                                           max_elements=max_elements, **options)
        assert torch.equal(chunked[0], scores) and torch.equal(chunked[1], slots)
    cfg = TopkConfig(**options)  # the same scores as the torch algorithm with the same tiles
    ref = two_stage_topk_reference(queries, keys, counts, k, tile=cfg.tile, stride=cfg.stride,
                                   n_tiles=cfg.n_tiles, out_dtype=torch.float32)
    torch.testing.assert_close(scores, ref[0], rtol=0, atol=1e-5)
    if case == 1:  # default out_dtype: the keys' dtype, as ExactStore._topk returns scores
        assert fused_inner_product_topk(queries, keys, counts, k, **options)[0].dtype == dtype
    if case == 0:  # the operator ExactStore calls: compiled as one node, no graph break (fullgraph)
        search = torch.compile(lambda q, c: torch.ops.memlm.fused_inner_product_topk(q, keys, c, k),
                               backend="aot_eager", fullgraph=True)
        op_scores, op_slots = search(queries, counts)
        direct = fused_inner_product_topk(queries, keys, counts, k)
        assert torch.equal(op_scores, direct[0]) and torch.equal(op_slots, direct[1])


def test_triton_kernels_in_the_interpreter():
    """The Triton kernels on the CPU under Triton's interpreter. TRITON_INTERPRET must be set
    before triton is first imported (triton.language's own jit functions, tl.sum / tl.max, are
    decorated then), so the cases run in a child process; the GPU tests of this file, in this
    process, stay compiled."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    version = tuple(int(p) for p in importlib.metadata.version("triton").split(".")[:2])
    if version < (3, 5):  # checked: 3.5.1 (NumPy 2.2), 3.9.0 (NumPy 2.4); 3.1's writes nothing back here
        pytest.skip(f"Triton {version}'s interpreter is not supported (3.5 or later)")
    root = Path(__file__).resolve().parents[2]
    code = ("import os, runpy; assert os.environ['TRITON_INTERPRET'] == '1'; "
            f"m = runpy.run_path({str(Path(__file__).resolve())!r}); "
            "[m['_interpreter_case'](i) or print('case', i, 'ok') for i in range(len(m['INTERPRETER_CASES']))]")
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True,
                          timeout=600)
    if proc.returncode and "only 0-dimensional arrays can be converted" in proc.stderr:
        pytest.skip("this Triton's interpreter predates NumPy 2.4 (int() of a 1-element array)")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert proc.stdout.count(" ok") == len(INTERPRETER_CASES)


# ----- GPU: the real size, against brute force, timed ---------------------------------------
gpu = pytest.mark.skipif(not available("cuda"), reason="needs a CUDA GPU and triton")


def exact_store_topk(queries, keys, counts, k, chunk_elements=2 ** 27):
    """ExactStore._topk's loop (bmm in the keys' dtype + torch.topk, chunked), for timing."""
    G, M, _ = queries.shape
    C = keys.shape[1]
    dead = torch.arange(C, device=keys.device) >= counts[:, None]
    scores = torch.empty(G, M, k, dtype=keys.dtype, device=keys.device)
    slots = torch.empty(G, M, k, dtype=torch.long, device=keys.device)
    groups = max(1, chunk_elements // (M * C))
    n_q = M if M * C <= chunk_elements else max(1, chunk_elements // C)
    for g in range(0, G, groups):
        for n in range(0, M, n_q):
            s = torch.bmm(queries[g:g + groups, n:n + n_q], keys[g:g + groups].transpose(1, 2))
            s.masked_fill_(dead[g:g + groups, None, :], float("-inf"))
            top = s.topk(k, dim=-1)
            scores[g:g + groups, n:n + n_q], slots[g:g + groups, n:n + n_q] = top.values, top.indices
    found = torch.arange(k, device=keys.device) < counts[:, None, None]
    return scores.masked_fill(~found, float("-inf")), slots.masked_fill(~found, -1)


def gpu_check(queries, keys, counts, k, atol, chunk=4, **options):
    """assert_topk of the fused path on the GPU, a few groups at a time (brute force in fp32
    without TF32). Returns the fraction of brute-force slots swapped for near-ties."""
    scores, slots = fused_inner_product_topk(queries, keys, counts, k, out_dtype=torch.float32, **options)
    missing = []
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for g in range(0, queries.shape[0], chunk):
            sl = slice(g, g + chunk)
            missing.append(assert_topk(scores[sl], slots[sl], queries[sl], keys[sl], counts[sl], k, atol))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return sum(missing) / len(missing)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["strided", "consecutive"])
def test_gpu_small_shapes(dtype, layout):
    """Odd sizes on the GPU: C not a multiple of anything, partial counts, k > some counts."""
    torch.manual_seed(1)
    G, M, C, D, k = 5, 1000, 5003, 64, 32
    queries = F.normalize(torch.randn(G, M, D, device="cuda"), dim=-1).to(dtype)
    keys = F.normalize(torch.randn(G, C + 100, D, device="cuda"), dim=-1).to(dtype)[:, :C]
    counts = torch.tensor([C, 4000, 17, 0, 2500], device="cuda")
    for options in (dict(layout=layout), dict(layout=layout, tile=16, block_m=64, block_n=64, num_warps=4),
                    dict(layout=layout, block_m=256, block_n=64, block_q=4, num_warps_2=8)):
        gpu_check(queries, keys, counts, k, atol=2e-5, chunk=5, **options)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_real_size_against_brute_force(dtype):
    """G=32 groups (batch 32, one kv head), M = 8 heads x 512 queries, C = 65,536, D=64, k=32."""
    torch.manual_seed(0)
    G, M, C, D, k = 32, 8 * 512, 65536, 64, 32
    queries = F.normalize(torch.randn(G, M, D, device="cuda"), dim=-1).to(dtype)
    keys = F.normalize(torch.randn(G, C, D, device="cuda"), dim=-1).to(dtype)
    counts = torch.full((G,), C, device="cuda")
    missing = gpu_check(queries, keys, counts, k, atol=2e-5)
    fused = cuda_ms(lambda: fused_inner_product_topk(queries, keys, counts, k), max_reps=3)
    brute = cuda_ms(lambda: exact_store_topk(queries, keys, counts, k), max_reps=2)
    print(f"\n{dtype}: fused {fused:.2f} ms, brute force (ExactStore loop) {brute:.2f} ms per search of "
          f"{G}x{M} queries over {C} keys; near-tie swaps vs brute force: {missing:.2e} of results")


@gpu
def test_gpu_knowledge_memory_wider_than_row_topk():
    """One shared store of 2.5M bf16 keys (a knowledge memory): 78,208 tiles per query, more than
    row_topk holds in a row, so the tiles are chosen by torch.topk; still brute force's top k."""
    torch.manual_seed(0)
    G, M, C, D, k = 1, 256, 2_500_000, 64, 32
    queries = F.normalize(torch.randn(G, M, D, device="cuda"), dim=-1).bfloat16()
    keys = F.normalize(torch.randn(G, C, D, device="cuda"), dim=-1).bfloat16()
    counts = torch.full((G,), C, device="cuda")
    assert TopkConfig().n_tiles_total(C) > fused_topk.ROW_TOPK_MAX_N
    gpu_check(queries, keys, counts, k, atol=2e-5)
