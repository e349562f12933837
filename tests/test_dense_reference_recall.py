"""The dense reference's recall of evicted entries (issue 27's policy, before the engine has it): its bound
is an upper bound, nothing is lost while the store has room, and without room it is today's policy."""

import torch

from tests.dense_reference import DenseCompressedReference
from zipserve.workers.config import CompressionConfig

CCFG = CompressionConfig(query_window=4, recent_fraction=0.25)
PROMPT = [(i * 37) % 200 + 3 for i in range(11)]


def test_bound_is_an_upper_bound_of_every_window_query_key_product(qwen3_path):
    ref = DenseCompressedReference(qwen3_path, 4, 2, CCFG)
    g = torch.Generator().manual_seed(0)
    qs = torch.randn(4, ref.n_heads, ref.head_dim, generator=g)
    k = torch.randn(4, ref.head_dim, generator=g)
    page = {"kmin": k.amin(0), "kmax": k.amax(0)}
    group = ref.n_heads // ref.n_kv
    for h in range(ref.n_kv):
        exact = (qs[:, h * group: (h + 1) * group] @ k.T).max().item()
        assert exact <= ref._bound(qs, h, page) + 1e-5


def test_recall_without_room_is_the_policy_without_recall(qwen3_path):
    """host_pages=0: every evicted page is dropped at once, so nothing is ever recalled."""
    plain = DenseCompressedReference(qwen3_path, 4, 2, CCFG)
    none = DenseCompressedReference(qwen3_path, 4, 2, CCFG, recall_pages=1, host_pages=0)
    assert none.generate(PROMPT, 40) == plain.generate(PROMPT, 40)
    assert none.kept_log == plain.kept_log and none.dropped_pages > 0
    assert all(not r for comp in none.recalled_log for layer in comp for r in layer)


def test_recall_conserves_entries_and_brings_some_back(qwen3_path):
    """With room, every entry is resident or stored after each compression (per layer and head, no position
    twice), each compression keeps the budget, and some recalled entries are kept again."""
    ref = DenseCompressedReference(qwen3_path, 4, 2, CCFG, recall_pages=1)
    out = ref.generate(PROMPT, 60)
    assert len(out) == 60 and ref.dropped_pages == 0
    assert all(len(r) == 4 for comp in ref.recalled_log[1:] for layer in comp for r in layer)  # one page each
    kept_again = 0
    for c, (kept, recalled) in enumerate(zip(ref.kept_log, ref.recalled_log)):
        for layer_kept, layer_recalled in zip(kept, recalled):
            for head_kept, head_recalled in zip(layer_kept, layer_recalled):
                assert len(head_kept) == 2 * 4 and head_kept == sorted(head_kept)
                kept_again += len(set(head_kept) & set(head_recalled))
    assert kept_again > 0
    seen = len(PROMPT) + 60 - 1  # tokens whose K/V were computed (the last sampled one never runs)
    for li, layer in enumerate(ref.stores):
        for h, store in enumerate(layer):
            assert all(len(page["pos"]) == 4 for page in store["closed"])
            stored = [p for page in store["closed"] for p in page["pos"].tolist()]
            stored += store["open"]["pos"] if store["open"] is not None else []
            assert sorted(stored + ref.resident[li][h]) == list(range(seen))


def test_per_step_recall_of_every_stored_page_is_full_attention(qwen3_path):
    """query_pages >= every stored page, no lag: each decode step attends over the resident entries and
    everything ever evicted (each compression evicts whole pages here), so greedy decoding is full KV's,
    while the cache is compressed as often as without it."""
    full = DenseCompressedReference(qwen3_path, 4, None, CCFG)
    everything = DenseCompressedReference(qwen3_path, 4, 2, CCFG, query_pages=10**6)
    plain = DenseCompressedReference(qwen3_path, 4, 2, CCFG)
    want, got, compressed = full.generate(PROMPT, 40), everything.generate(PROMPT, 40), plain.generate(PROMPT, 40)
    assert got == want and compressed != want  # (without the pages the compressed output differs)
    assert everything.kept_log and len(everything.kept_log) == len(plain.kept_log)


def test_per_step_recall_picks_the_pages_of_highest_bound_for_the_query(qwen3_path):
    ref = DenseCompressedReference(qwen3_path, 4, 2, CCFG, query_pages=2)
    d = ref.head_dim
    q = torch.zeros(1, ref.n_heads, d)
    q[0, 0, 0] = 1.0  # KV head 0's group: the first query looks along channel 0, the others see nothing
    pages = []
    for i, top in enumerate([0.1, 3.0, -2.0, 2.0]):  # channel-0 maxima; bounds 0.1, 3, 0, 2
        k = torch.zeros(4, d)
        k[:, 0] = torch.tensor([top, top - 1, top - 2, top - 3])
        pages.append({"k": k, "v": k + i, "kmin": k.amin(0), "kmax": k.amax(0)})
    for i, page in enumerate(pages):
        page["pos"] = torch.arange(4) + 4 * i
    k, v, first = ref._pages_for({"closed": pages}, q, 0)
    assert first == {4, 12}
    assert torch.equal(k, torch.cat([pages[1]["k"], pages[3]["k"]])) and torch.equal(v[4:], pages[3]["v"])
    assert ref._pages_for({"closed": []}, q, 0) is None
    # query_newest_of: of the 2 pages of highest bound (1 and 3), the newest (3), not the highest (1)
    ref.query_pages, ref.query_newest_of = 1, 2
    k, v, first = ref._pages_for({"closed": pages}, q, 0)
    assert first == {12} and torch.equal(k, pages[3]["k"])
    ref.query_newest_of = 3  # pages 1, 3 and 0 (bound 0.1): page 3 is still the newest of them
    assert ref._pages_for({"closed": pages}, q, 0)[2] == {12}
