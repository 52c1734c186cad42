import os
import sys
from pathlib import Path

import pytest

# One thread: the tiny models gain nothing from a second, and on a busy 2-core machine two OpenMP threads
# spin against other work (measured 20x slower under load).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

import checkpoints  # noqa: E402


@pytest.fixture(scope="session")
def qwen3_dir(tmp_path_factory):
    """A Qwen3-MoE with dense layers between MoE layers (decoder_sparse_step=2), saved by transformers."""
    return checkpoints.make_qwen3_moe(tmp_path_factory.mktemp("qwen3"), decoder_sparse_step=2)


@pytest.fixture(scope="session")
def olmoe_dir(tmp_path_factory):
    return checkpoints.make_olmoe(tmp_path_factory.mktemp("olmoe"))


@pytest.fixture(scope="session")
def grove_dir(tmp_path_factory):
    return checkpoints.make_grove(tmp_path_factory.mktemp("grove"))
