"""Causal attention of a batch of variable-length query chunks over their paged KV caches.

Each request b contributes q_len[b] new query rows (1 for decode, a chunk for prefill) whose K/V are
already stored; its cache holds kv_len[b] tokens in the pages block_tables[b]. Query row i of b sees
cache entries j <= kv_len[b] - q_len[b] + i (cache order, so this stays right after compression).
"""

import torch


def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        block_tables: torch.Tensor, query_start_loc: torch.Tensor, kv_lens: torch.Tensor,
                        scale: float) -> torch.Tensor:
    """q: [T, H_q, D]; caches: [num_blocks, block_size, H_kv, D]; block_tables: [B, max_blocks] (int);
    query_start_loc: [B+1]; kv_lens: [B]. Returns [T, H_q, D] in q's dtype. Math in fp32."""
    T, h_q, d = q.shape
    bs, h_kv = k_cache.shape[1], k_cache.shape[2]
    group = h_q // h_kv
    out = torch.empty_like(q)
    starts, lens = query_start_loc.tolist(), kv_lens.tolist()
    q_lens = [starts[b + 1] - starts[b] for b in range(len(lens))]
    decode = [b for b in range(len(lens)) if q_lens[b] == 1]
    # Decode rows are batched (padded to the longest context); prefill chunks run one by one.
    if decode:
        idx = torch.tensor(decode, device=q.device)
        max_kv = max(lens[b] for b in decode)
        nblk = -(-max_kv // bs)
        pages = block_tables[idx, :nblk].long()
        k = k_cache[pages].reshape(len(decode), nblk * bs, h_kv, d).float()
        v = v_cache[pages].reshape(len(decode), nblk * bs, h_kv, d).float()
        rows = query_start_loc[idx].long()
        qd = q[rows].float().view(len(decode), h_kv, group, d)
        s = torch.einsum("bhgd,bkhd->bhgk", qd, k) * scale
        valid = torch.arange(nblk * bs, device=q.device)[None, :] < kv_lens[idx][:, None]
        s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
        v = v.masked_fill(~valid[:, :, None, None], 0.0)  # stale slots may hold anything, even NaN
        o = torch.einsum("bhgk,bkhd->bhgd", s.softmax(-1), v)
        out[rows] = o.reshape(len(decode), h_q, d).to(q.dtype)
    for b in range(len(lens)):
        if q_lens[b] == 1 or q_lens[b] == 0:
            continue
        n, kv = q_lens[b], lens[b]
        pages = block_tables[b, : -(-kv // bs)].long()
        k = k_cache[pages].reshape(-1, h_kv, d)[:kv].float()
        v = v_cache[pages].reshape(-1, h_kv, d)[:kv].float()
        qb = q[starts[b] : starts[b + 1]].float().view(n, h_kv, group, d)
        s = torch.einsum("qhgd,khd->hgqk", qb, k) * scale
        visible = torch.arange(kv, device=q.device)[None, :] <= (kv - n + torch.arange(n, device=q.device))[:, None]
        s = s.masked_fill(~visible, float("-inf"))
        o = torch.einsum("hgqk,khd->qhgd", s.softmax(-1), v)
        out[starts[b] : starts[b + 1]] = o.reshape(n, h_q, d).to(q.dtype)
    return out
