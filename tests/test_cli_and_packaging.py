"""The CLI works end to end, and our `kernels` package is never mistaken for Hugging Face's."""

import subprocess
import sys

from workers import LLM, SamplingParams


def test_cli_generate_matches_engine(qwen3_path):
    cmd = [sys.executable, "-m", "cluster.cli", "generate", "--model", qwen3_path, "--max-tokens", "12",
           "--block-size", "16", "--ignore-eos", "The quick brown fox"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    expected = LLM(qwen3_path, block_size=16).generate(["The quick brown fox"], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)[0].text
    assert res.stdout == expected + "\n"
    assert "finish_reason=length" in res.stderr


def test_cli_help_and_errors(tmp_path):
    res = subprocess.run([sys.executable, "-m", "cluster.cli", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "generate" in res.stdout
    res = subprocess.run([sys.executable, "-m", "cluster.cli", "generate", "--model", str(tmp_path), "hi"],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "no config.json" in res.stderr


def test_kernels_package_is_ours_and_transformers_ignores_it():
    import kernels
    from transformers.utils.import_utils import is_kernels_available

    assert getattr(kernels, "ZIPSERVE_KERNELS", False)
    assert not is_kernels_available()


def test_engine_config_from_yaml(qwen3_path, tmp_path):
    import pytest

    llm = LLM(qwen3_path, config_file="configs/engine/cpu-tiny.yaml")
    cfg = llm.engine.config
    assert (cfg.block_size, cfg.num_blocks, cfg.budget_blocks, cfg.compression.query_window) == (8, 256, 2, 4)
    bad = tmp_path / "bad.yaml"
    bad.write_text("block_size: 8\nbudget_block: 2\n")
    with pytest.raises(ValueError, match="unknown engine config key.*budget_block"):
        LLM(qwen3_path, config_file=str(bad))
    bad.write_text("block_size: 8\ncompression:\n  use_similarity: true\n")
    with pytest.raises(ValueError, match="unknown compression option.*use_similarity"):
        LLM(qwen3_path, config_file=str(bad))


def test_importing_the_workers_package_loads_no_engine():
    """`workers/__init__` is lazy: a light module of the package must not pull the engine and the models."""
    code = ("import sys, workers, workers.sampling_params; "
            "print(sorted(m for m in sys.modules if m in ('workers.engine', 'workers.model_runner', 'workers.llm')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
    code = "from workers import LLM, SamplingParams; print(LLM.__module__, SamplingParams.__module__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["workers.llm", "workers.sampling_params"], out.stderr
