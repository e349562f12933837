"""What top-p costs a decode batch, on rows of a vocabulary's size (CUDA): the threshold by the sort-based torch
reference and by the radix-search kernel (kernels/sampling.py), the whole truncate_logits, and a whole draw
from fp32 logits (temperature, nucleus, token): masked by the kernel's threshold then inverse CDF, against
the rejection kernels (sample_top_p_triton).

    python -m benchmarks.top_p_cost [--rows 256] [--vocabs 151936,49152] [--top-p 0.95]
"""

from __future__ import annotations

import argparse
import os

import torch

from benchmarks.decode_step import card_tag
from benchmarks.provenance import write_result


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--vocabs", default="151936,49152")
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--out", default="benchmarks/results")
    a = ap.parse_args(argv)
    import triton

    from zipserve.kernels.sampling import DRAWS, inverse_cdf, sample_top_p_triton, top_p_threshold_ref, top_p_threshold_triton
    from zipserve.workers.sampler import truncate_logits
    from zipserve.workers.sampling_params import SamplingParams

    torch.manual_seed(0)
    rows = []
    for V in (int(v) for v in a.vocabs.split(",")):
        x = torch.randn(a.rows, V, device="cuda") * 2
        p = torch.full((a.rows,), a.top_p, device="cuda")
        params = [SamplingParams(temperature=a.temperature, top_p=a.top_p)] * a.rows
        t = torch.full((a.rows,), a.temperature, device="cuda")
        u = torch.rand(a.rows, DRAWS + 1, device="cuda")

        def by_threshold():
            probs = truncate_logits(x, params, top_p_threshold_triton).softmax(-1)
            return inverse_cdf(probs, u[:, 0]), ~torch.isfinite(probs).all(-1)

        ms = {name: triton.testing.do_bench(fn, return_mode="median") for name, fn in (
            ("threshold_sort", lambda: top_p_threshold_ref(x, p)),
            ("threshold_kernel", lambda: top_p_threshold_triton(x, p)),
            ("truncate_logits", lambda: truncate_logits(x, params, top_p_threshold_triton)),
            ("draw_by_threshold", by_threshold),
            ("draw_by_rejection", lambda: sample_top_p_triton(x, t, p, u)))}
        same = (top_p_threshold_ref(x, p) == top_p_threshold_triton(x, p)).float().mean().item()
        rows.append({"vocab": V, "rows": a.rows, "ms": ms, "kernel_speedup": ms["threshold_sort"] / ms["threshold_kernel"],
                     "rows_with_equal_threshold": same})
        print(f"V={V}: threshold by sort {ms['threshold_sort']:.3f} ms, by kernel {ms['threshold_kernel']:.3f} ms, "
              f"truncate_logits {ms['truncate_logits']:.3f} ms; a whole draw: masked by the threshold "
              f"{ms['draw_by_threshold']:.3f} ms, by rejection {ms['draw_by_rejection']:.3f} ms; equal thresholds in {100 * same:.1f}% of rows", flush=True)
    card = torch.cuda.get_device_name(0)
    res = {"benchmark": "top_p_cost", "device": card, "args": vars(a), "rows": rows}
    os.makedirs(a.out, exist_ok=True)
    write_result(os.path.join(a.out, f"top_p_cost_{card_tag(card)}.json"), res, indent=1)
    return res


if __name__ == "__main__":
    main()
