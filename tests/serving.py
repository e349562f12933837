"""Helpers for tests that serve over HTTP: a free port to bind, and where an app's requests go.

Ray and Serve themselves come from the `local_ray` fixture (tests/conftest.py)."""

from __future__ import annotations


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for test servers), drawn from below the kernel's ephemeral range.

    Why not bind port 0: that hands out an ephemeral port, and the Ray processes a fixture starts between
    picking the port and Serve binding it also bind port 0 -- CI once lost a whole module to a proxy that
    "failed to bind" the port it had been given. Ports under the ephemeral range are only taken by explicit
    binds; Ray's workers use 10002-19999, so draw from 20000 up."""
    import random
    import socket

    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral_low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, max(ephemeral_low - 1100, 20001))  # + the direct-ingress ports above it
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free TCP port found in 20000-%d" % ephemeral_low)


def app_url(port: int, app: str = "zipserve") -> str:
    """Where to send an app's requests: its ingress replica's own port under direct ingress, else the proxy."""
    from zipserve.cluster.app import ingress_urls

    urls = ingress_urls(app, host="127.0.0.1")
    return urls[0] if urls else f"http://127.0.0.1:{port}"
