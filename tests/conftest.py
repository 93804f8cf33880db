import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny():
    """One tiny MetaEmbed per test session (tests that train copy it or build their own)."""
    from metaembed import MetaEmbed
    return MetaEmbed.from_backbone("tiny", seed=0)
