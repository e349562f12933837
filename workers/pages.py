"""Page arithmetic shared by the engine, the router, its policy and the simulator: the chained page hash
and how many pages a request needs. Pure Python (no torch), so the ingress and the policy code import it
without the engine.

A *full* page whose tokens are known is identified by a chained hash (hash of the previous page's hash
and its own token ids), so equal prefixes map to equal hashes wherever they are computed.
"""

from __future__ import annotations

import hashlib
from array import array

_ROOT_HASH = b"zipserve-page-v1"


def hash_page(parent: bytes | None, token_ids) -> bytes:
    """Chained hash of one full page (stable across processes and machines)."""
    h = hashlib.blake2b(parent or _ROOT_HASH, digest_size=16)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


def page_hashes(token_ids: list[int], block_size: int, start: list[bytes] | None = None) -> list[bytes]:
    """Hashes of every full page of `token_ids`, extending the already computed `start` list."""
    hashes = list(start or [])
    for i in range(len(hashes), len(token_ids) // block_size):
        parent = hashes[i - 1] if i else None
        hashes.append(hash_page(parent, token_ids[i * block_size : (i + 1) * block_size]))
    return hashes


def num_pages(tokens: int, block_size: int) -> int:
    """Pages that hold `tokens` entries."""
    return -(-tokens // block_size)


def pages_to_come(table_pages: int, end_tokens: int, prefill_tokens: int, block_size: int,
                  budget: int | None, shared: int) -> int:
    """Fresh pages an uncompressed request may still take from the pool, from a table of `table_pages`
    pages of which `shared` are shared with other requests.

    A request that never compresses (full KV, or one that ends within budget + 1 pages) grows to its end.
    One that compresses grows to its table at its first compression (budget + 1 pages, or its whole
    prompt if still prefilling: `prefill_tokens`) and then needs budget + 1 private pages, so each shared
    page it still holds then costs a fresh one."""
    end_pages = num_pages(end_tokens, block_size)
    if budget is None or end_pages <= budget + 1:
        return max(0, end_pages - table_pages)
    first = max(table_pages, num_pages(prefill_tokens, block_size), budget + 1)
    return (first - table_pages) + max(0, (budget + 1) - (first - shared))


def admission_pages(prompt_tokens: int, end_tokens: int, block_size: int, budget: int | None,
                    hits: int = 0, unheld: int = 0, held_once: int = 0) -> int:
    """Free pages a fresh request must find to be sure of finishing (its reservation): what it will take
    (`pages_to_come`, with its `hits` cached prefix pages already in its table) plus what those hits cost
    the pool: `unheld` of them are free cached pages it takes off the free list, and `held_once` are held
    by one other request, which must then privatise them at its own first compression."""
    live = hits - unheld
    return pages_to_come(hits, end_tokens, prompt_tokens, block_size, budget, live) + unheld + held_once
