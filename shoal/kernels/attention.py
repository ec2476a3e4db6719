"""Grouped-query attention over a KV cache (prefill and incremental decode) with torch SDPA.

Tensors are ``[batch, heads, time, head_dim]``. Queries have ``n_heads``; keys and values
``n_kv_heads``, a divisor of ``n_heads``. Query ``i`` sits at absolute position
``start + i`` and sees every key at a position ``<= start + i`` (and, with a sliding
``window``, ``> start + i - window``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_CHUNK = 256  # cache capacity grows in multiples of this many positions


class KVCache:
    """Keys and values of one attention layer for one session, grown in chunks.

    ``length`` positions are valid. :meth:`update` writes new keys/values at ``start``:
    writing below ``length`` drops what came after (rewind, e.g. to replay a session).
    """

    def __init__(
        self,
        *,
        batch: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (batch, n_kv_heads, 0, head_dim)
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    def update(
        self, keys: torch.Tensor, values: torch.Tensor, start: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``keys``/``values`` at positions ``start..`` and return all valid ones."""
        if not 0 <= start <= self.length:
            raise ValueError(f"cannot write at position {start}: the cache holds {self.length}")
        end = start + keys.shape[2]
        if end > self.capacity:
            grown = -(-end // _CHUNK) * _CHUNK
            self.keys = _grow(self.keys, grown, self.length)
            self.values = _grow(self.values, grown, self.length)
        self.keys[:, :, start:end] = keys
        self.values[:, :, start:end] = values
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def nbytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() * 2


def _grow(t: torch.Tensor, capacity: int, keep: int) -> torch.Tensor:
    out = t.new_empty((*t.shape[:2], capacity, t.shape[3]))
    out[:, :, :keep] = t[:, :, :keep]
    return out


def attention_mask(
    n_queries: int, n_keys: int, start: int, window: int | None, device: torch.device
) -> torch.Tensor:
    """Boolean ``[n_queries, n_keys]`` mask, True where a query may attend to a key."""
    q_pos = torch.arange(start, start + n_queries, device=device)[:, None]
    k_pos = torch.arange(n_keys, device=device)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    return allowed


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    start: int,
    window: int | None = None,
) -> torch.Tensor:
    """Causal GQA with SDPA; ``k``/``v`` hold every position from 0 (cache included)."""
    n_q, n_k = q.shape[2], k.shape[2]
    groups = q.shape[1] // k.shape[1]
    windowed = window is not None and n_k > window
    if n_q == 1 and not windowed:
        # one query sees every key; the `groups` query heads that share a kv head become
        # `groups` queries of that head, so the cache is never copied
        b, h, _, d = q.shape
        grouped = q.reshape(b, k.shape[1], groups, d)
        return F.scaled_dot_product_attention(grouped, k, v).reshape(b, h, 1, d)
    if groups > 1:
        # SDPA's enable_gqa falls back to the slow math kernel on CPU; expanding is cheaper
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    if start == 0 and n_q == n_k and not windowed:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    mask = attention_mask(n_q, n_k, start, window if windowed else None, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    start: int,
    window: int | None = None,
) -> torch.Tensor:
    """Plain-torch reference of :func:`attention`: explicit scores, mask and softmax in fp32."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1).float()
    v = v.repeat_interleave(groups, dim=1).float()
    scores = (q.float() @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    mask = attention_mask(q.shape[2], k.shape[2], start, window, q.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(dim=-1) @ v).to(q.dtype)
