"""Baseline routing policies, for the simulator (scheduler/simulate.py), behind our policy's interface.

Every policy has `choose(req, workers) -> Decision` (req: a RouteRequest; workers: the router's view,
`WorkerState`s with its in-flight counts added) and may have hooks the simulator calls when a proxying
router would learn of them: `on_routed(req, worker_id, now)`, `on_first_token(req, worker_id, now)`,
`on_finished(req, worker_id, now)`. Requests in the simulator are `SimRouteRequest`s (a RouteRequest with
`rid` and `token_ids`). Every random choice comes from the policy's own seeded generator.

* `RoundRobinPolicy`: healthy workers in turn.
* `PowerOfTwoPolicy`: two distinct random workers, the one with the shorter queue
  (running + waiting + in_flight).
* `SGLangCacheAwarePolicy`: SGLang's cache_aware (sgl-router, defaults of its Python RouterArgs:
  cache_threshold 0.3, balance_abs_threshold 64, balance_rel_threshold 1.5). Its approximate radix
  tree is built from routing history, one tenant per worker, LRU-bounded per tenant. Deviation: the tree's
  units are page-hash prefixes (chained hashes of the prompt's full pages, plus one node for the last,
  partial page), not characters, so a node is a whole page. Load = the router's own count of requests
  it sent a worker that have not finished (it proxies the responses). Imbalanced
  ((max - min) > 64 and max > 1.5 x min): the least loaded worker. Else match rate = matched prompt
  tokens / prompt tokens; above 0.3, a worker owning the deepest matched node (SGLang takes the first
  owner in its map's order, an arbitrary one; here a random one); otherwise the worker with the smallest
  tree. The prompt is then inserted under the chosen worker.
* `RayPrefixAffinityPolicy`: Ray Serve's PrefixCacheAffinityRouter
  (ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router). The router class itself
  needs a running Serve deployment (replica wrappers, a detached tree actor, async probing), so this is
  a model of its `choose_replicas` logic driving Ray's *real* `PrefixTree` (the same character-level
  radix tree its actor wraps, imported from the installed Ray; each token id is one character).
  Queue lengths = running + waiting + in_flight. If max - min > imbalanced_threshold (10, the value of
  the issue and of Ray before PR #59390; the installed Ray 2.60 defaults to inf): power of two choices.
  Else match rate = matched characters / prompt characters; below match_rate_threshold (0.1) the
  tenants with the fewest stored characters, else the owners of the deepest matched node; among them the
  shortest queue. Only prompts are inserted (on_request_routed), never responses; no tree eviction
  (do_eviction defaults to False).
* `DynamoCostPolicy`: NVIDIA Dynamo's KV router cost (v0.4-0.9 docs):
  cost = overlap_score_weight x prefill_blocks + decode_blocks, lowest wins (router_temperature 0; ties
  drawn at random). prefill_blocks = (new prompt tokens after the worker's cached overlap + prompt tokens
  of the worker's active requests not yet past prefill) / block size; the overlap is the leading prompt
  pages in the worker's reported cache (Dynamo's indexer fed by KV events). decode_blocks = unique prompt
  blocks of the worker's active requests (the router's own slot bookkeeping, deduplicated by block hash)
  + the request's blocks not among them. Output blocks are not counted (newer Dynamo adds them as they
  are generated).
"""

from __future__ import annotations

import abc
import random
from collections import Counter, OrderedDict

import numpy as np

from zipserve.scheduler.policy import Decision, RouteRequest, WorkerState
from zipserve.workers.pages import hash_page


class RoutingPolicy(abc.ABC):
    """Interface every simulated policy implements (ours adapts to it in simulate.py)."""

    name = "policy"

    def __init__(self, seed: int | None = None):
        self.rng = random.Random(seed)

    @abc.abstractmethod
    def choose(self, req: RouteRequest, workers: list[WorkerState]) -> Decision:
        """The worker to send `req` to."""

    def on_routed(self, req, worker_id: str, now: float) -> None:
        pass

    def on_first_token(self, req, worker_id: str, now: float) -> None:
        pass

    def on_finished(self, req, worker_id: str, now: float) -> None:
        pass

    def _pick_min(self, items: list, key) -> object:
        best = min(key(x) for x in items)
        return self.rng.choice([x for x in items if key(x) == best])


def _key(req):
    """A request's identity between choose() and the hooks: its id in the simulator, else the object."""
    rid = getattr(req, "rid", -1)
    return rid if rid is not None and rid >= 0 else id(req)


def _healthy(workers: list[WorkerState]) -> list[WorkerState]:
    return [w for w in workers if w.healthy]


def queue_len(w: WorkerState) -> int:
    return w.running + w.waiting + w.in_flight


class RoundRobinPolicy(RoutingPolicy):
    name = "round_robin"

    def __init__(self, seed: int | None = None):
        super().__init__(seed)
        self.next = 0

    def choose(self, req, workers):
        ws = _healthy(workers)
        if not ws:
            return Decision(None)
        w = ws[self.next % len(ws)]
        self.next += 1
        return Decision(w.worker_id)


class PowerOfTwoPolicy(RoutingPolicy):
    name = "pow2"

    def choose(self, req, workers):
        ws = _healthy(workers)
        if not ws:
            return Decision(None)
        pair = self.rng.sample(ws, min(2, len(ws)))
        w = self._pick_min(pair, queue_len)
        return Decision(w.worker_id, cost=queue_len(w))


def prefix_nodes(req, block_size: int) -> list[tuple[object, int]]:
    """(key, tokens) of a prompt's page-hash prefix: its full pages, then its partial last page."""
    nodes = [(h, block_size) for h in req.page_hashes]
    tokens = getattr(req, "token_ids", None)
    n_full = len(req.page_hashes)
    tail = req.num_prompt_tokens - n_full * block_size
    if tail > 0:
        if tokens:
            key = hash_page(req.page_hashes[-1] if n_full else None, tokens[n_full * block_size:])
        else:  # no token ids: a partial page nobody else can match
            key = ("tail", id(req))
        nodes.append((key, tail))
    return nodes


class SGLangCacheAwarePolicy(RoutingPolicy):
    name = "sglang_cache_aware"

    def __init__(self, cache_threshold: float = 0.3, balance_abs_threshold: int = 64,
                 balance_rel_threshold: float = 1.5, max_tree_tokens: int = 2**26, seed: int | None = None):
        super().__init__(seed)
        self.cache_threshold = cache_threshold
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = balance_rel_threshold
        self.max_tree_tokens = max_tree_tokens
        self.nodes: dict = {}  # page-prefix key -> set of tenants holding it
        self.lru: dict[str, OrderedDict] = {}  # tenant -> key -> tokens (least recent first)
        self.size: Counter = Counter()  # tenant -> tokens in its tree
        self.load: Counter = Counter()  # tenant -> requests sent and not finished
        self.block_size: int | None = None
        self._pending: dict = {}

    def _ensure(self, workers):
        for w in workers:
            self.lru.setdefault(w.worker_id, OrderedDict())

    def choose(self, req, workers):
        ws = _healthy(workers)
        if not ws:
            return Decision(None)
        self._ensure(ws)
        ids = [w.worker_id for w in ws]
        loads = [self.load[i] for i in ids]
        hi, lo = max(loads), min(loads)
        self.block_size = ws[0].block_size
        nodes = prefix_nodes(req, self.block_size)
        if hi - lo > self.balance_abs_threshold and hi > self.balance_rel_threshold * lo:
            wid = self._pick_min(ids, lambda i: self.load[i])
        else:
            matched, owners = 0, None
            for key, n in nodes:
                holders = self.nodes.get(key)
                live = [i for i in ids if holders and i in holders]
                if not live:
                    break
                matched += n
                owners = live
            rate = matched / max(1, req.num_prompt_tokens)
            if owners and rate > self.cache_threshold:
                wid = self.rng.choice(owners)
            else:
                wid = self._pick_min(ids, lambda i: self.size[i])
        self._pending[_key(req)] = nodes
        return Decision(wid)

    def on_routed(self, req, worker_id, now):
        self.load[worker_id] += 1
        nodes = self._pending.pop(_key(req), None)
        if nodes is None:
            nodes = prefix_nodes(req, self.block_size)
        lru = self.lru.setdefault(worker_id, OrderedDict())
        for key, n in reversed(nodes):  # leaf first, so ancestors are more recent and evicted later
            holders = self.nodes.setdefault(key, set())
            if worker_id not in holders:
                holders.add(worker_id)
                self.size[worker_id] += n
                lru[key] = n
            lru.move_to_end(key)
        while self.size[worker_id] > self.max_tree_tokens and lru:
            key, n = lru.popitem(last=False)
            holders = self.nodes[key]
            holders.discard(worker_id)
            if not holders:
                del self.nodes[key]
            self.size[worker_id] -= n

    def on_finished(self, req, worker_id, now):
        self.load[worker_id] -= 1


def _ray_prefix_tree():
    """Ray's PrefixTree, with its shared-prefix count (os.path.commonprefix: a Python loop per character)
    replaced by an equivalent that compares slices (same result, much faster on long prompts)."""
    from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_tree import PrefixTree

    class _Tree(PrefixTree):
        @staticmethod
        def _shared_prefix_count(a: str, b: str) -> int:
            n = min(len(a), len(b))
            if a[:n] == b[:n]:
                return n
            lo, hi = 0, n - 1  # a[:lo] == b[:lo], a[:hi + 1] != b[:hi + 1]
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if a[:mid] == b[:mid]:
                    lo = mid
                else:
                    hi = mid - 1
            return lo

    return _Tree()


class RayPrefixAffinityPolicy(RoutingPolicy):
    name = "ray_prefix_affinity"

    def __init__(self, imbalanced_threshold: float = 10, match_rate_threshold: float = 0.1, seed: int | None = None):
        super().__init__(seed)
        self.imbalanced_threshold = imbalanced_threshold
        self.match_rate_threshold = match_rate_threshold
        self.tree = _ray_prefix_tree()
        self.clock = 0.0
        self._text: dict = {}

    @staticmethod
    def text(req) -> str:
        tokens = getattr(req, "token_ids", None)
        if tokens:  # one character per token id (ids below 0xD800 - 256 map to distinct, valid characters)
            return (np.asarray(tokens, dtype=np.uint32) + 256).tobytes().decode("utf-32-le")
        return "".join(chr(256 + (hash(h) & 0x7FFF)) for h in req.page_hashes)

    def choose(self, req, workers):
        ws = _healthy(workers)
        if not ws:
            return Decision(None)
        ids = [w.worker_id for w in ws]
        self.tree.add_tenants([i for i in ids if i not in self.tree.tenant_to_char_count], self.clock)
        q = {w.worker_id: queue_len(w) for w in ws}
        by_id = {w.worker_id: w for w in ws}
        candidates = None
        if max(q.values()) - min(q.values()) <= self.imbalanced_threshold:
            text = self._text[_key(req)] = self.text(req)
            matched, tenants = self.tree.prefix_match(text, ids)
            rate = len(matched) / len(text) if text else 0.0
            if rate < self.match_rate_threshold:
                candidates = [t for t in (self.tree.get_smallest_tenants() or []) if t in by_id]
            else:
                candidates = tenants
        if not candidates:  # imbalanced (or nothing matched): power of two choices
            candidates = self.rng.sample(ids, min(2, len(ids)))
        wid = self._pick_min(candidates, q.__getitem__)
        return Decision(wid, cost=q[wid])

    def on_routed(self, req, worker_id, now):
        self.clock = max(self.clock + 1e-6, now)
        text = self._text.pop(_key(req), None)
        self.tree.insert(text if text is not None else self.text(req), worker_id, self.clock)


class DynamoCostPolicy(RoutingPolicy):
    name = "dynamo_cost"

    def __init__(self, overlap_score_weight: float = 1.0, seed: int | None = None):
        super().__init__(seed)
        self.overlap_score_weight = overlap_score_weight
        self.blocks: dict[str, Counter] = {}  # worker -> active prompt block -> active requests holding it
        self.prefill: dict[str, int] = {}  # worker -> prompt tokens of its active requests before their first token
        self.active: dict = {}  # request key -> (worker, block keys, pending prefill tokens)
        self._chosen: dict = {}

    def choose(self, req, workers):
        ws = _healthy(workers)
        if not ws:
            return Decision(None)
        bs = ws[0].block_size
        keys = [k for k, _ in prefix_nodes(req, bs)]
        costs, hits = {}, {}
        for w in ws:
            overlap = w.hit_pages(req)
            new_tokens = max(0, req.num_prompt_tokens - overlap * bs)
            prefill_blocks = (new_tokens + self.prefill.get(w.worker_id, 0)) / bs
            active = self.blocks.get(w.worker_id, Counter())
            decode_blocks = len(active) + sum(1 for k in keys if k not in active)
            costs[w.worker_id] = self.overlap_score_weight * prefill_blocks + decode_blocks
            hits[w.worker_id] = overlap
        wid = self._pick_min(list(costs), costs.__getitem__)
        self._chosen[_key(req)] = (keys, {w: max(0, req.num_prompt_tokens - h * bs) for w, h in hits.items()})
        return Decision(wid, cost=costs[wid], hit_pages=hits[wid], costs=costs)

    def on_routed(self, req, worker_id, now):
        keys, new_tokens = self._chosen.pop(_key(req))
        c = self.blocks.setdefault(worker_id, Counter())
        c.update(keys)
        self.prefill[worker_id] = self.prefill.get(worker_id, 0) + new_tokens[worker_id]
        self.active[_key(req)] = [worker_id, keys, new_tokens[worker_id]]

    def on_first_token(self, req, worker_id, now):
        a = self.active[_key(req)]
        self.prefill[worker_id] -= a[2]
        a[2] = 0

    def on_finished(self, req, worker_id, now):
        worker_id, keys, pending = self.active.pop(_key(req))
        self.prefill[worker_id] -= pending
        c = self.blocks[worker_id]
        c.subtract(keys)
        for k in keys:
            if c[k] <= 0:
                del c[k]


BASELINES = {p.name: p for p in (RoundRobinPolicy, PowerOfTwoPolicy, SGLangCacheAwarePolicy, RayPrefixAffinityPolicy,
                                 DynamoCostPolicy)}
