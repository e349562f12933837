"""Worker capacity carried back on responses: the fast path of the routing state (no central actor).

Serve's controller polls every worker's `record_routing_stats` (every 100 ms in our configs) and pushes
the reports to every router; between polls a worker's capacity changes in jumps -- a request admitted
takes its pages, a finished one returns them. The worker therefore attaches its capacity (free pages,
running, waiting, the engine's timestamp) to the first and the last chunk of every response; the ingress
that reads the chunk posts it here, and the router of the same process overlays it on the polled report
when it is newer. Every ingress learns from its own responses at once and from everyone's at the next poll.
Pure Python, one board per process.
"""

from __future__ import annotations

import threading

CAPACITY_KEYS = ("free_pages", "running", "waiting", "timestamp")

_lock = threading.Lock()
_board: dict[str, dict] = {}


def capacity_of(routing_state: dict) -> dict:
    """The small part of a worker's routing state that rides on responses (no page hashes)."""
    return {k: routing_state[k] for k in CAPACITY_KEYS}


def post(replica: str, capacity: dict) -> bool:
    """Record a replica's capacity if it is newer than what the board holds; True if it was."""
    with _lock:
        old = _board.get(replica)
        if old is not None and old["timestamp"] >= capacity["timestamp"]:
            return False
        _board[replica] = {k: capacity[k] for k in CAPACITY_KEYS}
        return True


def overlay(replica: str, stats: dict | None) -> dict | None:
    """The polled report `stats` with the board's capacity for `replica` laid over it when newer."""
    with _lock:
        fresh = _board.get(replica)
    if stats is None or fresh is None or fresh["timestamp"] <= stats.get("timestamp", 0.0):
        return stats
    return {**stats, **fresh}


def forget(replica: str) -> None:
    with _lock:
        _board.pop(replica, None)


def clear() -> None:
    with _lock:
        _board.clear()
