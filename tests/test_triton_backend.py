"""The engine with backend="triton" equals backend="torch" (on CPU the kernels run in the interpreter)."""

import pytest

from zipserve.workers import LLM, SamplingParams

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [(j * 7) % 200 + 3 for j in range(29)]]


@pytest.mark.parametrize("budget,recall", [(None, None), (2, None), (2, {"pages": 1, "host_gib": 0.01})], ids=["full", "2", "2-recall"])
def test_triton_backend_matches_torch_backend(qwen3_path, budget, recall):
    params = SamplingParams(temperature=0, max_tokens=30 if recall is None else 50, ignore_eos=True)
    common = dict(block_size=8, budget_blocks=budget, compression=dict(query_window=4, recall=recall),
                  max_num_batched_tokens=16, num_blocks=48, dtype="float32")
    ref = LLM(qwen3_path, backend="torch", **common)
    tri = LLM(qwen3_path, backend="triton", **common)
    assert [o.token_ids for o in tri.generate(PROMPTS, params, use_tqdm=False)] == \
           [o.token_ids for o in ref.generate(PROMPTS, params, use_tqdm=False)]
    if budget is not None:
        assert tri.stats()["compressions"] == ref.stats()["compressions"] > 0
    if recall is not None:
        assert tri.stats()["recalled_pages"] == ref.stats()["recalled_pages"] > 0


def test_device_index_slices_keep_their_values_and_start_on_an_aligned_boundary():
    """Triton specializes a kernel on each pointer argument's 16-byte alignment: index slices that start
    where the previous array ended would make a batch's lengths pick the kernel variant (a compile while
    requests wait). Every slice starts on a 16-element boundary and holds its own values."""
    from types import SimpleNamespace

    import torch

    from zipserve.workers.model_runner import ModelRunner

    arrays = [[1, 2, 3], [4], [], [5, 6, 7, 8, 9] * 7, [10, 11]]
    for dtype in (torch.int32, torch.int64):
        out = ModelRunner._upload(SimpleNamespace(device=torch.device("cpu")), arrays, dtype)
        assert [t.tolist() for t in out] == arrays and all(t.dtype == dtype for t in out)
        assert len({t.untyped_storage().data_ptr() for t in out}) == 1  # one copy to the device
        assert [t.storage_offset() % 16 for t in out] == [0] * len(out)  # (the block itself is 64-byte aligned)
