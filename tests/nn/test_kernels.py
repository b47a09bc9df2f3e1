"""Every fast path against the eager reference (forward on CPU; gradients on the GPU)."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import memlm
import memlm.nn.kernels as kernels_module
from memlm.nn.kernels import (KERNELS, attend, choose_backend, eager_attention, merge_partials,
                                 shared_key_attention, visibility)
from tests.conftest import POSITION_KINDS, tiny_overrides


def random_case(B=2, H=4, Hkv=2, Tq=9, Tk=13, D=8, bias=True, mask=True):
    q = torch.randn(B, H, Tq, D)
    k, v = torch.randn(B, Hkv, Tk, D), torch.randn(B, Hkv, Tk, D)
    extra = {"k_offset": Tq - Tk}
    if bias:
        extra["bias"] = torch.randn(H, Tq, Tk)
    if mask:
        extra["key_mask"] = torch.rand(B, Tk) > 0.4
    return q, k, v, extra


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("bias,mask", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("Tq,Tk", [(9, 9), (9, 13), (1, 13), (16, 40)])
def test_kernel_matches_eager(backend, bias, mask, Tq, Tk):
    q, k, v, extra = random_case(Tq=Tq, Tk=Tk, bias=bias, mask=mask)
    ref = eager_attention(q, k, v, **extra)
    out = KERNELS[backend](q, k, v, **extra)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_compiled_flex_follows_a_memory_that_grows():
    """Compiled, as in training, the flex kernel sees a memory whose length changes from call to call:
    after the first recompile its k_offset is a symbolic size, which Inductor could not lower inside a
    score_mod or mask_mod (pytorch/pytorch#182606). Forward only: CPU flex has no backward."""
    torch._dynamo.reset()

    def attend_over_memory(q, k, v, key_mask):
        return KERNELS["flex"](q, k, v, k_offset=q.shape[2] - k.shape[2], key_mask=key_mask)

    compiled = torch.compile(attend_over_memory)
    with torch.no_grad():
        for Tk in (16, 32, 48):  # a 16-query segment after 0, 16 and 32 keys of memory
            q, k, v, extra = random_case(B=1, H=2, Hkv=2, Tq=16, Tk=Tk, D=8, bias=False)
            torch.testing.assert_close(compiled(q, k, v, extra["key_mask"]), eager_attention(q, k, v, **extra),
                                       atol=2e-5, rtol=1e-4)


def test_eager_matches_explicit_softmax_formula():
    q, k, v, extra = random_case(B=1, H=2, Hkv=2, Tq=4, Tk=6)
    out = eager_attention(q, k, v, scale=0.3, **extra)
    allowed = visibility(4, 6, -2, extra["key_mask"], q.device)[0, 0]
    for h in range(2):
        for i in range(4):
            logits = [(0.3 * q[0, h, i] @ k[0, h, j] + extra["bias"][h, i, j]).item() if allowed[i, j]
                      else float("-inf") for j in range(6)]
            weights = torch.tensor(logits).softmax(0)
            torch.testing.assert_close(out[0, h, i], weights @ v[0, h], atol=1e-5, rtol=1e-5)


def test_visibility_is_causal_with_offset_and_keeps_the_diagonal():
    key_mask = torch.zeros(1, 5, dtype=torch.bool)
    allowed = visibility(3, 5, -2, key_mask, torch.device("cpu"))[0, 0]
    # with every key masked only each query's own key (relative position i) stays visible
    assert allowed.tolist() == [[False, False, True, False, False],
                                [False, False, False, True, False],
                                [False, False, False, False, True]]
    causal = visibility(3, 5, -2, None, torch.device("cpu"))[0, 0]
    assert causal.sum().item() == 3 + 4 + 5


@pytest.mark.parametrize("kind", POSITION_KINDS + ["tupe+t5"])
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@torch.no_grad()  # FlexAttention has no backward on CPU
def test_model_backends_agree_with_eager(kind, backend):
    overrides = tiny_overrides(**{"attention.kv_heads": 2, "attention.qk_norm": kind == "rope"})
    if kind == "tupe+t5":
        overrides.update({"position.kind": "tupe", "position.tupe_t5": True})
    else:
        overrides["position.kind"] = kind
    torch.manual_seed(1)
    reference = memlm.build("seed-tiny", **overrides, **{"attention.backend": "eager"}).eval()
    torch.manual_seed(1)
    fast = memlm.build("seed-tiny", **overrides, **{"attention.backend": backend}).eval()
    ids = torch.randint(0, 256, (2, 20))
    torch.testing.assert_close(fast(ids).logits, reference(ids).logits, atol=1e-4, rtol=1e-4)
    # and with a cache in front: keys at negative offsets
    state_ref = reference(ids[:, :12], state=reference.init_state(2)).state
    state_fast = fast(ids[:, :12], state=fast.init_state(2)).state
    torch.testing.assert_close(fast(ids[:, 12:], state=state_fast).logits,
                               reference(ids[:, 12:], state=state_ref).logits, atol=1e-4, rtol=1e-4)


def test_auto_backend_choice():
    q = torch.randn(1, 1, 4, 8)
    assert choose_backend("auto", q, has_bias=True, has_mask=False, dropout_p=0.0) == "sdpa"  # CPU
    assert choose_backend("eager", q, has_bias=False, has_mask=False, dropout_p=0.0) == "eager"


def kernel_recorder(calls: list):
    """recorder(name): a stand-in kernel that appends (name, its keyword arguments) to `calls`
    and returns its name."""
    def recorder(name):
        def kernel(q, k, v, **kwargs):
            calls.append((name, kwargs))
            return name
        return kernel
    return recorder


class CudaQueries:
    """What choose_backend reads of the queries (is_cuda, shape) for a CUDA batch, on any machine."""

    def __init__(self, Tq):
        self.is_cuda = True
        self.shape = (2, 4, Tq, 8)


@pytest.mark.parametrize("requested", ["eager", "sdpa", "flex"])
@pytest.mark.parametrize("cuda", [False, True])
def test_a_named_backend_is_always_used(requested, cuda):
    q = CudaQueries(256) if cuda else torch.randn(1, 1, 256, 8)
    for has_bias, has_mask in [(False, False), (True, True)]:
        assert choose_backend(requested, q, has_bias=has_bias, has_mask=has_mask, dropout_p=0.0) == requested


@pytest.mark.parametrize("has_bias,has_mask", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("Tq", [1, 127, 128, 129, 512])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1, 1.0])
def test_auto_picks_flex_on_cuda_for_bias_or_mask_over_a_128_block_without_dropout(has_bias, has_mask, Tq,
                                                                                   dropout_p):
    cuda = choose_backend("auto", CudaQueries(Tq), has_bias=has_bias, has_mask=has_mask, dropout_p=dropout_p)
    expect = "flex" if (has_bias or has_mask) and Tq >= 128 and dropout_p == 0 else "sdpa"
    assert cuda == expect
    cpu = choose_backend("auto", torch.randn(1, 1, Tq, 8), has_bias=has_bias, has_mask=has_mask,
                         dropout_p=dropout_p)
    assert cpu == "sdpa"


@pytest.mark.parametrize("Tq", [127, 128])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
@pytest.mark.parametrize("backend", ["auto", "sdpa", "eager", "flex"])
def test_attend_with_log_sum_exp_on_cuda_replaces_sdpa(monkeypatch, backend, Tq, dropout_p):
    """sdpa cannot return the log-sum-exp: in its place flex from one 128-block of queries without
    dropout (as auto would pick it), eager otherwise; a named eager or flex stays. The kernels are
    stand-ins that record their call: this is the choice for CUDA queries, made on any machine."""
    calls = []
    recorder = kernel_recorder(calls)
    monkeypatch.setattr(kernels_module, "KERNELS", {n: recorder(n) for n in ("eager", "sdpa", "flex")})
    q = CudaQueries(Tq)
    for has_bias, has_mask in [(False, False), (True, False), (False, True), (True, True)]:
        bias = torch.zeros(4, Tq, 6) if has_bias else None
        key_mask = torch.ones(2, 6, dtype=torch.bool) if has_mask else None
        block = Tq >= 128 and dropout_p == 0
        chosen = ("flex" if (has_bias or has_mask) and block else "sdpa") if backend == "auto" else backend
        calls.clear()
        attend(q, "k", "v", backend=backend, bias=bias, key_mask=key_mask, k_offset=-3, scale=0.5,
               dropout_p=dropout_p, return_lse=True)
        picked = ("flex" if block else "eager") if chosen == "sdpa" else chosen
        assert [name for name, _ in calls] == [picked]
        assert calls[0][1] == {"k_offset": -3, "bias": bias, "key_mask": key_mask, "max_distance": None,
                               "scale": 0.5, "dropout_p": dropout_p, "return_lse": True}
        # without the log-sum-exp the choice is choose_backend's and no return_lse is passed
        calls.clear()
        attend(q, "k", "v", backend=backend, bias=bias, key_mask=key_mask, dropout_p=dropout_p)
        assert [name for name, _ in calls] == [chosen]
        assert calls[0][1] == {"k_offset": 0, "bias": bias, "key_mask": key_mask, "max_distance": None,
                               "scale": None, "dropout_p": dropout_p}
    # a window is a mask: auto takes flex for it from one 128-block, and it reaches the kernel
    window = torch.tensor(5.0)
    calls.clear()
    attend(q, "k", "v", backend=backend, max_distance=window, dropout_p=dropout_p)
    windowed = ("flex" if Tq >= 128 and dropout_p == 0 else "sdpa") if backend == "auto" else backend
    assert [name for name, _ in calls] == [windowed] and calls[0][1]["max_distance"] is window


# ----- every kernel against attention written out with loops in float64 -----------------------

def brute_attention(q, k, v, *, k_offset=0, bias=None, key_mask=None, max_distance=None, scale=None, drop=None,
                    causal=True):
    """(out (B, H, Tq, D), lse (B, H, Tq)) by loops: query i sees key j iff k_offset + j <= i (when
    causal), key_mask[b, j] or k_offset + j == i, and i - (k_offset + j) < max_distance (when
    given); query head h reads key head h // (H / Hkv);
    `drop` (B, H, Tq, Tk) multiplies the probabilities after the softmax."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    scale = 1 / D ** 0.5 if scale is None else scale
    out = torch.zeros(B, H, Tq, v.shape[-1], dtype=torch.float64)
    lse = torch.full((B, H, Tq), float("-inf"), dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            g = h // (H // Hkv)
            for i in range(Tq):
                seen = [j for j in range(Tk) if (not causal or k_offset + j <= i)
                        and (key_mask is None or bool(key_mask[b, j]) or k_offset + j == i)
                        and (max_distance is None or i - (k_offset + j) < float(max_distance))]
                if not seen:
                    continue
                logits = torch.tensor([scale * (q[b, h, i].double() @ k[min(b, k.shape[0] - 1), g, j].double())
                                       + (0.0 if bias is None else float(bias[h if bias.shape[0] > 1 else 0, i, j]))
                                       for j in seen], dtype=torch.float64)
                m = logits.max()
                weights = (logits - m).exp()
                total = weights.sum()
                lse[b, h, i] = m + total.log()
                probs = weights / total
                if drop is not None:
                    probs = probs * drop[b, h, i, seen].double()
                out[b, h, i] = probs @ v[min(b, v.shape[0] - 1), g, seen].double()
    return out, lse


def kernel_case(Tq, Tk, k_offset, *, H=4, Hkv=2, bias_heads=0, mask=False, window=None, B=2, D=4,
                dtype=torch.float32):
    q = torch.randn(B, H, Tq, D, dtype=dtype)
    k, v = torch.randn(B, Hkv, Tk, D, dtype=dtype), torch.randn(B, Hkv, Tk, D, dtype=dtype)
    extra = {"k_offset": k_offset}
    if window is not None:
        extra["max_distance"] = torch.tensor(window)
    if bias_heads:
        extra["bias"] = torch.randn(bias_heads, Tq, Tk)
    if mask:
        key_mask = torch.rand(B, Tk) > 0.5
        key_mask[0, 0] = False
        key_mask[1, :] = False  # a row with every key masked: each query sees only itself
        extra["key_mask"] = key_mask
    return q, k, v, extra


KERNEL_CASES = {  # Tq, Tk, k_offset, options; 4 query heads over 2 key heads unless said
    "causal-square": (5, 5, 0, {}),  # sdpa's is_causal path
    "shifted-square": (3, 3, -2, {}),  # as many keys as queries, but the keys start earlier
    "memory-before": (3, 6, -3, {}),  # k_offset + Tk = 3: the general path
    "decode-step": (1, 6, -5, {}),  # k_offset + Tk = 1: nothing to mask
    "tail-two": (3, 5, -3, {}),  # k_offset + Tk = 2: the last key is after query 0
    "equal-heads": (3, 5, -2, {"H": 2, "Hkv": 2}),
    "bias-shared": (3, 5, -2, {"bias_heads": 1}),
    "bias-per-head": (3, 5, -2, {"H": 2, "Hkv": 1, "bias_heads": 2}),
    "gqa-two-queries": (2, 4, -2, {"bias_heads": 4}),  # Tq = key heads, Tk = query heads
    "mask": (4, 6, -2, {"mask": True}),
    "mask-square": (4, 4, 0, {"mask": True, "bias_heads": 4}),
    "mask-decode": (1, 5, -4, {"mask": True}),
    "bias-decode": (1, 5, -4, {"bias_heads": 4}),
    "window": (4, 10, -6, {"window": 3.0}),  # a sliding window: keys at distance >= 3 masked
    "window-fractional": (4, 10, -6, {"window": 2.5, "mask": True, "bias_heads": 4}),  # distance 2 seen, 3 not
    "window-decode": (1, 8, -7, {"window": 4.0}),
}


FLEX_CASES = [("causal-square", None), ("memory-before", 0.37), ("bias-shared", None), ("bias-per-head", 0.37),
              ("gqa-two-queries", None), ("mask", 0.37), ("mask-square", None), ("window", None),
              ("window-fractional", 0.37)]
"""Fewer for flex, which is slow on a CPU."""


@pytest.mark.parametrize("backend,case,scale",
                         [(b, c, s) for b in ("eager", "sdpa") for c in KERNEL_CASES for s in (None, 0.37)]
                         + [("flex", c, s) for c, s in FLEX_CASES])
def test_kernel_matches_loops(backend, case, scale):
    Tq, Tk, k_offset, options = KERNEL_CASES[case]
    q, k, v, extra = kernel_case(Tq, Tk, k_offset, **options)
    ref, _ = brute_attention(q, k, v, scale=scale, **extra)
    out = KERNELS[backend](q, k, v, scale=scale, **extra)
    assert out.shape == q.shape
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_flex_skips_the_blocks_beyond_the_window():
    """Over several 128-blocks of queries and keys, the flex block mask built from max_distance
    skips whole blocks (fewer than the causal mask keeps) and the output equals eager's."""
    from torch.nn.attention.flex_attention import create_block_mask

    q, k, v, extra = kernel_case(256, 640, -384, H=2, Hkv=1, mask=True, window=150.0, D=8)
    out = KERNELS["flex"](q, k, v, **extra)
    torch.testing.assert_close(out, eager_attention(q, k, v, **extra), atol=2e-5, rtol=1e-4)
    windowed = kernels_module._window_block_mask(256, 640, -384, extra["max_distance"])
    causal = create_block_mask(lambda b, h, i, j: j - 384 <= i, None, None, 256, 640, device="cpu")
    assert 0 < windowed.kv_num_blocks.sum() + windowed.full_kv_num_blocks.sum() < \
        causal.kv_num_blocks.sum() + causal.full_kv_num_blocks.sum()


@pytest.mark.parametrize("backend,dtype", [("eager", torch.float64), ("sdpa", torch.float64), ("flex", torch.float64),
                                           ("eager", torch.bfloat16), ("sdpa", torch.bfloat16),
                                           ("flex", torch.bfloat16)])
def test_kernel_keeps_the_input_dtype(backend, dtype):
    """A float32 bias with float64 or bfloat16 queries: the output has the queries' dtype."""
    q, k, v, extra = kernel_case(3, 5, -2, bias_heads=4, mask=True, dtype=dtype)
    ref, _ = brute_attention(q, k, v, scale=0.5, **extra)
    out = KERNELS[backend](q, k, v, scale=0.5, **extra)
    assert out.dtype == dtype
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("backend", ["eager", "sdpa", "flex"])
def test_a_float64_bias_is_added_in_the_float32_of_the_scores(backend):
    """The bias is rounded to the scores' dtype before it is added: a float64 bias gives exactly
    what the same bias rounded to float32 gives."""
    q, k, v, extra = kernel_case(3, 5, -2, bias_heads=4, mask=True)
    bias = torch.randn(4, 3, 5, dtype=torch.float64)
    wide = KERNELS[backend](q, k, v, **{**extra, "bias": bias})
    narrow = KERNELS[backend](q, k, v, **{**extra, "bias": bias.float()})
    assert wide.dtype == torch.float32
    assert torch.equal(wide, narrow)


@pytest.mark.parametrize("backend,case", [("eager", "memory-before"), ("eager", "bias-per-head"), ("eager", "mask"),
                                          ("eager", "decode-step"), ("flex", "bias-per-head"), ("flex", "mask")])
def test_kernel_log_sum_exp_matches_loops(backend, case):
    Tq, Tk, k_offset, options = KERNEL_CASES[case]
    q, k, v, extra = kernel_case(Tq, Tk, k_offset, **options)
    ref, ref_lse = brute_attention(q, k, v, scale=0.5, **extra)
    out, lse = KERNELS[backend](q, k, v, scale=0.5, return_lse=True, **extra)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["auto", "eager", "sdpa", "flex"])
def test_attend_dispatches_to_a_kernel_that_computes_attention(backend):
    q, k, v, extra = kernel_case(3, 5, -2, bias_heads=4, mask=True)
    ref, ref_lse = brute_attention(q, k, v, scale=0.6, **extra)
    torch.testing.assert_close(attend(q, k, v, backend=backend, scale=0.6, **extra).double(), ref,
                               atol=1e-5, rtol=1e-5)
    # sdpa cannot return the log-sum-exp: eager stands in for it on a CPU
    out, lse = attend(q, k, v, backend=backend, scale=0.6, return_lse=True, **extra)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)


def test_attend_defaults_to_a_causal_segment_without_memory():
    q, k, v, _ = kernel_case(4, 4, 0, H=4, Hkv=2)
    ref, _ = brute_attention(q, k, v)
    torch.testing.assert_close(attend(q, k, v).double(), ref, atol=1e-5, rtol=1e-5)
    for backend in ("eager", "sdpa", "flex"):
        torch.testing.assert_close(KERNELS[backend](q, k, v).double(), ref, atol=1e-5, rtol=1e-5)


def test_attend_rejects_an_unknown_backend():
    q, k, v, _ = kernel_case(2, 2, 0)
    with pytest.raises(KeyError, match="nope"):
        attend(q, k, v, backend="nope")


def test_flex_on_cpu_hides_only_the_not_compiled_warning(monkeypatch):
    """torch warns once per process that flex runs uncompiled; the CPU path silences that warning
    and lets torch's others through."""
    from torch.nn.attention import flex_attention as flex_module

    q, k, v, extra = kernel_case(3, 5, -2, mask=True)

    def warnings_of(call):
        monkeypatch.setattr(flex_module, "_WARNINGS_SHOWN", set())  # as in a fresh process
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
        return [str(w.message) for w in caught]

    bare = warnings_of(lambda: flex_module.flex_attention(q, k, v, return_lse=True, enable_gqa=True))
    assert any("without torch.compile" in m for m in bare)  # what there is to hide
    ours = warnings_of(lambda: KERNELS["flex"](q, k, v, return_lse=True, **extra))
    assert not any("without torch.compile" in m for m in ours)
    assert ours == [m for m in bare if "without torch.compile" not in m]


def test_flex_refuses_dropout():
    q, k, v, extra = kernel_case(3, 5, -2)
    with pytest.raises(ValueError, match="^the flex attention backend has no dropout; use eager or sdpa"):
        attend(q, k, v, backend="flex", dropout_p=0.1, **extra)


@pytest.mark.parametrize("case", ["causal-square", "memory-before", "decode-step", "bias-per-head", "mask"])
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_attention_dropout_drops_probabilities_after_the_softmax(backend, case):
    """The same seed draws the same mask on the (B, H, Tq, Tk) probabilities: 0 or 1 / (1 - p)."""
    Tq, Tk, k_offset, options = KERNEL_CASES[case]
    q, k, v, extra = kernel_case(Tq, Tk, k_offset, **options)
    torch.manual_seed(7)
    out = attend(q, k, v, backend=backend, scale=0.8, dropout_p=0.5, **extra)
    torch.manual_seed(7)
    drop = F.dropout(torch.ones(q.shape[0], q.shape[1], Tq, Tk), 0.5)
    assert (drop == 0).any() and (drop == 2).any()
    ref, _ = brute_attention(q, k, v, scale=0.8, drop=drop, **extra)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_visibility_per_row_key_mask_and_shapes():
    key_mask = torch.tensor([[True, False, True, True], [False, False, False, True]])
    allowed = visibility(2, 4, -2, key_mask, torch.device("cpu"))
    assert allowed.shape == (2, 1, 2, 4)
    for b in range(2):
        for i in range(2):
            for j in range(4):
                expect = (j - 2 <= i) and (bool(key_mask[b, j]) or j - 2 == i)
                assert bool(allowed[b, 0, i, j]) == expect, (b, i, j)
    assert visibility(3, 3, 0, None, torch.device("cpu")).shape == (1, 1, 3, 3)
    assert visibility(3, 3, 0, None, torch.device("cpu"))[0, 0].tolist() == [
        [True, False, False], [True, True, False], [True, True, True]]


# ----- persistent keys every query sees, merged with the causal part ----------------------------

@pytest.mark.parametrize("Hkv,Bk,dtype", [(2, 2, torch.float32), (1, 1, torch.float32), (2, 1, torch.float32),
                                          (1, 2, torch.float64)])
def test_shared_key_attention_matches_loops(Hkv, Bk, dtype):
    q = torch.randn(2, 2, 3, 4, dtype=dtype)
    k, v = torch.randn(Bk, Hkv, 5, 4, dtype=dtype), torch.randn(Bk, Hkv, 5, 4, dtype=dtype)
    out, lse = shared_key_attention(q, k, v, 0.45)
    ref, ref_lse = brute_attention(q, k, v, scale=0.45, causal=False)
    assert out.shape == (2, 2, 3, 4) and lse.shape == (2, 2, 3)
    assert out.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)


def test_shared_key_attention_dropout_on_the_probabilities():
    q = torch.randn(2, 2, 3, 4)
    k, v = torch.randn(1, 1, 5, 4), torch.randn(1, 1, 5, 4)
    torch.manual_seed(5)
    out, lse = shared_key_attention(q, k, v, 0.45, dropout_p=0.5)
    torch.manual_seed(5)
    drop = F.dropout(torch.ones(2, 2, 3, 5), 0.5)
    ref, ref_lse = brute_attention(q, k, v, scale=0.45, causal=False, drop=drop)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)  # before dropout


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_merge_partials_is_one_softmax_over_the_union(dtype):
    q = torch.randn(2, 2, 3, 4, dtype=dtype)
    local_k, local_v = torch.randn(2, 2, 5, 4, dtype=dtype), torch.randn(2, 2, 5, 4, dtype=dtype)
    shared_k, shared_v = torch.randn(1, 2, 4, 4, dtype=dtype), torch.randn(1, 2, 4, 4, dtype=dtype)
    a, lse_a = eager_attention(q, local_k, local_v, k_offset=-2, scale=0.5, return_lse=True)
    b, lse_b = shared_key_attention(q, shared_k, shared_v, 0.5)
    out, lse = merge_partials(a, lse_a, b, lse_b)
    assert out.dtype == dtype and lse.dtype == torch.float32
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-5
    # the union by loops: the shared keys first (visible to all), then the causal local ones
    union_k = torch.cat([shared_k.expand(2, -1, -1, -1), local_k], dim=2)
    union_v = torch.cat([shared_v.expand(2, -1, -1, -1), local_v], dim=2)
    ref, ref_lse = brute_attention(q, union_k, union_v, k_offset=-2 - 4, scale=0.5,
                                   key_mask=torch.tensor([[True] * 4 + [True] * 5] * 2))
    # shared keys have positions -6..-3 and local ones -2..2: the causal rule is the same
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), ref_lse, atol=tol, rtol=tol)
    # weights by hand: exp(lse_part - lse_total)
    w_a = (lse_a.double() - ref_lse).exp()[..., None]
    w_b = (lse_b.double() - ref_lse).exp()[..., None]
    torch.testing.assert_close(out.double(), w_a * a.double() + w_b * b.double(), atol=tol, rtol=tol)


def test_merge_partials_gives_an_empty_part_no_weight():
    out_a, lse_a = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3)
    empty_out, empty_lse = torch.zeros(1, 2, 3, 4), torch.full((1, 2, 3), float("-inf"))
    for first, second in [((out_a, lse_a), (empty_out, empty_lse)), ((empty_out, empty_lse), (out_a, lse_a))]:
        out, lse = merge_partials(*first, *second)
        torch.testing.assert_close(out, out_a)
        torch.testing.assert_close(lse, lse_a)
    # both empty: no keys at all gives a zero output (not NaN) and an lse of -inf
    out, lse = merge_partials(empty_out, empty_lse, torch.ones(1, 2, 3, 4), empty_lse)
    assert torch.equal(out, torch.zeros(1, 2, 3, 4))
    assert torch.isneginf(lse).all()


@pytest.mark.parametrize("backend", ["eager", "sdpa", "flex"])
def test_kernels_compute_on_the_queries_device_not_torchs_default(backend):
    """Masks, positions and flex's block mask and index scalars are made on q's device: with torch's
    default device set to another one (meta here) every kernel gives the same output on the CPU."""
    for case in ("mask", "bias-per-head", "memory-before"):
        Tq, Tk, k_offset, options = KERNEL_CASES[case]
        Tk, k_offset = Tk + 1, k_offset - 1  # a block mask no other test has cached
        q, k, v, extra = kernel_case(Tq, Tk, k_offset, **options)
        expected = KERNELS[backend](q, k, v, scale=0.5, **extra)
        with torch.device("meta"):
            got = KERNELS[backend](q, k, v, scale=0.5, **extra)
            allowed = visibility(Tq, Tk, k_offset, extra.get("key_mask"), torch.device("cpu"))
        assert got.device.type == "cpu" and allowed.device.type == "cpu"
        torch.testing.assert_close(got, expected)


def test_dropout_uses_the_rate_asked_for():
    """p = 0.3 (not F.dropout's default 0.5): kept probabilities are scaled by 1 / 0.7, in the
    causal kernel and over shared keys."""
    q, k, v, extra = kernel_case(4, 6, -2, mask=True)
    torch.manual_seed(11)
    out = eager_attention(q, k, v, scale=0.8, dropout_p=0.3, **extra)
    torch.manual_seed(11)
    drop = F.dropout(torch.ones(2, 4, 4, 6), 0.3)
    assert torch.allclose(drop[drop != 0], torch.tensor(1 / 0.7))
    torch.testing.assert_close(out.double(), brute_attention(q, k, v, scale=0.8, drop=drop, **extra)[0],
                               atol=1e-5, rtol=1e-5)
    torch.manual_seed(12)
    out, _ = shared_key_attention(q, k, v, 0.8, dropout_p=0.3)
    torch.manual_seed(12)
    drop = F.dropout(torch.ones(2, 4, 4, 6), 0.3)
    torch.testing.assert_close(out.double(), brute_attention(q, k, v, scale=0.8, drop=drop, causal=False)[0],
                               atol=1e-5, rtol=1e-5)


def test_shared_key_attention_groups_heads_when_there_are_as_many_keys_as_query_heads():
    """4 query heads over 2 key heads with P = 4 keys: heads are grouped by the head count, not the key count."""
    q = torch.randn(2, 4, 3, 5)
    k, v = torch.randn(2, 2, 4, 5), torch.randn(2, 2, 4, 5)
    out, lse = shared_key_attention(q, k, v, 0.45)
    ref, ref_lse = brute_attention(q, k, v, scale=0.45, causal=False)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)


class FakeCudaTensor:
    """What flex_attention reads of a CUDA tensor (is_cuda, shape, device), on any machine."""

    def __init__(self, shape):
        self.is_cuda, self.shape, self.device = True, shape, torch.device("cpu")


@pytest.mark.parametrize("cuda", [False, True])
def test_flex_runs_compiled_with_its_tile_sizes_on_cuda_and_eagerly_on_a_cpu(cuda, monkeypatch):
    """On CUDA flex calls the compiled FlexAttention with FLEX_KERNEL_OPTIONS (64 x 64 tiles); on a
    CPU the eager one, without kernel options. The kernels are stand-ins that record their call."""
    import torch.nn.attention.flex_attention as flex_module

    calls = []
    recorder = kernel_recorder(calls)
    monkeypatch.setattr(kernels_module, "_compiled_flex", lambda: recorder("compiled"))
    monkeypatch.setattr(flex_module, "flex_attention", recorder("eager"))
    monkeypatch.setattr(kernels_module, "_causal_block_mask", lambda *args: ("block", args))
    if cuda:
        q, k, v = FakeCudaTensor((2, 4, 3, 8)), FakeCudaTensor((2, 2, 5, 8)), "v"
    else:
        q, k, v = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 5, 8), "v"
    assert kernels_module.flex_attention(q, k, v, k_offset=-2, scale=0.5) == ("compiled" if cuda else "eager")
    (name, kwargs), = calls
    assert kwargs == {"score_mod": None, "block_mask": ("block", (3, 5, -2, "cpu")), "scale": 0.5,
                      "enable_gqa": True, "return_lse": False,
                      "kernel_options": kernels_module.FLEX_KERNEL_OPTIONS if cuda else None}
