"""transformers as the oracle: its own greedy generation of a model folder, for parity tests."""

from __future__ import annotations

import torch


def hf_greedy(path: str, prompts: list[list[int]], max_new_tokens: int, ignore_eos: bool = True) -> list[list[int]]:
    """transformers' own greedy generation, one prompt at a time (no padding effects)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    outs = []
    for p in prompts:
        ids = torch.tensor([p])
        kw = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
        if ignore_eos:
            kw["eos_token_id"] = None
            kw["min_new_tokens"] = max_new_tokens
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        outs.append(out[0, len(p):].tolist())
    return outs
