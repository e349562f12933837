"""Tiny random HF model folders (config + safetensors + tokenizer) built offline, for tests.

The tokenizer is a byte-level BPE trained in-process on a small corpus, so text round-trips; the models
are transformers' own classes with random weights, so transformers is an independent oracle.
"""

from __future__ import annotations

import contextlib
import os

import torch

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Compressed paged attention keeps a fixed budget of pages per request.",
    "def add(a, b):\n    return a + b\n",
    "One, two, three, four, five, six, seven, eight, nine, ten.",
    "Reasoning traces are long; the key-value cache grows with every token.",
]

ARCH_KW = {
    "qwen3": dict(cls="Qwen3", extra={}),
    "qwen2": dict(cls="Qwen2", extra={}),
    "llama": dict(cls="Llama", extra={}),
}


def build_tokenizer(vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def build_model_folder(path: str, arch: str = "qwen3", *, layers: int = 2, hidden: int = 64, heads: int = 4,
                       kv_heads: int = 2, head_dim: int = 16, tie: bool = False, max_pos: int = 1024,
                       rope_scaling: dict | None = None, seed: int = 0, **overrides) -> str:
    """Write a tiny random model of the given architecture to `path`; returns path."""
    import transformers

    tokenizer = build_tokenizer()
    name = ARCH_KW[arch]["cls"]
    config_cls = getattr(transformers, f"{name}Config")
    model_cls = getattr(transformers, f"{name}ForCausalLM")
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
    config.architectures = [f"{name}ForCausalLM"]
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


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for test servers), drawn from below the kernel's ephemeral range.

    Why not bind port 0: that hands out an ephemeral port, and the Ray processes a fixture starts between
    picking the port and Serve binding it also bind port 0 -- CI once lost a whole module to a proxy that
    "failed to bind" the port it had been given. Ports under the ephemeral range are only taken by explicit
    binds; Ray's workers use 10002-19999, so draw from 20000 up."""
    import random
    import socket

    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral_low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, max(ephemeral_low - 1100, 20001))  # + the direct-ingress ports above it
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free TCP port found in 20000-%d" % ephemeral_low)


@contextlib.contextmanager
def local_serve(throughput_optimized: bool = True):
    """Ray (a local cluster, 2 CPUs) and Serve on a free port, yielding the port; throughput_optimized:
    Ray Serve's throughput mode as `zipserve serve` runs it (cluster/app.py throughput_env), its environment
    set before Ray starts (every Ray process reads it then) and restored after shutdown."""
    import ray
    from ray import serve

    from zipserve.cluster.app import throughput_env

    port = free_port()
    env = throughput_env(port) if throughput_optimized else {}
    # No load balancer drains the ingress here: do not hold each shutdown for its 30 s draining period.
    env = env | {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0.5"} if env else env
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        ray.init(address="local", num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def app_url(port: int, app: str = "zipserve") -> str:
    """Where to send an app's requests: its ingress replica's own port under direct ingress, else the proxy."""
    from zipserve.cluster.app import ingress_urls

    urls = ingress_urls(app, host="127.0.0.1")
    return urls[0] if urls else f"http://127.0.0.1:{port}"
