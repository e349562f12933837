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
