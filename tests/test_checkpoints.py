"""machinery/checkpoints.py: the model folder, its integrity checks, latest / resolve."""
import pytest

from metaembed import MetaEmbed


def test_incomplete_checkpoint_is_named_before_anything_is_built(tmp_path):
    from machinery.checkpoints import checkpoint_problem
    m = MetaEmbed.from_backbone("tiny")
    for name, damage, said in (("config.json", "delete", "config.json is missing"),
                               ("model.safetensors", "truncate", "model.safetensors is truncated"),
                               ("metaembed.json", "truncate", "metaembed.json is corrupt"),
                               ("tokenizer.json", "delete", "tokenizer.json is missing")):
        ck = tmp_path / name
        m.save_pretrained(ck)
        assert checkpoint_problem(str(ck)) is None
        f = ck / name
        f.unlink() if damage == "delete" else f.write_bytes(f.read_bytes()[:len(f.read_bytes()) // 2])
        with pytest.raises(FileNotFoundError, match=f"is incomplete: {said}"):
            MetaEmbed.from_pretrained(ck)
