"""Drive an engine step by step with invariant checks after every step (shared by several tests)."""


def run_checked(llm, prompts, params, on_step=None, arrive_at=None):
    """Generate with `llm`'s engine, calling engine.check_invariants() (and on_step) after each step.

    arrive_at: optional step number per prompt at which it is added (default: all at step 0)."""
    eng = llm.engine
    params = params if isinstance(params, list) else [params] * len(prompts)
    arrive_at = arrive_at or [0] * len(prompts)
    base = eng.stats()["steps"]
    ids = [f"chk{base}-{i}" for i in range(len(prompts))]
    done, step = {}, 0
    while step <= max(arrive_at) or eng.has_unfinished_requests():
        for rid, p, sp, t in zip(ids, prompts, params, arrive_at):
            if t == step:
                eng.add_request(rid, p, sp)
        step += 1
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
        eng.check_invariants()
        if on_step is not None:
            on_step(eng)
    return [done[r] for r in ids]
