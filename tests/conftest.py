import os
import sys

import pytest
import torch

if not torch.cuda.is_available():  # run the Triton kernel in its CPU interpreter (set before import)
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny():
    """One tiny MetaEmbed per test session (tests that train copy it or build their own)."""
    from metaembed import MetaEmbed
    return MetaEmbed.from_backbone("tiny", seed=0)


def write_hub_repo(root, configs, features=None):
    """A local folder laid out like a hub dataset repo: CONFIG/SPLIT-00000-of-00001.parquet per
    config and split, and the README's `configs:` header that maps them (as on the hub)."""
    import datasets
    root.mkdir(parents=True, exist_ok=True)
    header = ["---", "configs:"]
    for name, splits in configs.items():
        header += [f"- config_name: {name}", "  data_files:"]
        for split, rows in splits.items():
            (root / name).mkdir(exist_ok=True)
            ds = datasets.Dataset.from_list(rows, features=features)
            ds.to_parquet(str(root / name / f"{split}-00000-of-00001.parquet"))
            header += [f"  - split: {split}", f"    path: {name}/{split}-*"]
    (root / "README.md").write_text("\n".join(header + ["---", "", "A local copy for tests."]) + "\n")
    return str(root)
