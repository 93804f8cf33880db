"""machinery/index.py: the one on-disk index format (groups stored contiguously, a dtype per index)."""
import os

import pytest
import torch

import evaluate


def test_on_disk_index_round_trip(tmp_path):
    """The one on-disk format (machinery/index.py): written batch by batch, group by group, read back
    by ranges, lists, tensors and budget views; a budget between group boundaries reads the next."""
    from machinery import index
    x = torch.randn(10, 6, 4).bfloat16()
    f = index.create(tmp_path / "c", 10, 6, 4, ((1, 1), (2, 4), (6, 6)), "bfloat16")
    f[0:4], f[4:10] = x[:4].float(), x[4:]                 # cast to the index's dtype on write
    sizes = {p.name: p.stat().st_size for p in (tmp_path / "c").iterdir()}
    assert sizes == {"group-0-1.bin": 10 * 1 * 4 * 2, "group-1-4.bin": 10 * 3 * 4 * 2, "group-4-6.bin": 10 * 2 * 4 * 2}
    assert torch.equal(f[2:7], x[2:7]) and torch.equal(f[torch.tensor([9, 0, 9])], x[[9, 0, 9]])
    b = f[:, :3]                                             # a budget: nothing read yet
    assert b.shape == (10, 3, 4) and torch.equal(b[5:8], x[5:8, :3]) and torch.equal(b[[1]], x[[1], :3])
    assert torch.equal(f[:, :1][0:10], x[:, :1]) and torch.equal(f[::3], x[::3])
    index.write_meta(tmp_path / "c", f.meta)
    assert torch.equal(index.open_vectors(tmp_path / "c")[:, :4][3:5], x[3:5, :4])   # reopened from index.json
    with pytest.raises(ValueError, match="prefix budgets"):
        f[:, 1:3]


def test_on_disk_index_and_dtypes_agree(tmp_path):
    """--index-dir scores the same as the in-memory index; bf16 and float32 indexes agree to rounding."""
    common = ["--backbone", "tiny", "--synthetic-scenes", "12", "--budgets", "1,16,64", "--batch-size", "16",
              "--index-dtype", "bfloat16"]
    mem = evaluate.main(common)
    disk = evaluate.main(common + ["--index-dir", str(tmp_path / "idx")])
    f32 = evaluate.main(common + ["--index-dtype", "float32"])
    assert evaluate.main(common[:-2])["index_dtype"] == "float32"     # the default under 128 dimensions
    assert sorted(os.listdir(disk["index_dir"])) == ["i2t", "t2i"] and disk["index_dir"].startswith(str(tmp_path / "idx"))
    for t in ("t2i", "i2t"):
        for b in ("1x1", "8x16", "16x64"):
            for m in ("NDCG@10", "P@1", "Recall@5"):
                assert mem["tasks"][t][b][m] == disk["tasks"][t][b][m]
                assert abs(mem["tasks"][t][b][m] - f32["tasks"][t][b][m]) <= 0.1
    assert mem["summary"]["16x64"]["bytes_per_candidate"] == 64 * mem["dim"] * 2
    assert f32["summary"]["16x64"]["bytes_per_candidate"] == 64 * mem["dim"] * 4
