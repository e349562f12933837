"""The throughput benchmark's driver counts what the engine produced: every token of a complete run, and in
window mode exactly the steps inside the window, with a new request as each one ends."""

import pytest

from benchmarks.closed_loop import Engine, Workload, drive


class _FakeEngine:
    """Runs at most `slots` requests, one token each per step; each step takes one second of a fake clock."""

    def __init__(self, slots: int):
        self.slots, self.now, self.left, self.order, self.added = slots, 0.0, {}, [], []

    def clock(self) -> float:
        return self.now

    def add(self, rid, prompt, length):
        self.left[rid] = length
        self.order.append(rid)
        self.added.append((rid, len(prompt), length))

    def step(self):
        self.now += 1.0
        out = []
        for rid in self.order[: self.slots]:
            self.left[rid] -= 1
            out.append((rid, 1, self.left[rid] == 0))
        self.order = [r for r in self.order if self.left[r] > 0]
        return out

    def engine(self) -> Engine:
        return Engine(self.add, self.step, lambda: bool(self.order), lambda: min(self.slots, len(self.order)),
                      step_floor_s=lambda: 0.25, abort=lambda rid: self.order.remove(rid))


def test_a_complete_run_counts_every_token_of_every_request():
    fake = _FakeEngine(slots=3)
    w = Workload(vocab=32000, output_len=40, mixed=True, min_len=5, max_len=60)
    r = drive(fake.engine(), w, concurrency=5, mode="complete", clock=fake.clock)
    lengths = [n for _, _, n in fake.added]
    assert r["output_tokens"] == sum(lengths) and r["requests_finished"] == 5 and r["complete"]
    assert r["steps"] == fake.now and r["span_s"] == fake.now
    assert r["floor_fraction"] == pytest.approx(0.25)
    assert len(set(lengths)) > 1 and all(5 <= n <= 60 for n in lengths)  # mixed: long-tailed, clipped
    assert [p for _, p, _ in fake.added] == [len(w.request(i)[0]) for i in range(5)]


def test_a_window_counts_only_its_steps_and_keeps_the_engine_full():
    fake = _FakeEngine(slots=4)
    r = drive(fake.engine(), Workload(vocab=32000, output_len=7), concurrency=4, mode="window", warmup_s=10,
              window_s=20, clock=fake.clock)
    assert r["steps"] == 20 and r["output_tokens"] == 4 * 20  # steps ending at 11..30, four tokens each
    assert r["tokens_per_s"] == pytest.approx(4.0) and r["mean_running"] == 4
    assert r["requests_started"] > 4 and not fake.order  # replaced as they ended; the rest aborted at the end
    assert r["itl_ms"]["p50"] == pytest.approx(1000.0)


def test_aged_requests_carry_their_history_as_prompt_and_generate_the_rest():
    fresh, aged = Workload(vocab=32000, output_len=1000), Workload(vocab=32000, output_len=1000, aged=4)
    ages = []
    for i in range(6):
        (p0, n0), (p1, n1) = fresh.request(i), aged.request(i)
        assert p1[: len(p0)] == p0 and len(p1) - len(p0) + n1 == n0 == 1000
        ages.append(len(p1) - len(p0))
    assert ages == [875, 625, 375, 125, 0, 0]  # spread over a lifetime, oldest first; later ones start fresh


def test_steps_with_a_prefill_are_told_apart_and_their_excess_time_counted():
    class _PrefillCosts(_FakeEngine):
        """A step that prefills a newly added request takes 3 s of the fake clock instead of 1."""

        def __init__(self, slots):
            super().__init__(slots)
            self.prompt_tokens, self.new, self.prefill_ends = 0, [], []

        def add(self, rid, prompt, length):
            super().add(rid, prompt, length)
            self.new.append(len(prompt))

        def step(self):
            if self.new:
                self.prompt_tokens += sum(self.new)
                self.new = []
                self.now += 2.0
                self.prefill_ends.append(self.now + 1.0)
            return super().step()

    fake = _PrefillCosts(slots=4)
    eng = fake.engine()
    eng.prefill_tokens = lambda: fake.prompt_tokens
    r = drive(eng, Workload(vocab=32000, output_len=5), concurrency=4, mode="window", warmup_s=10, window_s=40,
              clock=fake.clock)
    kinds = r["steps_by_kind"]
    assert kinds["decode"]["mean_ms"] == pytest.approx(1000.0)
    assert kinds["decode_ms"]["p50"] == pytest.approx(1000.0) and kinds["decode_ms"]["p99"] == pytest.approx(1000.0)
    assert set(r["gc_pauses"]) == {"pauses", "total_ms", "longest_ms"}
    assert kinds["decode"]["steps"] + kinds["with prefill"]["steps"] == r["steps"]
    counted = [t for t in fake.prefill_ends if r["window"][0] + 3 <= t <= r["window"][1]]
    assert counted and kinds["with prefill"]["steps"] >= len(counted)
    assert kinds["prefill_steps_excess_share"] == pytest.approx(2.0 * len(counted) / r["span_s"])


def test_overlap_slowdown_counts_what_side_work_added_to_the_kernels_it_ran_beside():
    from benchmarks.engine_step import overlap_slowdown_ms

    main = [("gemm", 0, 10), ("attn", 10, 15), ("gemm", 20, 30),  # clean runs: gemm 10 us, attn 5 us
            ("gemm", 40, 56), ("attn", 56, 64), ("norm", 64, 66), ("gemm", 70, 79)]
    side = [(45, 50), (48, 60), (65, 65.5)]  # merged to 45..60, then 65..65.5
    ms, unmatched = overlap_slowdown_ms(main, side)
    # gemm 40..56 (+6) and attn 56..64 (+3) overlap; norm overlaps but never ran clean; gemm 70..79 is clean
    assert ms == pytest.approx(9e-3) and unmatched == 1
    assert overlap_slowdown_ms(main, []) == (0.0, 0)


def test_gpu_gaps_split_kernel_boundaries_from_host_waits():
    from benchmarks.engine_step import gpu_gaps

    kernels = [("a", 0, 10), ("side", 5, 12), ("b", 14, 20),  # 2 us after the merged end 12: a boundary
               ("c", 50, 60),  # 30 us after b: the host
               ("b", 60, 70), ("c", 100, 101), ("a", 101.5, 110)]  # 0; then 30 us b -> c; 0.5 us
    g = gpu_gaps(kernels, short_us=10)
    assert g["short_gaps"] == 2 and g["short_gap_ms"] == pytest.approx(2.5e-3)
    assert g["long_gaps"] == 2 and g["long_gap_ms"] == pytest.approx(60e-3)
    assert g["long_gaps_between"] == {"b -> c": [2, 0.06]}
    assert gpu_gaps([])["long_gaps"] == 0


def test_gc_pauses_count_only_collections_while_on():
    import gc

    from benchmarks.closed_loop import GcPauses

    pauses = GcPauses()
    gc.collect()  # off: not counted
    pauses.on = True
    gc.collect()
    gc.collect()
    pauses.on = False
    gc.collect()
    r = pauses.close()
    assert r["pauses"] == 2 and r["total_ms"] >= r["longest_ms"] > 0
    assert pauses._callback not in gc.callbacks  # closed: nothing left behind


def test_steady_running_ages_what_the_pool_holds_at_once():
    from benchmarks.closed_loop import steady_running

    w = Workload(vocab=32000, output_len=1000, aged=64)
    prompts = [len(w.request(i)[0]) for i in range(64, 1088)]  # fresh ones (past the aged)
    held = sum(prompts) / len(prompts) + 500 + 8  # prompt + half the length + half a page of 16
    n = steady_running(w, 64, int(40 * held), 16)
    assert 38 <= n <= 42  # 40 such requests fill the pool
    assert steady_running(w, 64, 10**9, 16) == 64  # never more than are offered
    assert steady_running(w, 64, 100 * 9 * 256, 256, budget_pages=8) == 64
    assert steady_running(w, 256, 100 * 9 * 256 + 200, 256, budget_pages=8) == 100  # budget + 1 pages each
    # mixed lengths: as many as fill the pool with aged requests as they are drawn (ages spread over each life)
    m = Workload(vocab=32000, output_len=4000, mixed=True, aged=8)
    fresh = [Workload(vocab=32000, output_len=4000, mixed=True).request(i) for i in range(1024)]
    held = sum(len(p) + n / 2 + 8 for p, n in fresh) / len(fresh)
    assert steady_running(m, 10**6, 10**7, 16) == int(10**7 // held)
    aged = Workload(vocab=32000, output_len=4000, mixed=True, aged=steady_running(m, 10**6, 10**7, 16))
    filled = sum(len(aged.request(i)[0]) + 8 for i in range(aged.aged))  # their histories are in their prompts
    assert 0.9 * 10**7 <= filled <= 1.1 * 10**7


def test_scheduler_sim_runs_the_engine_scheduler_in_the_closed_loop():
    """The simulation drives the engine's own scheduler with modelled step times (deterministic: no clock),
    and the admission headroom it was built to weigh shows in it: fewer preemptions and recomputes."""
    from benchmarks.scheduler_sim import simulate

    runs = {h: simulate(pool_tokens=64 * 256, block_size=16, output_len=1024, requests=64, warmup_s=5,
                        window_s=20, headroom_steps=h) for h in (0, 128)}
    for r in runs.values():
        assert r["complete"] and r["tokens_per_s"] > 0 and 0 < r["mean_running"] <= 64
        assert r["workload"]["aged"] == 18  # steady_running of this pool
    assert runs[128]["preemptions"] < runs[0]["preemptions"]
    assert runs[128]["recomputed_tokens"] < runs[0]["recomputed_tokens"]
    assert simulate(pool_tokens=64 * 256, block_size=16, output_len=1024, requests=64, warmup_s=5, window_s=20,
                    headroom_steps=0) == runs[0]  # the same every time
