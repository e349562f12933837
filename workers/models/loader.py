"""Build a `DecoderModel` from a Hugging Face folder (config.json + *.safetensors)."""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import logging
import os

import torch
from safetensors import safe_open

from zipserve.workers.layers.backend import get_kernel_set
from zipserve.workers.models.decoder import DecoderModel, ModelArgs
from zipserve.workers.parallel import TPGroup

log = logging.getLogger(__name__)

# HF projection name -> (our fused parameter, which shard: index into the fused layout)
_FUSED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


_FUSED_NAMES = frozenset(fused for fused, _ in _FUSED.values())


def read_model_args(path: str) -> tuple[ModelArgs, dict]:
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    args = ModelArgs.from_hf_config(cfg)
    gen_path = os.path.join(path, "generation_config.json")
    if os.path.isfile(gen_path):  # generation_config's eos list wins (chat models add end-of-turn ids)
        with open(gen_path) as f:
            eos = json.load(f).get("eos_token_id")
        if eos is not None:
            eos = tuple(eos) if isinstance(eos, list) else (eos,)
            args = dataclasses.replace(args, eos_token_ids=tuple(dict.fromkeys(args.eos_token_ids + eos)))
    return args, cfg


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _fused_sizes(a: ModelArgs) -> dict[str, list[int]]:
    return {"qkv_proj": [a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim, a.num_kv_heads * a.head_dim],
            "gate_up_proj": [a.intermediate_size, a.intermediate_size]}


def shard_tensor(name: str, t: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    """This rank's piece of one checkpoint tensor (for a fused parameter: of one of its components), under
    our parameter name: column-parallel rows, row-parallel input columns (bias on rank 0 only), vocabulary
    rows (the last shard zero-padded); everything else is replicated."""
    if tp.size == 1:
        return t
    module, kind = name.split(".")[-2:]
    if module in _FUSED_NAMES:
        n = t.shape[0] // tp.size
        return t.narrow(0, tp.rank * n, n)
    if module in ("o_proj", "down_proj"):
        if kind == "bias":
            return t if tp.rank == 0 else torch.zeros_like(t)
        n = t.shape[1] // tp.size
        return t.narrow(1, tp.rank * n, n)
    if name in ("embed_tokens.weight", "lm_head.weight"):
        start, rows = tp.vocab_rows(t.shape[0])
        piece = t[start : start + rows]
        if piece.shape[0] < rows:
            piece = torch.cat([piece, piece.new_zeros(rows - piece.shape[0], *piece.shape[1:])])
        return piece
    return t


def shard_full_parameter(name: str, t: torch.Tensor, args: ModelArgs, tp: TPGroup) -> torch.Tensor:
    """This rank's piece of a whole parameter under our name (a fused one is sharded per component)."""
    module = name.split(".")[-2]
    if module in _FUSED_NAMES and tp.size > 1:
        return torch.cat([shard_tensor(name, part, tp) for part in t.split(_fused_sizes(args)[module])])
    return shard_tensor(name, t, tp)


def load_model(path: str, device: torch.device, dtype: torch.dtype, max_positions: int,
               load_format: str = "safetensors", seed: int = 0, backend: str = "torch",
               fused_elementwise: bool = True, tp: TPGroup = TPGroup()) -> DecoderModel:
    """load_format "safetensors" reads the folder's weights; "dummy" makes random weights on the device
    (for benchmarks of real shapes from a config-only folder, so nothing large has to travel). Under
    tensor parallelism each rank keeps its shard; dummy weights are drawn at full size in one order and
    sliced, so every tensor_parallel_size gets the same model."""
    args, _ = read_model_args(path)
    kernels = get_kernel_set(backend, fused_elementwise)
    with _default_dtype(dtype), torch.device(device):
        model = DecoderModel(args, max_positions, kernels, tp)
    if load_format == "dummy":
        gen = torch.Generator(device=device).manual_seed(seed)
        with torch.device("meta"):
            full = dict(DecoderModel(args, max_positions, kernels).named_parameters())
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, meta in full.items():
                if "norm" in name:
                    params[name].fill_(1.0)
                    continue
                # small weights keep activations finite through many layers
                t = torch.empty(meta.shape, device=device, dtype=dtype).normal_(0.0, 0.02, generator=gen)
                params[name].copy_(shard_full_parameter(name, t, args, tp))
        log.info("made random %s weights (%d layers) on %s%s", args.architecture, args.num_layers, device,
                 f", tensor-parallel rank {tp.rank} of {tp.size}" if tp.size > 1 else "")
        return model.eval()
    if load_format != "safetensors":
        raise ValueError(f"load_format must be 'safetensors' or 'dummy', got {load_format!r}")
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {path!r}")
    params = dict(model.named_parameters())
    loaded: set[tuple[str, int]] = set()
    a = args
    sizes = _fused_sizes(model.args)  # this rank's shares
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as f:
            for hf_name in f.keys():
                if "rotary_emb" in hf_name:
                    continue
                if hf_name == "lm_head.weight" and a.tie_word_embeddings:
                    continue
                name = hf_name.removeprefix("model.")
                parts = name.split(".")
                shard = None
                for i, p in enumerate(parts):
                    if p in _FUSED:
                        parts[i], shard = _FUSED[p]
                name = ".".join(parts)
                if name not in params:
                    raise ValueError(f"unexpected weight {hf_name!r} in {file}")
                tensor = shard_tensor(name, f.get_tensor(hf_name), tp)
                target = params[name].data
                if shard is not None:
                    fused = parts[-2]
                    off = sum(sizes[fused][:shard])
                    target = target.narrow(0, off, sizes[fused][shard])
                if target.shape != tensor.shape:
                    raise ValueError(f"weight {hf_name!r} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}")
                target.copy_(tensor.to(dtype))
                loaded.add((name, -1 if shard is None else shard))
    missing = []
    for name in params:
        fused = name.split(".")[-2]
        want = [(name, i) for i in range(len(sizes[fused]))] if fused in sizes else [(name, -1)]
        missing += [f"{n}[{i}]" if i >= 0 else n for n, i in want if (n, i) not in loaded]
    if missing:
        raise ValueError(f"weights missing from {path!r}: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    log.info("loaded %s (%d layers, %.1fM params) from %s", a.architecture, a.num_layers,
             sum(p.numel() for p in params.values()) / 1e6, path)
    return model.eval()
