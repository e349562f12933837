"""Tensor parallelism on CPU (gloo): TP=N gives TP=1's tokens, with and without compression."""

import pytest
import torch

from tests.tiny_models import build_model_folder
from workers import LLM, SamplingParams
from workers.models.loader import shard_tensor
from workers.parallel import TPGroup

PROMPTS = [[(5 * i + 3) % 250 + 3 for i in range(40)], [7, 9, 11, 13] * 9, list(range(20, 90))]
CFG = dict(block_size=16, max_model_len=256, max_num_seqs=4)


def _generate(path, params, **kw):
    llm = LLM(path, **CFG, **kw)
    try:
        return [list(o.token_ids) for o in llm.generate(PROMPTS, params, use_tqdm=False)], llm.stats()
    finally:
        if hasattr(llm.engine, "shutdown"):
            llm.engine.shutdown()


@pytest.mark.parametrize("engine", [{}, {"budget_blocks": 2, "compression": {"query_window": 8}}],
                         ids=["full-kv", "compressed"])
def test_tp2_equals_tp1_greedy_and_seeded_sampling(qwen3_path, engine):
    for params in (SamplingParams(temperature=0, max_tokens=70, ignore_eos=True),
                   SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=40, ignore_eos=True)):
        want, stats1 = _generate(qwen3_path, params, **engine)
        got, stats2 = _generate(qwen3_path, params, tensor_parallel_size=2, **engine)
        assert got == want
        assert stats2.get("compressions", 0) == stats1.get("compressions", 0)
    if engine:
        assert stats1["compressions"] > 0  # the compressed run did compress (per rank, on its own KV heads)


def test_tp3_pads_the_vocabulary_shards_and_still_matches(tmp_path):
    """320 tokens over 3 ranks: the last vocabulary shard is zero-padded and the padding trimmed."""
    path = build_model_folder(str(tmp_path), "qwen3", heads=6, kv_heads=3)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    assert _generate(path, params, tensor_parallel_size=3)[0] == _generate(path, params)[0]


def test_indivisible_heads_are_refused_before_any_process_starts(qwen3_path):
    with pytest.raises(ValueError, match="must divide the model's num_attention_heads"):
        LLM(qwen3_path, **CFG, tensor_parallel_size=3)


def test_shard_tensor_splits_rows_columns_and_vocab():
    t = torch.arange(24.0).view(6, 4)
    tp = TPGroup(rank=1, size=2)
    assert torch.equal(shard_tensor("layers.0.self_attn.qkv_proj.weight", t, tp), t[3:])
    assert torch.equal(shard_tensor("layers.0.mlp.down_proj.weight", t, tp), t[:, 2:])
    assert torch.equal(shard_tensor("layers.0.self_attn.o_proj.bias", t[0], tp), torch.zeros(4))  # rank 0 adds it
    assert torch.equal(shard_tensor("layers.0.input_layernorm.weight", t[0], tp), t[0])
    v = torch.arange(5.0)[:, None].expand(5, 2)
    piece = shard_tensor("lm_head.weight", v, tp)  # 3 rows a rank: rows 3 and 4, then one zero row of padding
    assert torch.equal(piece, torch.tensor([[3.0, 3.0], [4.0, 4.0], [0.0, 0.0]]))
