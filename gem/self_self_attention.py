"""GEM's self-self attention (Bousselham et al., CVPR 2024, eqs. 3-5).

For each of q, k and v (per head) the tokens attend to themselves by cosine similarity:

    x <- softmax(t * n(x) n(x)^T) n(x)        repeated ``iters`` times (the clustering)
    a_x = softmax(t * n(x) n(x)^T)             with x the clustered tokens
    out = (a_q v + a_k v + a_v v) / 3          the assignment applied to v

where n() is L2 normalisation over the head dimension and t an inverse temperature
(a scalar, or one value per image). Two implementations: ``self_self_attention`` runs the
three branches as one batched ``scaled_dot_product_attention`` call with t folded into the
query, so no N x N matrix is kept; ``self_self_attention_naive`` writes the matrices out and
is the plain reference the fast one is tested and benchmarked against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def adaptive_inverse_temperature(tokens: Tensor, head_dim: int) -> Tensor:
    """Per-image inverse temperature: mean token L2 norm times head_dim^-0.5.

    ``tokens`` is the block's ln_1 output, shape (B, N, C); the result has shape (B, 1, 1, 1)
    so that it broadcasts over (B, heads, N, N) similarities.
    """
    mean_norm = tokens.float().norm(dim=-1).mean(dim=-1)
    return (mean_norm * head_dim ** -0.5).to(tokens.dtype).view(-1, 1, 1, 1)


def _as_batched_temperature(inv_temp: Tensor | float, batch: int, like: Tensor) -> Tensor:
    if not torch.is_tensor(inv_temp):
        inv_temp = torch.tensor(float(inv_temp))
    return inv_temp.to(device=like.device, dtype=like.dtype).reshape(-1, 1, 1, 1).expand(batch, 1, 1, 1)


def self_self_attention(q: Tensor, k: Tensor, v: Tensor, inv_temp: Tensor | float, iters: int) -> Tensor:
    """Fast path. q, k, v: (B, H, N, D). Returns (B, H, N, D)."""
    batch = q.shape[0]
    t = _as_batched_temperature(inv_temp, batch, q).repeat(3, 1, 1, 1)
    x = torch.cat((q, k, v), dim=0)  # the three branches batched: (3B, H, N, D)
    for _ in range(iters):
        x = F.normalize(x, dim=-1)
        x = F.scaled_dot_product_attention(x * t, x, x, scale=1.0)
    x = F.normalize(x, dim=-1)
    assigned = F.scaled_dot_product_attention(x * t, x, v.repeat(3, 1, 1, 1), scale=1.0)
    return assigned.view(3, *q.shape).mean(dim=0)


def self_self_attention_naive(q: Tensor, k: Tensor, v: Tensor, inv_temp: Tensor | float, iters: int) -> Tensor:
    """Reference path with explicit N x N attention matrices, written straight from the equations."""
    t = _as_batched_temperature(inv_temp, q.shape[0], q)
    branches = [q, k, v]
    for _ in range(iters):
        branches = [F.normalize(x, dim=-1) for x in branches]
        branches = [torch.softmax(t * (x @ x.transpose(-2, -1)), dim=-1) @ x for x in branches]
    branches = [F.normalize(x, dim=-1) for x in branches]
    out = sum(torch.softmax(t * (x @ x.transpose(-2, -1)), dim=-1) @ v for x in branches)
    return out / 3
