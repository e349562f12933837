"""Compression scoring and selection for Compressed PagedAttention (plain-torch references).

For one request and a group of layers, every cached token gets a score per (layer, KV head), and the
best `keep` are kept, in their original order. All math is fp32. The pieces (each switchable):

  A  window attention: the post-RoPE queries of the last Q cache entries attend (causally) over the
     whole cache; softmax over tokens, max over the GQA group, mean over the window.
  G  decayed global score: max(A, decay * G_prev) for tokens that carry a score from an earlier
     compression, A for the rest. G (not pooled) is what moves with the kept tokens.
  P  max-pooling of G along the tokens (odd width, stride 1, same padding), by default only at a
     request's first compression.
  R  key redundancy (R-KV style): cosine similarity between keys; each key excuses its latest
     near-duplicate (similarity > threshold); r_m sums row m; R = softmax(r / (T * N)) over tokens,
     N = tokens (all pairs) or block_size ("lightning": pairs within one page only).
  S  = lam * P - (1 - lam) * R (or P without redundancy); the first `num_sink_tokens` entries and the
     window itself get +inf, so they are always kept.
"""

from __future__ import annotations

import torch

_REDUNDANCY_ROW_TILE = 1024  # rows of the similarity matrix per tile (bounds scratch to tile x N)


def window_attention_ref(q_win: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """q_win: [L, Q, H_q, D] queries of cache entries N-Q .. N-1; k: [L, N, H_kv, D].
    Returns A: [L, H_kv, N] fp32 (each row a mean of probability distributions)."""
    L, Q, h_q, d = q_win.shape
    N, h_kv = k.shape[1], k.shape[2]
    g = h_q // h_kv
    logits = torch.einsum("lqhgd,lnhd->lhgqn", q_win.float().view(L, Q, h_kv, g, d), k.float()) * scale
    q_idx = torch.arange(N - Q, N, device=k.device)
    causal = torch.arange(N, device=k.device)[None, :] <= q_idx[:, None]  # [Q, N]
    probs = logits.masked_fill(~causal, float("-inf")).softmax(-1)
    return probs.amax(dim=2).mean(dim=2)


def redundancy_ref(k: torch.Tensor, threshold: float, temperature: float, block_size: int | None) -> torch.Tensor:
    """k: [L, N, H_kv, D]. Returns R: [L, H_kv, N] fp32. block_size=None: all pairs; else within pages."""
    kn = torch.nn.functional.normalize(k.float(), dim=-1, eps=1e-6).permute(0, 2, 1, 3)  # [L, H, N, D]
    L, H, N, _ = kn.shape
    if block_size is not None:
        nb = -(-N // block_size)
        pad = nb * block_size - N
        kp = torch.nn.functional.pad(kn, (0, 0, 0, pad)).view(L, H, nb, block_size, -1)
        sim = kp @ kp.transpose(-1, -2)  # [L, H, nb, bs, bs]; padded keys have zero vectors -> sim 0
        r = _row_sums_excusing_latest(sim, threshold).reshape(L, H, nb * block_size)[..., :N]
        norm = block_size
    else:
        # Tile over rows m so scratch stays tile x N. Pass 1 finds, for every column n, the latest
        # m != n with sim > threshold; pass 2 sums rows and removes the excused entries.
        latest = torch.full((L, H, N), -1, dtype=torch.long, device=k.device)
        excused_val = torch.zeros(L, H, N, device=k.device)
        r = torch.empty(L, H, N, device=k.device)
        for m0 in range(0, N, _REDUNDANCY_ROW_TILE):
            rows = torch.arange(m0, min(N, m0 + _REDUNDANCY_ROW_TILE), device=k.device)
            sim = kn[:, :, rows] @ kn.transpose(-1, -2)  # [L, H, tile, N]
            sim[:, :, torch.arange(len(rows)), rows] = 0.0
            r[:, :, rows] = sim.sum(-1)
            hit = sim > threshold
            cand = torch.where(hit, rows[None, None, :, None], torch.full_like(hit, -1, dtype=torch.long)).amax(2)
            val = torch.where(hit, sim, torch.zeros_like(sim))
            take = cand > latest  # later rows win
            latest = torch.where(take, cand, latest)
            best_val = val.gather(2, (cand - m0).clamp(min=0).unsqueeze(2)).squeeze(2)
            excused_val = torch.where(take, best_val, excused_val)
            del sim, hit, val
        has = latest >= 0
        r.scatter_add_(2, latest.clamp(min=0), torch.where(has, -excused_val, torch.zeros_like(excused_val)))
        norm = N
    return (r / (temperature * norm)).softmax(-1)


def _row_sums_excusing_latest(sim: torch.Tensor, threshold: float) -> torch.Tensor:
    """sim: [..., n, n] with rows m, columns n. Zero the diagonal and, in each column, the entry of the
    latest row above threshold; return row sums [..., n]."""
    n = sim.shape[-1]
    eye = torch.eye(n, dtype=torch.bool, device=sim.device)
    sim = sim.masked_fill(eye, 0.0)
    rows = torch.arange(n, device=sim.device)[:, None].expand(n, n)
    latest = torch.where(sim > threshold, rows, torch.full_like(rows, -1)).amax(-2)  # [..., n] per column
    excuse = (rows == latest.unsqueeze(-2)) & (latest.unsqueeze(-2) >= 0)
    return sim.masked_fill(excuse, 0.0).sum(-1)


def max_pool_ref(x: torch.Tensor, width: int) -> torch.Tensor:
    """Max-pool [..., N] along the last axis, odd width, stride 1, same padding."""
    shape = x.shape
    y = torch.nn.functional.max_pool1d(x.reshape(-1, 1, shape[-1]), width, stride=1, padding=width // 2)
    return y.reshape(shape)


def compression_scores_ref(q_win: torch.Tensor, k: torch.Tensor, g_prev: torch.Tensor | None, num_prev: int,
                           first: bool, scale: float, cfg, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores for one request over a layer group.

    q_win: [L, Q, H_q, D]; k: [L, N, H_kv, D]; g_prev: [L, H_kv, num_prev] global scores carried by
    the first num_prev entries (None when off or at the first compression); cfg: CompressionConfig.
    Returns (S [L, H_kv, N] selection scores, G [L, H_kv, N] global scores to carry)."""
    N = k.shape[1]
    a = window_attention_ref(q_win, k, scale)
    g = a
    if cfg.use_global_score and g_prev is not None and num_prev > 0:
        g = a.clone()
        g[..., :num_prev] = torch.maximum(a[..., :num_prev], cfg.score_decay * g_prev.float())
    s = max_pool_ref(g, cfg.pooling_width) if cfg.use_pooling and (first or cfg.continuous_pooling) else g
    if cfg.use_redundancy:
        r = redundancy_ref(k, cfg.redundancy_threshold, cfg.redundancy_temperature,
                           block_size if cfg.lightning_redundancy else None)
        s = cfg.redundancy_lambda * s - (1 - cfg.redundancy_lambda) * r
    s = s.clone()
    if cfg.num_sink_tokens:
        s[..., : cfg.num_sink_tokens] = float("inf")
    s[..., N - q_win.shape[1] :] = float("inf")
    return s, g


def select_keep_ref(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the `keep` best tokens per (layer, head), in original order: [L, H_kv, keep].

    Ties (pooling makes them common) go to the later token, so selection is deterministic."""
    n = scores.shape[-1]
    order = scores.flip(-1).sort(dim=-1, descending=True, stable=True).indices[..., :keep]
    return (n - 1 - order).sort(dim=-1).values
