import os

import torch

# Without a GPU, Triton kernels run in the interpreter; it must be on before any kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from tests.tiny_models import build_model_folder

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory):
    """Build (once per session) a tiny model folder for a given set of options."""
    cache = {}

    def make(arch="qwen3", **kw):
        key = (arch, tuple(sorted((k, repr(v)) for k, v in kw.items())))
        if key not in cache:
            path = str(tmp_path_factory.mktemp(f"{arch}-model"))
            cache[key] = build_model_folder(path, arch, **kw)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def qwen3_path(model_factory):
    return model_factory("qwen3")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
