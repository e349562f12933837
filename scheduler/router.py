"""The Ray Serve request router that applies `CapacityAffinityPolicy` (scheduler/policy.py).

Workers publish their state through Serve's `record_routing_stats` (the controller polls it every
`request_routing_stats_period_s`, 0.1 s in our configs, and pushes it to every router): pages, slots,
queue and the hashes of the pages they hold, generated pages included. Every ingress replica's router
therefore builds the same prefix index from what the workers say, with no central actor on the
request path. Capacity also rides back on the first and last chunk of each response (admission and
finish are the big changes); the ingress posts it to `scheduler/state_board.py` and the router lays the
newer of the two over the report. The router adds its own in-flight requests (sent after the worker's last
polled report, not yet finished) so a burst does not pile onto one stale "free" worker, and the requests it has
chosen a replica for but Serve has not yet handed over (a burst is routed by many concurrent decisions, each
of which would otherwise see the same state and herd onto the same replica).

A request carries its routing facts as a `RouteRequest` (or the dict form `route_request_to_dict`
makes) in the keyword argument `route`, or as the first positional argument. Requests without
routing facts (health checks, admin calls) go to the replica with the fewest in-flight requests. A call
pinned to one replica (`route={"replica": unique id}`: an ingress's multiplexed stream from that worker,
cluster/channel.py) goes there or, while that replica is not among the candidates, nowhere.
"""

from __future__ import annotations

import time
from typing import Any

from ray.util import metrics
from ray.serve.request_router import FIFOMixin, PendingRequest, ReplicaID, RequestRouter, RunningReplica

from zipserve.scheduler import state_board
from zipserve.scheduler.policy import CapacityAffinityPolicy, RouteRequest, WorkerState

CHOSEN_TTL_S = 5.0  # a decision Serve never acted on (request cancelled while routing) stops counting


def route_request_to_dict(req: RouteRequest) -> dict:
    return {"num_prompt_tokens": req.num_prompt_tokens, "page_hashes": [h.hex() for h in req.page_hashes],
            "max_tokens": req.max_tokens, "budget_blocks": req.budget_blocks}


def route_request_from(obj: Any) -> RouteRequest | None:
    if isinstance(obj, RouteRequest):
        return obj
    if isinstance(obj, dict) and "num_prompt_tokens" in obj:
        hashes = tuple(bytes.fromhex(h) if isinstance(h, str) else h for h in obj.get("page_hashes", ()))
        return RouteRequest(int(obj["num_prompt_tokens"]), hashes, int(obj.get("max_tokens", 256)),
                            obj.get("budget_blocks"))
    return None


def worker_state_from_stats(worker_id: str, stats: dict | None) -> WorkerState | None:
    """The policy's view of a replica's last report (None before its first one)."""
    if not stats or "total_pages" not in stats:
        return None
    return WorkerState(
        worker_id=worker_id, block_size=stats["block_size"], total_pages=stats["total_pages"],
        free_pages=stats["free_pages"], max_slots=stats["max_slots"], running=stats.get("running", 0),
        waiting=stats.get("waiting", 0), budget_blocks=stats.get("budget_blocks"),
        cached=_hashes(stats, "cached"), unheld=_hashes(stats, "unheld"), held_once=_hashes(stats, "held_once"),
        healthy=stats.get("healthy", True), timestamp=stats.get("timestamp", 0.0))


def _hashes(stats: dict, key: str) -> frozenset:
    return frozenset(bytes.fromhex(h) for h in stats.get(key, ()))


class CapacityAffinityRouter(FIFOMixin, RequestRouter):
    def initialize_state(self, prefill_tokens_per_s: float = 20000.0, mean_service_s: float = 60.0,
                         balance_s: float = 1.0, seed: int | None = None):
        self.policy = CapacityAffinityPolicy(prefill_tokens_per_s, mean_service_s, balance_s, seed=seed)
        # replica -> {internal request id: (time sent, pages it will need)}
        self.sent: dict[ReplicaID, dict[str, tuple[float, int]]] = {}
        # internal request id -> (replica chosen, time, pages): decided, not yet routed (on_request_routed)
        self.chosen: dict[str, tuple[ReplicaID, float, int]] = {}
        self.last_decision = None
        self._decisions = metrics.Counter("zipserve_router_decisions_total", "routing decisions by reason",
                                          tag_keys=("reason",))

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        pinned = self._pinned(pending_request)
        if pinned is not None:
            match = [r for r in candidate_replicas if r.replica_id.unique_id == pinned]
            return [match] if match else []
        req = self._route_of(pending_request)
        by_id = {str(r.replica_id): r for r in candidate_replicas}
        states = []
        now = time.time()
        self.chosen = {k: v for k, v in self.chosen.items() if now - v[1] < CHOSEN_TTL_S}
        own = pending_request.metadata.internal_request_id if pending_request is not None else None
        for r in candidate_replicas:
            st = worker_state_from_stats(str(r.replica_id), state_board.overlay(r.replica_id.unique_id,
                                                                                r.routing_stats))
            if st is None:
                continue
            # In flight = sent after the *polled* report. Not after the board's newer stamp: requests sent
            # before it may still be in transit (a burst would then look absent from the replica that
            # answered first and pile onto it); counting some twice for <= one poll period is the safe side.
            polled_at = (r.routing_stats or {}).get("timestamp", 0.0)
            for sent_at, pages in self.sent.get(r.replica_id, {}).values():
                if sent_at > polled_at:
                    st.in_flight += 1
                    st.in_flight_pages += pages
            for rid, (replica, _, pages) in self.chosen.items():
                if replica == r.replica_id and rid != own:
                    st.in_flight += 1
                    st.in_flight_pages += pages
            states.append(st)
        if req is None or not states:
            return [sorted(candidate_replicas, key=lambda r: len(self.sent.get(r.replica_id, {})))]
        decision = self.policy.choose(req, states)
        self.last_decision = decision
        self._decisions.inc(tags={"reason": "no_capacity" if decision.worker_id is None
                                  else "affinity" if decision.hit_pages else "capacity"})
        if decision.worker_id is None:
            return []
        ranked = sorted(decision.costs, key=decision.costs.get)
        if own is not None:
            st = next(s for s in states if s.worker_id == decision.worker_id)
            self.chosen[own] = (by_id[decision.worker_id].replica_id, now, st.peak_pages(req, decision.hit_pages))
        return [[by_id[decision.worker_id]]] + [[by_id[w]] for w in ranked if w != decision.worker_id]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        self.chosen.pop(pending_request.metadata.internal_request_id, None)
        if self._pinned(pending_request) is not None:
            return  # a multiplexed stream, not a request: it takes no capacity
        req = self._route_of(pending_request)
        pages = 0
        if req is not None:
            st = worker_state_from_stats(str(replica_id), self.curr_replicas[replica_id].routing_stats) \
                if replica_id in self.curr_replicas else None
            pages = st.peak_pages(req, st.hit_pages(req)) if st is not None else 0
        self.sent.setdefault(replica_id, {})[pending_request.metadata.internal_request_id] = (time.time(), pages)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self.sent.get(replica_id, {}).pop(internal_request_id, None)

    def on_replica_actor_died(self, replica_id: ReplicaID):
        self.sent.pop(replica_id, None)
        state_board.forget(replica_id.unique_id)
        super().on_replica_actor_died(replica_id)

    @staticmethod
    def _pinned(pending_request: PendingRequest | None) -> str | None:
        route = pending_request.kwargs.get("route") if pending_request is not None else None
        return route.get("replica") if isinstance(route, dict) else None

    @staticmethod
    def _route_of(pending_request: PendingRequest | None) -> RouteRequest | None:
        if pending_request is None:
            return None
        if "route" in pending_request.kwargs:
            return route_request_from(pending_request.kwargs["route"])
        return route_request_from(pending_request.args[0]) if pending_request.args else None
