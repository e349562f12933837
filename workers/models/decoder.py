"""One decoder-only transformer for Qwen3, Qwen2 and Llama, with the architectures' switches.

Differences handled by `ModelArgs`: Qwen3 normalises q and k per head (q_norm/k_norm); Qwen2 has
biases on q/k/v; Llama may have `attention_bias` (q/k/v/o) and `mlp_bias`; any of them may tie the
LM head to the embedding and scale RoPE.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from zipserve.workers.layers.attention import Attention, AttentionMetadata, LayerCache
from zipserve.workers.layers.backend import KernelSet
from zipserve.workers.layers.mlp import SwiGLU
from zipserve.workers.layers.norm import RMSNorm
from zipserve.workers.layers.rotary import RotaryEmbedding
from zipserve.workers.parallel import TPGroup, VocabParallelEmbedding

ARCHITECTURES = ("Qwen3ForCausalLM", "Qwen2ForCausalLM", "LlamaForCausalLM")


@dataclass(frozen=True)
class ModelArgs:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_theta: float
    rope_scaling: dict | None
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    eos_token_ids: tuple[int, ...]

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelArgs":
        archs = cfg.get("architectures") or []
        arch = next((a for a in archs if a in ARCHITECTURES), None)
        if arch is None:
            raise ValueError(f"unsupported model architecture {archs!r}; supported: {', '.join(ARCHITECTURES)}")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {cfg['hidden_act']!r} (only silu)")
        if cfg.get("use_sliding_window"):
            raise ValueError("sliding-window attention is not supported")
        # transformers >= 5 writes rope_parameters (theta inside); older folders rope_theta + rope_scaling.
        rope = dict(cfg.get("rope_parameters") or {})
        theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
        scaling = rope or cfg.get("rope_scaling")
        if scaling and scaling.get("rope_type", scaling.get("type")) == "default":
            scaling = None
        if cfg.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError("partial rotary embeddings are not supported")
        heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id")
        eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
        attn_bias = bool(cfg.get("attention_bias", False))
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=arch == "Qwen2ForCausalLM" or attn_bias,
            o_bias=arch == "LlamaForCausalLM" and attn_bias,
            mlp_bias=arch == "LlamaForCausalLM" and bool(cfg.get("mlp_bias", False)),
            qk_norm=arch == "Qwen3ForCausalLM",
            eos_token_ids=eos,
        )


class DecoderLayer(nn.Module):
    def __init__(self, a: ModelArgs, rotary: RotaryEmbedding, kernels: KernelSet, tp: TPGroup):
        super().__init__()
        reduce = tp.all_reduce if tp.size > 1 else None  # nothing to call per layer on one GPU
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps, kernels.rms_norm)
        self.self_attn = Attention(a.hidden_size, a.num_heads, a.num_kv_heads, a.head_dim, qkv_bias=a.qkv_bias,
                                   o_bias=a.o_bias, qk_norm=a.qk_norm, rms_eps=a.rms_norm_eps, rotary=rotary,
                                   kernels=kernels, reduce=reduce)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps, kernels.rms_norm)
        self.mlp = SwiGLU(a.hidden_size, a.intermediate_size, a.mlp_bias, kernels.silu_and_mul, reduce)

    def forward(self, positions, h, residual, kv_cache, meta):
        if residual is None:
            residual = h
            h = self.input_layernorm(h)
        else:
            h, residual = self.input_layernorm(h, residual)
        h = self.self_attn(positions, h, kv_cache, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class DecoderModel(nn.Module):
    """Token ids -> hidden states -> logits, over a paged KV cache. Under tensor parallelism `args` holds
    this rank's shares (heads, KV heads, intermediate units) and `full_args` the model's."""

    def __init__(self, a: ModelArgs, max_positions: int, kernels: KernelSet, tp: TPGroup = TPGroup()):
        super().__init__()
        self.full_args, self.tp = a, tp
        if tp.size > 1:
            a = dataclasses.replace(a, num_heads=tp.split(a.num_heads, "num_attention_heads"),
                                    num_kv_heads=tp.split(a.num_kv_heads, "num_key_value_heads"),
                                    intermediate_size=tp.split(a.intermediate_size, "intermediate_size"))
        self.args = a
        rotary = RotaryEmbedding(a.head_dim, max_positions, a.rope_theta, a.rope_scaling)
        self.embed_tokens = VocabParallelEmbedding(a.vocab_size, a.hidden_size, tp)
        self.layers = nn.ModuleList(DecoderLayer(a, rotary, kernels, tp) for _ in range(a.num_layers))
        self.norm = RMSNorm(a.hidden_size, a.rms_norm_eps, kernels.rms_norm)
        self.lm_head = (None if a.tie_word_embeddings
                        else nn.Linear(a.hidden_size, self.embed_tokens.rows, bias=False))  # this rank's vocab rows

    def forward(self, input_ids, positions, kv_cache: torch.Tensor, meta: AttentionMetadata,
                q_window: torch.Tensor | None = None) -> torch.Tensor:
        """kv_cache: [2, L, num_blocks, block, H_kv, D]; q_window: [L, slots, Q, H_q, D] or None."""
        h, residual = self.embed_tokens(input_ids), None
        for i, layer in enumerate(self.layers):
            cache = LayerCache(kv_cache[0, i], kv_cache[1, i], None if q_window is None else q_window[i])
            h, residual = layer(positions, h, residual, cache, meta)
        h, _ = self.norm(h, residual)
        return h

    def compute_logits(self, h: torch.Tensor) -> torch.Tensor:
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = torch.nn.functional.linear(h, weight)
        if self.tp.size > 1:
            logits = self.tp.all_gather_last(logits)[:, : self.args.vocab_size]
        return logits.float()
