"""Attention kernels behind one signature: eager (the reference), sdpa and flex.

All three compute, for queries at relative positions 0..Tq-1 and keys at
k_offset..k_offset+Tk-1 (k_offset <= 0 when a cache or memory precedes the segment):

    out = softmax(scale * q k^T + bias, masked) v

where key j is visible to query i iff k_offset + j <= i (causal), when a key mask is
given key_mask[b, j] is True or the key is the query itself (a token always sees itself), and
when a maximum distance is given i - (k_offset + j) < max_distance (a sliding window, a 0-d
tensor: adaptive span's, read without a device sync; flex skips the blocks beyond it).
`bias` is an additive (H or 1, Tq, Tk) score term (T5 relative bias, TUPE).
Keys and values may have fewer heads than queries (grouped / multi-query attention).
eager and flex can also return the log-sum-exp of the scores (B, H, Tq), which lets a second
set of keys (persistent memory) be merged in exactly (`merge_attention`).

`flex` uses torch FlexAttention ("FlexAttention: The Flexibility of PyTorch with the
Performance of FlashAttention", PyTorch blog 2024 / arXiv 2412.05496): the causal structure
goes in a cached block mask, the bias and key mask in a score_mod, so block sparsity holds
even with forgetful masking. FlexAttention has no backward on CPU.
"""

from __future__ import annotations

import functools
import math
import warnings

import torch
import torch.nn.functional as F

BACKENDS = ("eager", "sdpa", "flex")


def visibility(q_len: int, k_len: int, k_offset: int, key_mask: torch.Tensor | None,
               device: torch.device, max_distance: torch.Tensor | None = None) -> torch.Tensor:
    """Bool mask (1 or B, 1, Tq, Tk): True where query i may attend key j."""
    q_pos = torch.arange(q_len, device=device)[:, None]
    k_pos = torch.arange(k_offset, k_offset + k_len, device=device)[None, :]
    causal = k_pos <= q_pos  # (Tq, Tk)
    if max_distance is not None:
        causal = causal & (q_pos - k_pos < max_distance)
    if key_mask is None:
        return causal[None, None]
    return causal & (key_mask[:, None, None, :] | (k_pos == q_pos))  # (B, 1, Tq, Tk)


def eager_attention(q, k, v, *, k_offset=0, bias=None, key_mask=None, max_distance=None, scale=None,
                    dropout_p=0.0, return_lse=False):
    """Reference: q (B, H, Tq, D), k/v (B, Hkv, Tk, D) -> (B, H, Tq, D)."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if k.shape[1] != H:
        k = k.repeat_interleave(H // k.shape[1], dim=1)  # (B, H, Tk, D)
        v = v.repeat_interleave(H // v.shape[1], dim=1)
    scores = (q @ k.transpose(-1, -2)).float() * scale  # (B, H, Tq, Tk)
    if bias is not None:
        scores = scores + bias.float()
    scores = scores.masked_fill(~visibility(Tq, Tk, k_offset, key_mask, q.device, max_distance), float("-inf"))
    probs = scores.softmax(dim=-1).to(v.dtype)
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    out = probs @ v
    return (out, scores.logsumexp(dim=-1)) if return_lse else out


def sdpa_attention(q, k, v, *, k_offset=0, bias=None, key_mask=None, max_distance=None, scale=None,
                   dropout_p=0.0):
    """torch.nn.functional.scaled_dot_product_attention; flash/efficient kernels when plain causal."""
    Tq, Tk = q.shape[2], k.shape[2]
    gqa = k.shape[1] != q.shape[1]
    plain = bias is None and key_mask is None and max_distance is None
    if plain and k_offset == 0 and Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                              dropout_p=dropout_p, enable_gqa=gqa)
    if plain and k_offset + Tk <= 1:  # every key precedes or is the only query: nothing to mask
        return F.scaled_dot_product_attention(q, k, v, scale=scale, dropout_p=dropout_p, enable_gqa=gqa)
    mask = visibility(Tq, Tk, k_offset, key_mask, q.device, max_distance)
    if bias is None:
        attn_mask = mask
    else:
        attn_mask = bias[None].to(q.dtype).masked_fill(~mask, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale,
                                          dropout_p=dropout_p, enable_gqa=gqa)


FLEX_KERNEL_OPTIONS = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_M1": 64, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 64}
"""Tile sizes of the CUDA flex kernels: with a score_mod (a key mask or a score bias), FlexAttention's
default 128 x 128 forward tiles are much slower than 64 x 64 ones on Hopper GPUs, and 64 x 64 tiles
in both of the backward's loops (M1/N1 for dK and dV, M2/N2 for dQ) beat its defaults (measured by
`scripts/mask_kernels_bench.py`, variants flex-b64 and flex-bwd-*; the numbers are in BENCHMARKS.md)."""


def _index_scalar(value: int, device) -> torch.Tensor:
    """A 0-d int32 tensor for an int that a mask_mod or score_mod reads. Under a compiled model whose
    memory length varies, the int is a symbolic size, and Inductor cannot lower a closure over one
    (torch 2.11: "'ShapeAsConstantBuffer' object has no attribute 'dtype'", pytorch/pytorch#182606);
    a captured tensor is an ordinary buffer."""
    return torch.tensor(value, dtype=torch.int32, device=device)


@functools.lru_cache(maxsize=64)
def _causal_block_mask(q_len: int, k_len: int, k_offset: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    offset = _index_scalar(k_offset, device)

    def causal(b, h, q_idx, kv_idx):
        return kv_idx + offset <= q_idx

    return create_block_mask(causal, None, None, q_len, k_len, device=device)


def _window_block_mask(q_len: int, k_len: int, k_offset: int, max_distance: torch.Tensor):
    """The causal block mask limited to keys closer than max_distance (0-d tensor): blocks wholly
    beyond it are skipped. Not cached (the distance is a tensor that changes as spans learn);
    under torch.compile it is computed inside the graph."""
    from torch.nn.attention.flex_attention import create_block_mask

    offset = _index_scalar(k_offset, max_distance.device)

    def windowed(b, h, q_idx, kv_idx):
        distance = q_idx - (kv_idx + offset)
        return (distance >= 0) & (distance < max_distance)

    return create_block_mask(windowed, None, None, q_len, k_len, device=max_distance.device)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False)


def flex_attention(q, k, v, *, k_offset=0, bias=None, key_mask=None, max_distance=None, scale=None,
                   dropout_p=0.0, return_lse=False):
    """FlexAttention: block mask for causality and the window, score_mod for bias and key mask."""
    if dropout_p > 0:
        raise ValueError("the flex attention backend has no dropout; use eager or sdpa")
    Tq, Tk = q.shape[2], k.shape[2]
    if max_distance is None:
        block_mask = _causal_block_mask(Tq, Tk, k_offset, str(q.device))
    else:
        block_mask = _window_block_mask(Tq, Tk, k_offset, max_distance.to(q.device))
    return _flex_call(q, k, v, block_mask, k_offset=k_offset, bias=bias, key_mask=key_mask, scale=scale,
                      return_lse=return_lse)


def _flex_call(q, k, v, block_mask, *, k_offset, bias, key_mask, scale, return_lse):
    """FlexAttention over `block_mask` with the bias (H or 1, Tq, Tk) and the per-row key mask
    (B, Tk) in a score_mod (none without either): compiled with memlm's tiles on CUDA, the unfused
    reference elsewhere."""
    from torch.nn.attention.flex_attention import flex_attention as flex_eager
    score_mod = None
    if bias is not None or key_mask is not None:
        bias_heads = 0 if bias is None else bias.shape[0]
        offset = _index_scalar(k_offset, q.device)

        def score_mod(score, b, h, q_idx, kv_idx):
            if bias is not None:
                score = score + (bias[h if bias_heads > 1 else 0, q_idx, kv_idx]).to(score.dtype)
            if key_mask is not None:
                keep = key_mask[b, kv_idx] | (kv_idx + offset == q_idx)
                score = torch.where(keep, score, float("-inf"))
            return score

    if q.is_cuda:
        kernel = _compiled_flex()
    else:  # the unfused reference path; it warns that it is not compiled, which is the point here
        kernel = functools.partial(_quiet, flex_eager)
    return kernel(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                  enable_gqa=k.shape[1] != q.shape[1], return_lse=return_lse,
                  kernel_options=FLEX_KERNEL_OPTIONS if q.is_cuda else None)


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return fn(*args, **kwargs)


KERNELS = {"eager": eager_attention, "sdpa": sdpa_attention, "flex": flex_attention}


def choose_backend(requested: str, q: torch.Tensor, *, has_bias: bool, has_mask: bool,
                   dropout_p: float) -> str:
    """auto: flex on CUDA for biases and masks over at least one 128-block of queries (short
    decode steps would recompile it for every cache length), sdpa otherwise."""
    if requested != "auto":
        return requested
    if q.is_cuda and (has_bias or has_mask) and dropout_p == 0 and q.shape[2] >= 128:
        return "flex"
    return "sdpa"


def attend(q, k, v, *, backend="auto", k_offset=0, bias=None, key_mask=None, max_distance=None, scale=None,
           dropout_p=0.0, return_lse=False):
    """Dispatch to one kernel. q (B, H, Tq, D), k/v (B, Hkv, Tk, D) -> (B, H, Tq, D)
    [and the log-sum-exp (B, H, Tq) with return_lse; sdpa cannot give it, so eager stands in]."""
    name = choose_backend(backend, q, has_bias=bias is not None,
                          has_mask=key_mask is not None or max_distance is not None, dropout_p=dropout_p)
    if return_lse and name == "sdpa":  # flex from one 128-block of queries, as `choose_backend` decides
        name = "flex" if q.is_cuda and dropout_p == 0 and q.shape[2] >= 128 else "eager"
    kwargs = {"return_lse": True} if return_lse else {}
    return KERNELS[name](q, k, v, k_offset=k_offset, bias=bias, key_mask=key_mask, max_distance=max_distance,
                         scale=scale, dropout_p=dropout_p, **kwargs)


@torch.no_grad()
def band_attention(q, k, v, *, k_offset: int, low: torch.Tensor, high: torch.Tensor, bias=None, key_mask=None,
                   scale: float, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q (B, H, Tq, D) over only the keys k/v (B, Hkv, Tk, D) whose distance d to the
    query lies in each head's band, low[h] <= d < high[h] (low, high: (H,) float), among those it
    may see (causal, key mask; `bias` (H or 1, Tq, Tk) added): (out (B, H, Tq, D), its log-sum-exp
    (B, H, Tq)); a query without such keys gets out 0 and lse -inf. No gradient: adaptive span's
    gradient (memlm.memory.adaptive_span) reads it. Flex on CUDA, where the block mask skips every
    block outside all bands; the eager reference elsewhere (`backend` "eager" or "flex" forces one)."""
    Tq, Tk = q.shape[2], k.shape[2]
    if backend == "auto":
        backend = "flex" if q.is_cuda else "eager"
    if backend == "eager":
        distance = (torch.arange(Tq, device=q.device)[:, None]
                    - torch.arange(k_offset, k_offset + Tk, device=q.device)[None, :]).float()  # (Tq, Tk)
        inside = (distance >= low[:, None, None]) & (distance < high[:, None, None])  # (H, Tq, Tk)
        band = torch.zeros(inside.shape, device=q.device).masked_fill(~inside, float("-inf"))
        out, lse = eager_attention(q, k, v, k_offset=k_offset, bias=band if bias is None else band + bias.float(),
                                   key_mask=key_mask, scale=scale, return_lse=True)
        return torch.nan_to_num(out, nan=0.0), lse
    from torch.nn.attention.flex_attention import create_block_mask
    offset = _index_scalar(k_offset, q.device)

    def in_band(b, h, q_idx, kv_idx):  # per head, for every row: the block mask stays small
        distance = q_idx - (kv_idx + offset)
        return (distance >= 0) & (distance >= low[h]) & (distance < high[h])

    block_mask = create_block_mask(in_band, None, q.shape[1], Tq, Tk, device=q.device)
    return _flex_call(q, k, v, block_mask, k_offset=k_offset, bias=bias, key_mask=key_mask, scale=scale,
                      return_lse=True)


def shared_key_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                         dropout_p: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q (B, H, Tq, D) over keys every query may see, k/v (B or 1, Hkv, P, D):
    (out (B, H, Tq, D), log-sum-exp of the scores (B, H, Tq)), for `merge_partials`."""
    H = q.shape[1]
    if k.shape[1] != H:
        k = k.repeat_interleave(H // k.shape[1], dim=1)
        v = v.repeat_interleave(H // v.shape[1], dim=1)
    scores = (q @ k.transpose(-1, -2)).float() * scale  # (B, H, Tq, P)
    lse = scores.logsumexp(dim=-1)  # (B, H, Tq)
    probs = (scores - lse[..., None]).exp().to(v.dtype)
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    return probs @ v, lse


def merge_partials(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                   lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One softmax over two key sets from the attentions over each: outs (B, H, Tq, D), their
    log-sum-exps (B, H, Tq) -> (out, lse) over the union. An lse of -inf (no keys) weighs 0.
    Dropout applied to each part's probabilities equals dropout on the joint ones."""
    total = torch.logaddexp(lse_a.float(), lse_b.float())  # (B, H, Tq)
    w_a = torch.nan_to_num((lse_a.float() - total).exp())[..., None].to(out_a.dtype)
    w_b = torch.nan_to_num((lse_b.float() - total).exp())[..., None].to(out_b.dtype)
    return w_a * out_a + w_b * out_b, total
