import pytest
import torch

from moe_edge.testing import write_checkpoint


@pytest.fixture(scope="session")
def tiny_deepseek(tmp_path_factory):
    """A tiny random DeepSeek-MoE checkpoint with a byte-level tokenizer (fp32)."""
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-deepseek", "deepseek")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def _expert_cache_dir(tmp_path_factory):
    """Disk expert stores go to a temporary folder, never to the user's ~/.cache."""
    import os
    os.environ["MOE_EDGE_CACHE"] = str(tmp_path_factory.mktemp("expert-cache"))
