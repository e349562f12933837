"""The whole engine on the GPU: backend="triton" against backend="torch" (marked gpu; skipped without CUDA)."""

import pytest
import torch

from zipserve.workers import LLM, SamplingParams
from zipserve.workers.models.random_folder import build_model_folder

pytestmark = pytest.mark.gpu

PROMPTS = [[(i * 7 + j * 13) % 300 + 3 for j in range(n)] for i, n in enumerate([5, 40, 130, 300, 17, 77])]


@pytest.fixture(scope="module")
def gpu_model(tmp_path_factory):
    """A Qwen3-shaped random model with head dim 128 and GQA 4, sharp enough for stable greedy decoding."""
    return build_model_folder(str(tmp_path_factory.mktemp("gpu-qwen3")), "qwen3", layers=4, hidden=512, heads=8,
                              kv_heads=2, head_dim=128, max_pos=4096)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("budget", [None, 4])
def test_triton_engine_equals_torch_engine(gpu_model, dtype, budget):
    """fp32: identical tokens for all prompts. bf16: logits are bf16 (quantized: exact ties and gaps of one
    or two ulps are common), and attention rounds differently (fp32 math on bf16 inputs in the reference,
    bf16 tensor-core tiles in Triton), so greedy choices at close calls may flip (and with compression, a
    flipped choice also changes what is kept). Every bf16 divergence must be at a near-tie: Triton's token
    is the reference's second choice, less than 1 nat behind its first; the divergences are printed."""
    params = SamplingParams(temperature=0, max_tokens=96, ignore_eos=True, logprobs=2)
    common = dict(device="cuda", dtype=dtype, block_size=16, budget_blocks=budget, max_num_batched_tokens=128,
                  compression=dict(query_window=16), kv_cache_memory_gb=2)
    torch_out = LLM(gpu_model, backend="torch", **common).generate(PROMPTS, params, use_tqdm=False)
    llm = LLM(gpu_model, backend="triton", **common)
    triton_out = llm.generate(PROMPTS, params, use_tqdm=False)
    n, same = (96, 0) if dtype == "float32" else (64, 0)
    for a, b in zip(torch_out, triton_out):
        if a.token_ids[:n] == b.token_ids[:n]:
            same += 1
            continue
        assert dtype == "bfloat16", "fp32 backends must agree exactly"
        i = next(i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y)
        ref = a.logprobs[i]
        print(f"bf16 divergence at token {i}: reference top-2 logprobs {sorted(ref.values(), reverse=True)[:2]}")
        assert b.token_ids[i] in ref, f"token {i}: triton chose {b.token_ids[i]}, not in the reference's top 2"
        assert ref[a.token_ids[i]] - ref[b.token_ids[i]] < 1.0, f"token {i}: divergence at a clear choice"
    assert same >= 1
    if budget is not None:
        assert llm.stats()["compressions"] > 0


def test_triton_engine_long_context_and_overlap(gpu_model):
    """Pages of 256, long prompts compressed at the end of chunked prefill, many requests: finishes, no leak."""
    llm = LLM(gpu_model, device="cuda", backend="triton", block_size=256, budget_blocks=2, max_num_batched_tokens=512,
              kv_cache_memory_gb=2)
    prompts = [[(i * 11 + j) % 300 + 3 for j in range(200 + 150 * i)] for i in range(12)]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=600, ignore_eos=True), use_tqdm=False)
    assert all(len(o.token_ids) == 600 for o in outs)
    s = llm.stats()
    assert s["compressions"] >= 12 and s["free_pages"] == s["total_pages"]
    assert llm.engine.runner.compress_stream is not None  # compressions ran on their own stream
    torch.cuda.synchronize()


def test_same_kept_sets_at_first_compressions(gpu_model):
    """Both backends keep the same entries per (layer, head) at each request's first compression."""
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    logs = {}
    for backend in ("torch", "triton"):
        llm = LLM(gpu_model, device="cuda", dtype="float32", backend=backend, block_size=16, budget_blocks=4,
                  compression=dict(query_window=16), kv_cache_memory_gb=2)
        llm.engine.runner.compressor.kept_log = []
        llm.generate(PROMPTS, params, use_tqdm=False)
        logs[backend] = [(rid, layer, idx) for rid, scored, layer, idx in llm.engine.runner.compressor.kept_log
                         if scored == 0]  # first compressions only
    assert len(logs["torch"]) == len(logs["triton"]) > 0
    for (ra, la, a), (rb, lb, b) in zip(logs["torch"], logs["triton"]):
        assert (ra, la) == (rb, lb) and torch.equal(a, b)


@pytest.mark.parametrize("budget", [None, 4])
def test_async_scheduling_equals_synchronous_on_the_gpu(gpu_model, budget):
    """Async scheduling with CUDA graphs, pinned copies and the compression stream (fp32): every request gets
    the tokens and ending of the synchronous engine, including requests ended by a stop token's value."""
    common = dict(device="cuda", dtype="float32", block_size=16, budget_blocks=budget, max_num_batched_tokens=128,
                  compression=dict(query_window=16), kv_cache_memory_gb=2)
    free = LLM(gpu_model, async_scheduling=False, **common).generate(
        PROMPTS, SamplingParams(temperature=0, max_tokens=96, ignore_eos=True), use_tqdm=False)
    params = [SamplingParams(temperature=0, max_tokens=96, stop_token_ids=[o.token_ids[20 + 5 * i]]) if i % 2 == 0
              else SamplingParams(temperature=0, max_tokens=50 + i, ignore_eos=True) for i, o in enumerate(free)]
    results = {}
    for overlap in (False, True):
        llm = LLM(gpu_model, async_scheduling=overlap, **common)
        assert llm.engine.runner.graphs is not None
        results[overlap] = [(list(o.token_ids), o.finish_reason) for o in llm.generate(PROMPTS, params, use_tqdm=False)]
        assert llm.stats()["free_pages"] == llm.stats()["total_pages"]
    assert results[True] == results[False]
    assert [r for _, r in results[True]].count("stop") == 3


@pytest.mark.parametrize("ccfg", [
    dict(query_window=2, use_redundancy=False, use_pooling=False, prompt_fraction=0.5, recent_fraction=0.25),
    dict(query_window=2),  # the defaults: + global, 75% of the budget recent
    dict(query_window=4, prompt_fraction=0.25),
], ids=["prompt-half", "defaults", "defaults-prompt-quarter"])
def test_triton_engine_equals_dense_reference(tmp_path, ccfg):
    """The Triton engine (fp32) keeps exactly what the dense reference policy keeps, with per-request sinks
    (prompt_fraction: the 5-token prompt whole, longer ones capped) and the recent tail resolved per budget."""
    from tests.dense_reference import DenseCompressedReference
    from tests.test_compression import PROMPTS as CPU_PROMPTS
    from zipserve.workers.config import CompressionConfig

    path = build_model_folder(str(tmp_path / "m"), "qwen3", heads=4, kv_heads=2)
    expected = [DenseCompressedReference(path, 4, 4, CompressionConfig(**ccfg)).generate(p, 40) for p in CPU_PROMPTS]
    llm = LLM(path, device="cuda", backend="triton", dtype="float32", block_size=4, budget_blocks=4, compression=ccfg,
              num_blocks=64, max_num_batched_tokens=9)
    outs = llm.generate(CPU_PROMPTS, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), use_tqdm=False)
    assert [o.token_ids for o in outs] == expected
    assert llm.stats()["compressions"] > 0


@pytest.mark.parametrize("pages", [1, 2])
def test_triton_engine_with_recall_equals_dense_reference(tmp_path, pages):
    """Recall on the GPU (pinned host pool, summaries on the device, compaction on its stream) brings back and
    keeps exactly what the dense reference's recall policy does."""
    from tests.dense_reference import DenseCompressedReference
    from tests.test_compression import PROMPTS as CPU_PROMPTS
    from zipserve.workers.config import CompressionConfig

    path = build_model_folder(str(tmp_path / "m"), "qwen3", heads=4, kv_heads=2)
    ccfg = dict(query_window=2)
    ref = DenseCompressedReference(path, 4, 3, CompressionConfig(**ccfg), recall_pages=pages)
    expected = [ref.generate(p, 48) for p in CPU_PROMPTS]
    llm = LLM(path, device="cuda", backend="triton", dtype="float32", block_size=4, budget_blocks=3,
              compression=dict(ccfg, recall={"pages": pages}), num_blocks=64, max_num_batched_tokens=9)
    outs = llm.generate(CPU_PROMPTS, SamplingParams(temperature=0, max_tokens=48, ignore_eos=True), use_tqdm=False)
    assert [o.token_ids for o in outs] == expected
    s = llm.stats()
    assert s["recalled_pages"] > 0 and s["recall_host_pages_used"] == 0 and s["free_pages"] == s["total_pages"]


def test_no_attention_kernel_compiles_after_the_engine_has_started(tmp_path, monkeypatch, gpu_model):
    """A kernel compiled while requests wait is added to their time to first token: after the engine's
    start-up warm-up, bursts of different sizes and prompt lengths (ragged prefill, mixed prefill + decode,
    split-K and single-partition decode, CUDA-graph and eager steps) compile no new Triton kernel."""
    import glob
    import random

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))  # read at each compile
    compiled = lambda: sorted(p for p in glob.glob(str(tmp_path / "triton" / "*" / "*.json"))
                              if not p.split("/")[-1].startswith("__grp__"))
    for budget in (None, 16):  # 16 pages of 64: tile sizes fixed, as in the served configs (budget x page >= 1024)
        llm = LLM(gpu_model, device="cuda", backend="triton", block_size=64, budget_blocks=budget,
                  max_num_batched_tokens=512, max_num_seqs=64, compression=dict(query_window=16), kv_cache_memory_gb=2)
        after_start = compiled()
        rng = random.Random(budget or 0)
        for n in (1, 7, 33, 64, 5):
            prompts = [[rng.randrange(3, 300) for _ in range(rng.randrange(5, 1500))] for _ in range(n)]
            llm.generate(prompts, SamplingParams(temperature=0, max_tokens=rng.randrange(20, 300), ignore_eos=True),
                         use_tqdm=False)
        if budget is not None:
            assert llm.stats()["compressions"] > 0
        new = sorted(set(compiled()) - set(after_start))
        assert not new, f"budget {budget}: compiled after start: {[p.split('/')[-1] for p in new]}"
