"""kNN memory: "Memorizing Transformers" (Wu et al., arXiv 2203.08913), with the read/write
framing of "Neural Turing Machines" (Graves et al., arXiv 1410.5401).

A kNN layer's queries attend, besides their local context, to the top-k keys/values retrieved
from an external store of this layer's past keys and values for the same stream. Reading:
queries and stored keys are L2-normalised (inner-product search), as in the paper, so stale
memories stay comparable; the retrieved logits are the layer's scaled query times the unit
key; memories have no position (the unrotated queries score them). The two results are
combined by a learned per-head gate (the paper) or by one joint softmax over local and
retrieved keys. Writing: when a segment completes, the layer's keys and values of that
segment are written, detached; the store is not differentiable, and gradients reach the
queries through the attention over the retrieved pairs. The optional straight-through mode
(the programme's sketch) adds the query's gradient path to the retrieved keys and values:
k' = k + (q - sg(q)), v' = v + (q - sg(q)).

Departures from the paper:
- Normalisation: the paper normalises the kNN layer's queries and keys (QK-norm) so that stale
  memories stay comparable. Here the search and the stored keys are always unit, but the layer's
  own queries and local keys are normalised only where the model turns QK-norm on
  (`attention.qk_norm`, as every seed preset does). Without it (xl2-knn, xl4-xpos-knn,
  depth-xpos-knn) local attention is the model's ordinary scaled dot product and a retrieved
  pair scores scale * q . k_unit: its logits grow with |q| but never with a stale key's norm.
- A query that retrieves nothing (an empty store: a stream's first segment, or just after a
  reset) takes its local result alone. The paper's gate would still scale that result by
  (1 - g), an output the layer never sees while its store is full.
- Writes happen per completed segment (seq_len positions), so token-by-token generation reads
  exactly what segment-by-segment training reads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from memlm.nn.kernels import merge_partials


class KnnAttention(nn.Module):
    def __init__(self, heads: int, k: int, combine: str, straight_through: bool):
        super().__init__()
        self.k, self.combine, self.straight_through = k, combine, straight_through
        self.gate = nn.Parameter(torch.zeros(heads)) if combine == "gate" else None  # (H,) logits

    def read(self, store, q: torch.Tensor, scale: float, dropout_p: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of q (B, H, T, D) (unrotated, already scaled as the layer scales queries) over
        its retrieved pairs: (out (B, H, T, D), lse (B, H, T); -inf where nothing was retrieved)."""
        unit = F.normalize(q.float(), dim=-1)
        keys, values, _, valid = store.search(unit.detach(), self.k, dtype=q.dtype)  # (B, H, T, k, D), ..., (B, H, T, k)
        if self.straight_through:
            through = (unit - unit.detach()).to(q.dtype)[..., None, :]  # (B, H, T, 1, D)
            keys, values = keys + through, values + through
        scores = torch.einsum("bhtd,bhtkd->bhtk", q, keys).float() * scale
        scores = scores.masked_fill(~valid, float("-inf"))
        lse = scores.logsumexp(dim=-1)  # (B, H, T)
        probs = torch.nan_to_num((scores - lse[..., None]).exp()).to(values.dtype)  # 0 where nothing found
        if dropout_p > 0:
            probs = F.dropout(probs, dropout_p)
        return torch.einsum("bhtk,bhtkd->bhtd", probs, values), lse

    def forward(self, local: torch.Tensor, local_lse: torch.Tensor | None, store, q: torch.Tensor,
                scale: float, dropout_p: float) -> torch.Tensor:
        """Combine local attention (B, H, T, D) with attention over the retrieved memories."""
        memory, memory_lse = self.read(store, q, scale, dropout_p)
        if self.combine == "joint":
            return merge_partials(local, local_lse, memory, memory_lse)[0]
        gate = torch.sigmoid(self.gate).to(local.dtype)[None, :, None, None]  # (1, H, 1, 1)
        gate = gate * memory_lse.isfinite()[..., None]  # (B, H, T, 1): closed where nothing was retrieved
        return gate * memory + (1 - gate) * local


def write_segment(block, store, inputs: torch.Tensor, start: int) -> None:
    """Write the keys/values of a completed segment of the layer `block` (its inputs (B, T, W), at
    stream positions start..start+T-1) into the store, detached."""
    with torch.no_grad():
        h = block.attn_norm(inputs) if block.pre_norm else inputs
        k, v = block.attention.project_kv(h)  # (B, Hkv, T, D), unrotated
        positions = torch.arange(start, start + inputs.shape[1], device=inputs.device)
        store.write(F.normalize(k.float(), dim=-1), v.float(), positions)
