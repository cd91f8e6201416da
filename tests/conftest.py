import os

import fsspec
import pytest
import torch

# Tests are CPU-only and small; one intra-op thread keeps them deterministic and avoids oversubscribing
# the two cores when subprocesses run beside pytest.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _run_in_tmp(tmp_path, monkeypatch):
    """Each test runs in its own empty directory, so the Trainer's default checkpoint_dir ("checkpoints")
    and log_dir ("runs") land there and never in the repository."""
    monkeypatch.chdir(tmp_path)
    yield


@pytest.fixture
def memfs():
    """The memory filesystem is one global store: empty it before and after each test."""
    fs = fsspec.filesystem("memory")

    def clear():
        fs.store.clear()
        fs.pseudo_dirs.clear()
        fs.pseudo_dirs.append("")

    clear()
    yield fs
    clear()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


os.environ.setdefault("PYTHONHASHSEED", "0")
