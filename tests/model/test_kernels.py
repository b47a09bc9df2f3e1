"""Every fast path against the eager reference (forward on CPU; gradients on the GPU)."""

import pytest
import torch

import memlm
from memlm.model.kernels import KERNELS, choose_backend, eager_attention, visibility
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
