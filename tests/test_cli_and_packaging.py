"""The CLI works end to end, and our packages install as `zipserve.*`, never mistaken for Hugging Face's `kernels`."""

import ast
import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

from zipserve.workers import LLM, SamplingParams


def test_cli_generate_matches_engine(qwen3_path):
    cmd = [sys.executable, "-m", "zipserve.cluster.cli", "generate", "--model", qwen3_path, "--max-tokens", "12",
           "--block-size", "16", "--ignore-eos", "The quick brown fox"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    expected = LLM(qwen3_path, block_size=16).generate(["The quick brown fox"], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)[0].text
    assert res.stdout == expected + "\n"
    assert "finish_reason=length" in res.stderr


def test_cli_help_and_errors(tmp_path):
    res = subprocess.run([sys.executable, "-m", "zipserve.cluster.cli", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "generate" in res.stdout
    res = subprocess.run([sys.executable, "-m", "zipserve.cluster.cli", "generate", "--model", str(tmp_path), "hi"],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "no config.json" in res.stderr


ROOT = Path(__file__).resolve().parents[1]
SOURCE_FOLDERS = ("cluster", "workers", "scheduler", "kernels")


def test_our_kernels_never_shadow_hugging_faces_even_from_the_checkout_root():
    """transformers imports Hugging Face's `kernels` (a dependency of it); ours is `zipserve.kernels`."""
    code = ("import importlib.util, json, transformers.integrations.hub_kernels; "
            "import zipserve.kernels.paged_attention as pa; "
            "from transformers.utils.import_utils import is_kernels_available; "
            "s = importlib.util.find_spec('kernels'); "
            "print(json.dumps([s and s.origin, pa.__file__, is_kernels_available()]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    theirs, ours, available = json.loads(out.stdout.strip().splitlines()[-1])
    assert ours == str(ROOT / "kernels" / "paged_attention.py")
    assert theirs is None or not theirs.startswith(str(ROOT / "kernels")), theirs
    try:
        installed = importlib.metadata.version("kernels") is not None
    except importlib.metadata.PackageNotFoundError:
        installed = False
    assert theirs is not None if installed else not available


def test_no_module_imports_a_source_folder_by_its_bare_name():
    """`import workers` would work from the checkout root only by accident, and `kernels` is someone else's."""
    offenders = []
    for folder in (*SOURCE_FOLDERS, "tests", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
                offenders += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names
                              if n.split(".")[0] in SOURCE_FOLDERS]
    assert not offenders, offenders


def test_benchmarks_never_import_the_tests():
    """Benchmarks run from an installed package too, where tests/ is absent: what both need (a random model
    folder, say) lives in the package (zipserve.workers.models.random_folder)."""
    offenders = []
    for path in (ROOT / "benchmarks").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n.split(".")[0] == "tests"]
    assert not offenders, offenders


def test_the_models_package_does_not_load_the_random_folder_builder():
    """zipserve.workers.models is what serving imports; the builder would pull transformers along."""
    code = ("import sys, zipserve.workers.models; "
            "print(sorted(m for m in ('transformers', 'zipserve.workers.models.random_folder') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


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
    code = ("import sys, zipserve.workers, zipserve.workers.sampling_params; "
            "print(sorted(m for m in sys.modules if m.rpartition('.')[0] == 'zipserve.workers' "
            "and m.rpartition('.')[2] in ('engine', 'model_runner', 'llm')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
    code = "from zipserve.workers import LLM, SamplingParams; print(LLM.__module__, SamplingParams.__module__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["zipserve.workers.llm", "zipserve.workers.sampling_params"], out.stderr
