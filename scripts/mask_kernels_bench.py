"""Time forward+backward of masked attention kernels on a GPU: which kernel should a per-row key
mask (document boundaries in a recurrent memory) and a score bias use?

    python scripts/mask_kernels_bench.py [--batch 32 --heads 8 --kv-heads 1 --q-len 512 --k-len 1024]

Variants, each compiled with torch.compile and checked against the eager reference:
  sdpa-bool      sdpa with a (B, 1, Tq, Tk) boolean mask (causal offset & key mask)
  flex-score     FlexAttention, causal block mask, key mask in a score_mod (memlm's flex path)
  flex-maskmod   FlexAttention, key mask and causality in a per-batch block mask (mask_mod)
  flex-expand    flex-score with the key/value heads repeated to the query heads (no GQA)
  flex-b64       flex-score with 64 x 64 tiles
  flex-bwd-a/b/c flex-b64 with backward tiles (BLOCK_M1, BLOCK_N1, BLOCK_M2, BLOCK_N2) of
                 32/64/64/32, 64/64/64/64 and 64/128/128/64 (the backward's own tiles)
  flex-autotune  flex-score compiled with mode="max-autotune-no-cudagraphs" (every tile tried)
  sdpa-expand    sdpa-bool with the key/value heads repeated to the query heads (sdpa's memory-efficient
                 kernel takes no grouped heads; this checks whether reaching it pays)
  sdpa-lower-right  sdpa-expand with torch.nn.attention.bias.causal_lower_right in place of the
                 boolean mask (only with --no-key-mask and no --bias)
  sdpa-causal-pad  sdpa's is_causal (flash) kernel over the queries padded at the front to the key length,
                 the padded rows' outputs dropped: the Transformer-XL pattern through the flash kernel
                 at the cost of the padded rows (only with --no-key-mask and no --bias; with
                 --k-len equal to --q-len it is the plain causal kernel, the seed-small floor)
  sdpa-split-bound  sdpa over the memory keys (no mask) plus sdpa's causal kernel over the segment's keys, no
                 merge: a lower bound on attention split into a memory part and a causal part merged
                 through log-sum-exps (only with --no-key-mask and no --bias)
and, with --bias, the same with an additive (H, Tq, Tk) bias (sdpa gets it as a float mask);
--bias-grad makes that bias a leaf that takes a gradient (adaptive span's dense soft mask as
memlm passes it). --span adds adaptive span's soft mask computed inside the score_mod from the
spans (H,) and the distance, without their gradient:
  flex-span      flex-b64 with that score_mod (no dense bias read)
  flex-relbias   flex-b64 with the bias read from a (H, Tq - offset) table by distance (adaptive span's
                 soft mask depends on the head and the distance only), taking a gradient with
                 --bias-grad: fewer bytes read than the dense bias, more atomic adds per address
--no-key-mask drops the per-row key mask: the plain Transformer-XL case (causal with an offset).
--dropout P gives sdpa-bool attention dropout (flex has none; memlm's auto backend takes sdpa then);
--only sdpa-bool,flex-b64 times just those variants.
"""

from __future__ import annotations

import argparse
import functools
import math

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from memlm.device import cuda_ms
from memlm.nn.kernels import eager_attention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=1)
    parser.add_argument("--q-len", type=int, default=512)
    parser.add_argument("--k-len", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--bias", action="store_true")
    parser.add_argument("--bias-grad", action="store_true", help="the --bias takes a gradient")
    parser.add_argument("--span", action="store_true", help="adds the flex-span variant (spans ~ Tk/2, ramp 32)")
    parser.add_argument("--no-key-mask", action="store_true", help="causality with an offset only")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    args = parser.parse_args()
    B, H, Hkv, Tq, Tk, D = args.batch, args.heads, args.kv_heads, args.q_len, args.k_len, args.dim
    offset = Tq - Tk  # keys k_offset..Tq-1: a memory of Tk - Tq before the segment
    device, dtype = "cuda", torch.bfloat16
    torch.manual_seed(0)
    q = torch.randn(B, H, Tq, D, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(B, Hkv, Tk, D, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(B, Hkv, Tk, D, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(B, H, Tq, D, device=device, dtype=dtype)
    key_mask = torch.arange(Tk, device=device)[None, :] >= torch.randint(0, Tk, (B, 1), device=device)  # (B, Tk)
    if args.no_key_mask:
        key_mask[:] = True
    bias = torch.randn(H, Tq, Tk, device=device, dtype=torch.float32, requires_grad=args.bias_grad) if args.bias else None
    spans = torch.linspace(Tk / 4, 3 * Tk / 4, H, device=device)  # (H,) in positions
    ramp = 32.0
    relative = torch.randn(H, Tq - offset, device=device, requires_grad=args.bias_grad)  # (H, distances)
    scale = 1.0 / math.sqrt(D)

    q_pos = torch.arange(Tq, device=device)[:, None]
    k_pos = torch.arange(offset, offset + Tk, device=device)[None, :]
    visible = (k_pos <= q_pos) & (key_mask[:, None, None, :] | (k_pos == q_pos))  # (B, 1, Tq, Tk)

    def sdpa_bool():
        mask = visible if bias is None else bias[None].to(dtype).masked_fill(~visible, float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=Hkv != H,
                                              dropout_p=args.dropout)

    causal_block = create_block_mask(lambda b, h, i, j: j + offset <= i, None, None, Tq, Tk, device=device)

    def score_mod(score, b, h, i, j):
        if bias is not None:
            score = score + bias[h, i, j]
        if args.no_key_mask:
            return score
        return torch.where(key_mask[b, j] | (j + offset == i), score, float("-inf"))

    def flex_score(q, k, v, kernel_options=None):
        mod = None if args.no_key_mask and bias is None else score_mod
        return flex_attention(q, k, v, score_mod=mod, block_mask=causal_block, scale=scale,
                              enable_gqa=k.shape[1] != q.shape[1], kernel_options=kernel_options)

    def flex_maskmod(q, k, v):
        def visible_mod(b, h, i, j):
            return (j + offset <= i) & (key_mask[b, j] | (j + offset == i))
        block = create_block_mask(visible_mod, B, None, Tq, Tk, device=device)
        mod = None if bias is None else (lambda score, b, h, i, j: score + bias[h, i, j])
        return flex_attention(q, k, v, score_mod=mod, block_mask=block, scale=scale, enable_gqa=Hkv != H)

    def flex_expand(q, k, v):
        return flex_score(q, k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1))

    def sdpa_expand(mask=None):
        if mask is None:
            mask = visible if bias is None else bias[None].to(dtype).masked_fill(~visible, float("-inf"))
        groups = H // Hkv
        return F.scaled_dot_product_attention(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1),
                                              attn_mask=mask, scale=scale, dropout_p=args.dropout)

    def sdpa_lower_right():
        from torch.nn.attention.bias import causal_lower_right
        return sdpa_expand(causal_lower_right(Tq, Tk))

    def sdpa_causal_pad():
        padded = torch.cat([q.new_zeros(B, H, Tk - Tq, D), q], dim=2) if Tk > Tq else q  # (B, H, Tk, D)
        out = F.scaled_dot_product_attention(padded, k, v, is_causal=True, scale=scale, enable_gqa=Hkv != H)
        return out[:, :, Tk - Tq:]

    def flex_span():
        def span_mod(score, b, h, i, j):
            distance = (i - j - offset).to(torch.float32)
            soft = ((ramp + spans[h] - distance) / ramp).clamp(0, 1)
            score = torch.where(soft > 0, score + soft.clamp_min(1e-30).log(), float("-inf"))
            return torch.where(key_mask[b, j] | (j + offset == i), score, float("-inf"))
        return flex_attention(q, k, v, score_mod=span_mod, block_mask=causal_block, scale=scale,
                              enable_gqa=Hkv != H, kernel_options={"BLOCK_M": 64, "BLOCK_N": 64})

    def flex_relbias():
        def relative_mod(score, b, h, i, j):
            distance = i - j - offset
            score = score + relative[h, torch.where(distance >= 0, distance, 0)]  # future keys: masked after
            return torch.where(key_mask[b, j] | (j + offset == i), score, float("-inf"))
        return flex_attention(q, k, v, score_mod=relative_mod, block_mask=causal_block, scale=scale,
                              enable_gqa=Hkv != H, kernel_options={"BLOCK_M": 64, "BLOCK_N": 64})

    def sdpa_split_bound():
        memory = Tk - Tq
        mem = F.scaled_dot_product_attention(q, k[:, :, :memory], v[:, :, :memory], scale=scale, enable_gqa=Hkv != H)
        seg = F.scaled_dot_product_attention(q, k[:, :, memory:], v[:, :, memory:], is_causal=True, scale=scale,
                                             enable_gqa=Hkv != H)
        return mem + seg  # not the attention: its kernels' cost only

    variants = {
        "sdpa-bool": torch.compile(sdpa_bool),
        "sdpa-expand": torch.compile(sdpa_expand),
        "flex-score": torch.compile(lambda: flex_score(q, k, v)),
        "flex-maskmod": torch.compile(lambda: flex_maskmod(q, k, v)),
        "flex-expand": torch.compile(lambda: flex_expand(q, k, v)),
        "flex-b64": torch.compile(lambda: flex_score(q, k, v, {"BLOCK_M": 64, "BLOCK_N": 64})),
        "flex-autotune": torch.compile(lambda: flex_score(q, k, v), mode="max-autotune-no-cudagraphs"),
    }
    for name, (m1, n1, m2, n2) in {"flex-bwd-a": (32, 64, 64, 32), "flex-bwd-b": (64, 64, 64, 64),
                                   "flex-bwd-c": (64, 128, 128, 64)}.items():
        options = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_M1": m1, "BLOCK_N1": n1, "BLOCK_M2": m2, "BLOCK_N2": n2}
        variants[name] = torch.compile(functools.partial(flex_score, q, k, v, options))
    if args.no_key_mask and bias is None:
        variants["sdpa-lower-right"] = torch.compile(sdpa_lower_right)
        variants["sdpa-causal-pad"] = torch.compile(sdpa_causal_pad)
        variants["sdpa-split-bound"] = torch.compile(sdpa_split_bound)
    if args.span:
        variants["flex-span"] = torch.compile(flex_span)
        variants["flex-relbias"] = torch.compile(flex_relbias)
    if args.only:
        wanted = args.only.split(",")
        missing = [name for name in wanted if name not in variants]
        if missing:
            parser.error(f"--only {','.join(missing)}: not a variant of this run (variants: {', '.join(variants)})")
        variants = {name: variants[name] for name in wanted}
    with torch.no_grad():
        reference = eager_attention(q.float(), k.float(), v.float(), k_offset=offset,
                                    key_mask=None if args.no_key_mask else key_mask, scale=scale,
                                    bias=bias)
        distance = (torch.arange(Tq, device=device)[:, None] - torch.arange(offset, offset + Tk, device=device)).float()
        soft = ((ramp + spans[:, None, None] - distance.clamp_min(0)) / ramp).clamp(0, 1)  # (H, Tq, Tk)
        span_reference = eager_attention(q.float(), k.float(), v.float(), k_offset=offset, key_mask=key_mask,
                                         scale=scale, bias=torch.where(soft > 0, soft.clamp_min(1e-30).log(),
                                                                       float("-inf")))
        rel_index = distance.clamp_min(0).long()  # (Tq, Tk); future keys are masked anyway
        relbias_reference = eager_attention(q.float(), k.float(), v.float(), k_offset=offset, key_mask=key_mask,
                                            scale=scale, bias=relative[:, rel_index])
    print(f"B{B} H{H} Hkv{Hkv} Tq{Tq} Tk{Tk} D{D} bf16{' +bias' if bias is not None else ''}"
          f"{f' sdpa dropout {args.dropout}' if args.dropout else ''}: fwd / fwd+bwd ms, max |out - eager fp32|"
          f"{' (sdpa-bool: dropout, so not comparable)' if args.dropout else ''}")
    for name, fn in variants.items():
        try:
            out = fn()
            expected = {"flex-span": span_reference, "flex-relbias": relbias_reference}.get(name, reference)
            error = (out.float() - expected).abs().max().item()
            forward = cuda_ms(lambda: fn())
            both = cuda_ms(lambda: fn().backward(grad))
            print(f"  {name:13s} {forward:7.3f} {both:7.3f}   {error:.3g}")
        except Exception as exc:  # a variant that fails to compile is a row, not the end
            print(f"  {name:13s} failed: {type(exc).__name__}: {str(exc)[:200]}")
        q.grad = k.grad = v.grad = None
        relative.grad = None
        if bias is not None:
            bias.grad = None


if __name__ == "__main__":
    main()
