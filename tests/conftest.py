import os
import sys
import tempfile

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")   # tests never reach a hub: a hub id fails at once
if not torch.cuda.is_available():  # run the Triton kernel in its CPU interpreter (set before import)
    os.environ.setdefault("TRITON_INTERPRET", "1")

# the tests' own kernel cache: a dispatch measured by an earlier run (or by the user's own work)
# would otherwise decide which path tests that call maxsim() without a backend exercise
os.environ["METAEMBED_CACHE"] = tempfile.mkdtemp(prefix="metaembed-test-cache-")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny():
    """One tiny MetaEmbed per test session (tests that train copy it or build their own)."""
    from metaembed import MetaEmbed
    return MetaEmbed.from_backbone("tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny):
    """The session's tiny MetaEmbed saved once as a checkpoint folder (for the CLIs)."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    tiny.save_pretrained(path)
    return str(path)


def brute_maxsim(q, c, q_mask=None, c_mask=None):
    """The tests' MaxSim reference: the project's one verification reference (float64, masks as
    maxsim's, NaN propagating), machinery.checks.maxsim_float64."""
    from machinery.checks import maxsim_float64
    return maxsim_float64(q, c, q_mask, c_mask)


def write_hub_repo(root, configs, features=None):
    """A local folder laid out like a hub dataset repo: CONFIG/SPLIT-00000-of-00001.parquet per
    config and split, and the README's `configs:` header that maps them (as on the hub).
    features: one datasets.Features for every config, or a dict of them by config name."""
    import datasets
    root.mkdir(parents=True, exist_ok=True)
    header = ["---", "configs:"]
    for name, splits in configs.items():
        header += [f"- config_name: {name}", "  data_files:"]
        for split, rows in splits.items():
            (root / name).mkdir(exist_ok=True)
            feats = features if features is None or isinstance(features, datasets.Features) else features.get(name)
            ds = datasets.Dataset.from_list(rows, features=feats)
            ds.to_parquet(str(root / name / f"{split}-00000-of-00001.parquet"))
            header += [f"  - split: {split}", f"    path: {name}/{split}-*"]
    (root / "README.md").write_text("\n".join(header + ["---", "", "A local copy for tests."]) + "\n")
    return str(root)


def save_hub_layout_backbone(path, family="qwen2_vl", **sizes):
    """A tiny random model of a family (sizes: TINY overrides) saved as a hub repo like
    Qwen/Qwen2-VL-2B-Instruct is laid out (machinery.backbones.save_hub_layout)."""
    from machinery.backbones import build_tiny_backbone, save_hub_layout
    base, processor = build_tiny_backbone(seed=0, family=family, **sizes)
    return save_hub_layout(base.config, processor.tokenizer, path, base_state=base.state_dict())


@pytest.fixture(scope="session")
def hub_backbone(tmp_path_factory):
    return save_hub_layout_backbone(tmp_path_factory.mktemp("hub") / "Qwen2-VL-tiny")
