"""A dense, deliberately plain implementation of the Compressed PagedAttention policy: the test oracle.

No pages, no chunking, no batching, no shared code with the engine: transformers' own modules supply
the weights, norms, projections, RoPE tables and MLPs; this file keeps one request's K/V per layer as
dense [N, H_kv, D] tensors, scores them with explicit loops and masks, and keeps exactly the same
entries the policy says (see kernels/compress.py for the policy's statement). Greedy decoding only.
"""

from __future__ import annotations

import math

import torch


def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class DenseCompressedReference:
    """recall_pages (issue 27, the policy the engine matches): what a compression evicts is not lost but
    stored, per layer and KV head, in pages of block_size entries (positions, K, V, global scores) with the
    per-channel min and max of their keys. Evicted entries fill the open page first, in position order; a
    full page closes. At each compression the recall_pages closed pages whose bound on q.k over the window
    queries (Quest's: sum over channels of max(q * min, q * max), the max over the window's queries of the
    head's group) is highest (ties: the later closed) join the candidates, in position order, and are scored
    with the resident entries by the same policy; what is not kept is stored again. At most host_pages
    closed pages are kept per layer and head (None: no limit); beyond that the oldest is dropped, as
    today's permanent eviction. recall_pages=0 is the policy without recall.

    Only full pages are recalled, so every layer and head has the same number of candidates (each evicts
    the same number of entries at each compression).

    query_pages (per-step recall, a study of what issue 27's query-time trigger could buy; not in the engine):
    every decode step's attention also sees, per layer and KV head, the query_pages stored closed pages of
    highest bound for a decode step's own query (the max over the head's group), without their joining
    the cache or the scores. query_lag 0: chosen by this step's query (an ideal recall that lands at once);
    1: chosen by the previous step's query (a recall decided at the end of a step and landed before the
    next). Extra pages beyond the budget: an upper bound on the accuracy such a recall can reach.
    query_newest_of > query_pages: the query_pages newest (by last position) of the query_newest_of pages
    of highest bound, so that of several writes the query matches alike the latest wins."""

    def __init__(self, path: str, block_size: int, budget_blocks: int | None, ccfg, recall_pages: int = 0,
                 host_pages: int | None = None, query_pages: int = 0, query_lag: int = 0, query_newest_of: int = 0):
        from transformers import AutoModelForCausalLM

        self.hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        c = self.hf.config
        self.n_heads, self.n_kv = c.num_attention_heads, c.num_key_value_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.bs, self.budget, self.c = block_size, budget_blocks, ccfg
        self.recall_pages, self.host_pages = recall_pages, host_pages
        self.query_pages, self.query_lag, self.query_newest_of = query_pages, query_lag, query_newest_of
        self.kept_log = []  # per compression: [layer][head] -> list of original token positions kept
        self.recalled_log = []  # per compression: [layer][head] -> positions of the recalled candidates
        self.dropped_pages = 0  # stored pages dropped for host_pages (per layer and head, summed)

    # ---- recall of evicted entries -----------------------------------------------------------------
    def _bound(self, qs, h, page) -> float:
        """Quest's upper bound of q.k over the page's keys, for the window queries of KV head h's group."""
        group = self.n_heads // self.n_kv
        q = qs[:, h * group: (h + 1) * group].reshape(-1, self.head_dim)
        return torch.maximum(q * page["kmin"], q * page["kmax"]).sum(-1).max().item()

    def _best_pages(self, pages, qs, h, n) -> list[int]:
        """Indices of the n pages of highest bound for qs (ties: the later closed), best first."""
        bounds = [self._bound(qs, h, p) for p in pages]
        return sorted(range(len(pages)), key=lambda i: (-bounds[i], -i))[:n]

    def _candidates(self, store, qs, K, V, pos, G, n_prev):
        """One layer's candidates, per KV head: its resident entries and those of its recall_pages closed
        pages of highest bound (ties: the later closed), merged in position order. Returns K, V [N', H, D],
        positions per head, G [H, n_scored'] (or None) and the recalled positions per head. n_prev: the
        leading entries kept by the last compression (0 before the first)."""
        Ks, Vs, Ps, Gs, recalled = [], [], [], [], []
        for h in range(self.n_kv):
            pages = store[h]["closed"]
            best = self._best_pages(pages, qs, h, self.recall_pages)
            chosen = [pages[i] for i in sorted(best)]
            store[h]["closed"] = [p for i, p in enumerate(pages) if i not in best]
            r_pos = torch.cat([p["pos"] for p in chosen]) if chosen else torch.empty(0, dtype=torch.long)
            recalled.append(sorted(r_pos.tolist()))
            # Scored entries (kept by earlier compressions, or recalled) lead; entries since the last
            # compression are newer than anything ever stored, so they stay the tail.
            tail = pos[h][n_prev:]
            assert not len(r_pos) or not len(tail) or r_pos.max() < tail.min()
            head_pos = torch.cat([pos[h][:n_prev], r_pos])
            order = torch.argsort(head_pos, stable=True)
            k = torch.cat([K[:n_prev, h]] + [p["k"] for p in chosen])[order]
            v = torch.cat([V[:n_prev, h]] + [p["v"] for p in chosen])[order]
            Ks.append(torch.cat([k, K[n_prev:, h]]))
            Vs.append(torch.cat([v, V[n_prev:, h]]))
            Ps.append(torch.cat([head_pos[order], tail]))
            if G is not None:
                Gs.append(torch.cat([G[h]] + [p["g"] for p in chosen])[order])
        G_new = torch.stack(Gs) if G is not None else None
        return torch.stack(Ks, 1), torch.stack(Vs, 1), Ps, G_new, recalled

    def _pages_for(self, store_h, q, h):
        """K, V and first positions of KV head h's query_pages closed pages of highest bound for the step's
        queries q [1, H_q, D] (None: none)."""
        pages = store_h["closed"]
        if not pages:
            return None
        best = self._best_pages(pages, q, h, max(self.query_pages, self.query_newest_of))
        if self.query_newest_of > self.query_pages:
            best = sorted(best, key=lambda i: -int(pages[i]["pos"][-1]))[: self.query_pages]
        return (torch.cat([pages[i]["k"] for i in best]), torch.cat([pages[i]["v"] for i in best]),
                {int(pages[i]["pos"][0]) for i in best})

    def _store(self, store, K, V, pos, G, keeps):
        """Store what one layer's compression did not keep, per KV head, in position order: the open page
        first, then new pages of block_size entries (the last one left open); drop the oldest closed pages
        beyond host_pages."""
        for h in range(self.n_kv):
            kept = set(keeps[h])
            gone = [j for j in range(K.shape[0]) if j not in kept]
            for j in gone:
                page = store[h]["open"]
                if page is None:
                    page = store[h]["open"] = {"pos": [], "k": [], "v": [], "g": []}
                page["pos"].append(int(pos[h][j]))
                page["k"].append(K[j, h])
                page["v"].append(V[j, h])
                page["g"].append(G[h][j] if G is not None else None)
                if len(page["pos"]) == self.bs:
                    k = torch.stack(page["k"])
                    store[h]["closed"].append({"pos": torch.tensor(page["pos"]), "k": k, "v": torch.stack(page["v"]),
                                               "kmin": k.amin(0), "kmax": k.amax(0),
                                               "g": torch.stack(page["g"]) if G is not None else None})
                    store[h]["open"] = None
            while self.host_pages is not None and len(store[h]["closed"]) > self.host_pages:
                store[h]["closed"].pop(0)
                self.dropped_pages += 1

    # ---- scoring, written out loop by loop ---------------------------------------------------
    def _scores(self, qs, K, G_prev, first, keep):
        """qs: [Q, H_q, D] window queries (last Q entries); K: [N, H_kv, D]; G_prev: [H_kv, n_prev] or None;
        keep: entries this compression keeps. Returns S [H_kv, N], G [H_kv, N]."""
        c, N, Q = self.c, K.shape[0], qs.shape[0]
        # Protected head: num_sink_tokens, or the prompt up to prompt_fraction of what is kept (the earliest
        # entries are the prompt's: kept entries stay in order), never crowding out the query window.
        sinks = max(c.num_sink_tokens, min(self.prompt_len, math.floor(c.prompt_fraction * keep), max(0, keep - Q)))
        # Protected tail: the query window; or recent_window; or recent_fraction of what is kept, whichever
        # is longest, but never crowding out the sinks.
        recent = max(c.recent_window, math.floor(c.recent_fraction * keep))
        recent = min(recent, keep - sinks)
        tail = max(Q, recent)
        group = self.n_heads // self.n_kv
        S = torch.empty(self.n_kv, N)
        G = torch.empty(self.n_kv, N)
        for h in range(self.n_kv):
            A = torch.zeros(N)
            for i in range(Q):
                visible = N - Q + i + 1
                best = torch.full((visible,), -1.0)
                for g in range(group):
                    logits = (K[:visible, h] @ qs[i, h * group + g]) / math.sqrt(self.head_dim)
                    best = torch.maximum(best, torch.softmax(logits, 0))
                A[:visible] += best
            A /= Q
            g_h = A.clone()
            if c.use_global_score and G_prev is not None:
                n_prev = G_prev.shape[1]
                g_h[:n_prev] = torch.maximum(A[:n_prev], c.score_decay * G_prev[h])
            G[h] = g_h
            s = g_h.clone()
            if c.use_pooling and (first or c.continuous_pooling):
                w = c.pooling_width // 2
                s = torch.stack([g_h[max(0, j - w): j + w + 1].max() for j in range(N)])
            if c.use_redundancy:
                kn = K[:, h] / K[:, h].norm(dim=-1, keepdim=True).clamp(min=1e-6)
                sim = kn @ kn.T
                same_scope = torch.ones(N, N, dtype=torch.bool)
                if c.lightning_redundancy:
                    page = torch.arange(N) // self.bs
                    same_scope = page[:, None] == page[None, :]
                r = torch.zeros(N)
                for n in range(N):
                    latest = None
                    for m in range(N):
                        if m != n and same_scope[m, n] and sim[m, n] > c.redundancy_threshold:
                            latest = m
                    for m in range(N):
                        if m != n and same_scope[m, n] and m != latest:
                            r[m] += sim[m, n]
                norm = self.bs if c.lightning_redundancy else N
                R = torch.softmax(r / (c.redundancy_temperature * norm), 0)
                s = c.redundancy_lambda * s - (1 - c.redundancy_lambda) * R
            s[:sinks] = float("inf")
            s[max(0, N - tail):] = float("inf")
            S[h] = s
        return S, G

    @staticmethod
    def _keep(scores, k):
        """Top k by score; ties to the later entry; returned in original order."""
        n = len(scores)
        order = sorted(range(n), key=lambda j: (-scores[j].item(), -j))
        return sorted(order[:k])

    # ---- the model, one request --------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompt: list[int], max_tokens: int, stop_token: int | None = None) -> list[int]:
        model = self.hf.model
        L = len(model.layers)
        K = [torch.empty(0, self.n_kv, self.head_dim) for _ in range(L)]
        V = [torch.empty(0, self.n_kv, self.head_dim) for _ in range(L)]
        pos_of = [[torch.empty(0, dtype=torch.long) for _ in range(self.n_kv)] for _ in range(L)]  # provenance
        Gs = [None] * L
        queries = [[] for _ in range(L)]  # post-RoPE queries of every token, in order
        n_compressions = 0
        # [layer][head] -> {"closed": full pages, oldest first; "open": the page being filled, or None}
        stores = [[{"closed": [], "open": None} for _ in range(self.n_kv)] for _ in range(L)]
        self.stores = stores  # (the last request's, for tests)
        self.query_selections = self.query_page_loads = 0  # last request: per-step choices, pages new to them
        tokens, out = list(prompt), []
        self.prompt_len = len(prompt)
        todo = list(prompt)
        lagged = [[None] * self.n_kv for _ in range(L)]  # query_lag 1: pages the last step's query chose
        last_chosen = [[set() for _ in range(self.n_kv)] for _ in range(L)]
        group = self.n_heads // self.n_kv
        while True:
            start = len(tokens) - len(todo)
            positions = torch.arange(start, len(tokens))
            h = model.embed_tokens(torch.tensor([todo]))
            cos, sin = model.rotary_emb(h, positions[None])
            for li, layer in enumerate(model.layers):
                attn = layer.self_attn
                x = layer.input_layernorm(h)[0]
                T = x.shape[0]
                q = attn.q_proj(x).view(T, self.n_heads, self.head_dim)
                k = attn.k_proj(x).view(T, self.n_kv, self.head_dim)
                v = attn.v_proj(x).view(T, self.n_kv, self.head_dim)
                if hasattr(attn, "q_norm"):
                    q, k = attn.q_norm(q), attn.k_norm(k)
                cs, sn = cos[0][:, None, :], sin[0][:, None, :]
                q = q * cs + _rotate_half(q) * sn
                k = k * cs + _rotate_half(k) * sn
                queries[li].extend(q)
                N0 = K[li].shape[0]
                K[li] = torch.cat([K[li], k])
                V[li] = torch.cat([V[li], v])
                for hh in range(self.n_kv):
                    pos_of[li][hh] = torch.cat([pos_of[li][hh], positions])
                o = torch.empty(T, self.n_heads, self.head_dim)
                if T == 1 and self.query_pages:  # a decode step with per-step recall: resident + chosen pages
                    for hk in range(self.n_kv):
                        qg = q[0, hk * group: (hk + 1) * group]
                        chosen = self._pages_for(stores[li][hk], q, hk)
                        now = chosen[2] if chosen is not None else set()
                        self.query_selections += 1  # what a recall would move: pages not chosen last step
                        self.query_page_loads += len(now - last_chosen[li][hk])
                        last_chosen[li][hk] = now
                        if self.query_lag:
                            chosen, lagged[li][hk] = lagged[li][hk], chosen
                        k_all, v_all = K[li][:, hk], V[li][:, hk]
                        if chosen is not None:
                            k_all, v_all = torch.cat([chosen[0], k_all]), torch.cat([chosen[1], v_all])
                        o[0, hk * group: (hk + 1) * group] = torch.softmax(qg @ k_all.T / math.sqrt(self.head_dim), -1) @ v_all
                else:
                    for t in range(T):
                        visible = N0 + t + 1
                        for hq in range(self.n_heads):
                            hk = hq // (self.n_heads // self.n_kv)
                            w = torch.softmax(K[li][:visible, hk] @ q[t, hq] / math.sqrt(self.head_dim), 0)
                            o[t, hq] = w @ V[li][:visible, hk]
                a = attn.o_proj(o.reshape(T, -1))
                h = h + a[None]
                h = h + layer.mlp(layer.post_attention_layernorm(h))
            logits = self.hf.lm_head(model.norm(h))[0, -1]
            nxt = int(logits.argmax())
            out.append(nxt)
            tokens.append(nxt)
            if len(out) == max_tokens or nxt == stop_token:
                self.resident = [[pos_of[li][hh].tolist() for hh in range(self.n_kv)] for li in range(L)]
                return out
            # Compression point: cache reached budget + 1 full pages (or a long prompt ended).
            N = K[0].shape[0]
            if self.budget is not None and N >= (self.budget + 1) * self.bs:
                keep_n = self.budget * self.bs
                Q = self.c.query_window
                log, recalled_log = [], []
                for li in range(L):
                    qs = torch.stack(queries[li][-Q:])
                    G_prev = Gs[li]
                    if self.recall_pages:
                        K[li], V[li], pos_of[li], G_prev, recalled = self._candidates(
                            stores[li], qs, K[li], V[li], pos_of[li], G_prev, keep_n if n_compressions else 0)
                        recalled_log.append(recalled)
                    S, G = self._scores(qs, K[li], G_prev, n_compressions == 0, keep_n)
                    keeps = [self._keep(S[hh], keep_n) for hh in range(self.n_kv)]
                    if self.recall_pages or self.query_pages:
                        self._store(stores[li], K[li], V[li], pos_of[li], G if self.c.use_global_score else None, keeps)
                    K[li] = torch.stack([K[li][keeps[hh], hh] for hh in range(self.n_kv)], dim=1)
                    V[li] = torch.stack([V[li][keeps[hh], hh] for hh in range(self.n_kv)], dim=1)
                    Gs[li] = torch.stack([G[hh][keeps[hh]] for hh in range(self.n_kv)]) if self.c.use_global_score else None
                    for hh in range(self.n_kv):
                        pos_of[li][hh] = pos_of[li][hh][keeps[hh]]
                    log.append([pos_of[li][hh].tolist() for hh in range(self.n_kv)])
                self.kept_log.append(log)
                if self.recall_pages:
                    self.recalled_log.append(recalled_log)
                n_compressions += 1
            todo = [nxt]
