"""Build a Hugging Face model folder (config, safetensors, tokenizer) with random weights, offline.

Tests and benchmarks need real model folders without downloading one. The model is transformers' own class
for the architecture, so transformers stays an independent oracle for what the engine loads; the tokenizer
is a byte-level BPE trained in-process on a few sentences, so any text round-trips.

Not imported by `zipserve.workers.models`: it pulls transformers and tokenizers, which serving never needs.
"""

from __future__ import annotations

import os

import torch

TOKENIZER_CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Compressed paged attention keeps a fixed budget of pages per request.",
    "def add(a, b):\n    return a + b\n",
    "One, two, three, four, five, six, seven, eight, nine, ten.",
    "Reasoning traces are long; the key-value cache grows with every token.",
]

# Architecture name -> the prefix of its transformers classes ({prefix}Config, {prefix}ForCausalLM).
TRANSFORMERS_PREFIX = {"qwen3": "Qwen3", "qwen2": "Qwen2", "llama": "Llama"}


def build_tokenizer(vocab_size: int = 320):
    """The tokenizer every folder here carries: a byte-level BPE trained on TOKENIZER_CORPUS (a
    transformers PreTrainedTokenizerFast; end of text is its EOS and padding)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TOKENIZER_CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def build_model_folder(path: str, arch: str = "qwen3", *, layers: int = 2, hidden: int = 64, heads: int = 4,
                       kv_heads: int = 2, head_dim: int = 16, tie: bool = False, max_pos: int = 1024,
                       rope_scaling: dict | None = None, seed: int = 0, **overrides) -> str:
    """Write a random model of architecture `arch` (see TRANSFORMERS_PREFIX) and this shape to `path`;
    `overrides` go to the transformers config as they are. Returns `path`."""
    import transformers

    tokenizer = build_tokenizer()
    prefix = TRANSFORMERS_PREFIX[arch]
    config_cls = getattr(transformers, f"{prefix}Config")
    model_cls = getattr(transformers, f"{prefix}ForCausalLM")
    kw = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 3 // 2 * 2,
              num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
              max_position_embeddings=max_pos, tie_word_embeddings=tie, rms_norm_eps=1e-6,
              eos_token_id=tokenizer.eos_token_id, bos_token_id=None, pad_token_id=tokenizer.pad_token_id)
    if arch != "qwen2":
        kw["head_dim"] = head_dim
    if rope_scaling is not None:
        kw["rope_parameters"] = {"rope_theta": 10000.0, **rope_scaling}
    kw.update(overrides)
    config = config_cls(**kw)
    config.architectures = [f"{prefix}ForCausalLM"]
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():  # larger weights than the default init: sharper, more varied greedy outputs
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3 if p.shape[0] != config.vocab_size else 0.5)
            elif name.endswith("bias"):  # nonzero biases, so the bias paths are really exercised
                p.normal_(0, 0.1)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
