"""Every benchmark result records where it came from (commit, command, card, versions)."""

import json
import pathlib
import re
import subprocess
import sys

import torch

from benchmarks import provenance

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_a_result_records_git_head_command_card_and_versions(tmp_path, monkeypatch):
    monkeypatch.delenv("ZIPSERVE_COMMIT", raising=False)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    monkeypatch.setattr(sys, "argv", [str(ROOT / "benchmarks" / "throughput.py"), "--lengths", "8192"])
    path = tmp_path / "r.json"
    provenance.write_result(str(path), {"benchmark": "x", "rows": [1, 2]})
    got = json.loads(path.read_text())
    assert got["commit"] == (head or "unknown")
    assert got["command"] == "python -m benchmarks.throughput --lengths 8192"
    assert got["versions"]["torch"] == torch.__version__
    if torch.cuda.is_available():
        assert got["card"] == torch.cuda.get_device_name(0)
    else:
        assert got["card"].startswith("cpu")
    assert got["rows"] == [1, 2] and got["benchmark"] == "x"


def test_the_commit_named_by_the_environment_and_the_benchmarks_own_keys_win(tmp_path, monkeypatch):
    monkeypatch.setenv("ZIPSERVE_COMMIT", "abc123")
    path = tmp_path / "r.json"
    provenance.write_result(str(path), {"command": "merged by hand"})
    got = json.loads(path.read_text())
    assert got["commit"] == "abc123" and got["command"] == "merged by hand"


def test_every_benchmark_writes_its_result_through_write_result():
    """A json.dump to a file in a benchmark would be a result without provenance."""
    allowed = {("benchmarks/decode_step.py", "cfg"),  # a model config folder, not a result
               ("benchmarks/throughput.py", "spec"),  # the vLLM process's instructions
               ("benchmarks/vllm_engine.py", "result")}  # its figures back to the parent, which writes the result
    offenders = []
    for p in sorted((ROOT / "benchmarks").rglob("*.py")):
        rel = p.relative_to(ROOT).as_posix()
        if rel == "benchmarks/provenance.py":
            continue
        for m in re.finditer(r"json\.dump\((\w+), f", p.read_text()):
            if (rel, m.group(1)) not in allowed:
                offenders.append(f"{rel}: json.dump({m.group(1)}, f)")
    assert not offenders, offenders
