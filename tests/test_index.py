"""machinery/index.py: the on-disk format, its precisions (machinery/precision.py's names) and prefixes."""
import json
import os

import numpy as np
import pytest
import torch

import evaluate
from machinery import cpu_kernel, index
from machinery.precision import Precision


GROUPS = ((1, 1), (2, 4), (4, 8))


def unit(N, R, D, seed):
    return torch.nn.functional.normalize(torch.randn(N, R, D, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.mark.parametrize("precision", ["int8", "binary"])
def test_a_low_bit_index_keeps_its_codes_and_the_float_copy(tmp_path, precision):
    """create(precision=...) writes the low-bit groups beside the float copy; a prefix at the index's
    precision reads back exactly what quantize() makes of the written rows (ranges and lists of
    rows), the float prefix the float copy; index.json's sizes catch a truncated code file."""
    x = unit(10, 8, 20, 0)
    v = index.create(tmp_path, 10, 8, 20, GROUPS, "bfloat16", precision)
    v[0:6] = x[:6]
    v[6:10] = x[6:]
    index.write_meta(tmp_path, v.meta)
    v = index.open_vectors(tmp_path)
    assert v.meta["precision"] == precision and v.precision == precision
    want = index.quantize(x, precision)
    for r in (1, 4, 8):
        got = v.prefix(r, precision)[2:9]
        assert torch.equal(got.codes, want.codes[2:9, :r]) and torch.equal(got.scale, want.scale[2:9, :r])
        rows = v.prefix(r, precision)[[7, 0, 3]]
        assert torch.equal(rows.codes, want.codes[[7, 0, 3], :r])
        assert torch.equal(v.prefix(r)[0:10], x[:, :r].bfloat16())                    # the float copy
    width = 20 if precision == "int8" else 3
    sizes = dict(v.file_sizes())
    assert sizes[os.path.join(tmp_path, f"group-4-8.{precision}.bin")] == 10 * 4 * width
    assert sizes[os.path.join(tmp_path, "group-4-8.scale.bin")] == 10 * 4 * 4
    with pytest.raises(ValueError, match="holds .* not int8|holds .* not binary"):
        v.prefix(4, "binary" if precision == "int8" else "int8")
    os.truncate(tmp_path / f"group-1-4.{precision}.bin", 7)
    with pytest.raises(ValueError, match=f"group-1-4.{precision}.bin is 7 bytes"):
        index.open_vectors(tmp_path)


def test_keep_float_drops_the_float_groups_past_it_and_a_read_of_one_is_one_line(tmp_path):
    """float_r_c 4 (--keep-float 4): group-4-8.bin is never created; the low bits of every group and
    the float copy of vectors 1-4 read back as written; a float read past 4 is one line naming the
    missing file, rescore_view reads the low bits there; checksums and the NaN scan cover the files
    that exist (a NaN scale in a group without its float copy is found)."""
    x = unit(10, 8, 20, 4)
    assert index.keep_float("all", 8, GROUPS, "int8") is None and index.keep_float("8", 8, GROUPS, "int8") is None
    assert index.keep_float("none", 8, GROUPS, "binary") == 0 and index.keep_float(" 4", 8, GROUPS, "int8") == 4
    with pytest.raises(ValueError, match=r"^--keep-float 3: give all, none, or an r_c the index stores \(1, 4, 8\)$"):
        index.keep_float("3", 8, GROUPS, "int8")
    with pytest.raises(ValueError, match=r"^--keep-float none: only an int8 / binary index can drop its float copy"):
        index.keep_float("none", 8, GROUPS, "bfloat16")
    assert index.create(tmp_path / "all", 10, 8, 20, GROUPS, "bfloat16", "int8", None).meta == \
        index.create(tmp_path / "old", 10, 8, 20, GROUPS, "bfloat16", "int8").meta      # all: today's index.json
    v = index.create(tmp_path, 10, 8, 20, GROUPS, "bfloat16", "int8", 4)
    v[0:10] = x
    index.write_meta(tmp_path, {**v.meta, "checksums": index.checksums(v)})
    v = index.open_vectors(tmp_path)
    assert v.meta["float_r_c"] == 4 and not (tmp_path / "group-4-8.bin").exists()
    assert (tmp_path / "group-1-4.bin").exists() and (tmp_path / "group-4-8.int8.bin").exists()
    assert "group-4-8.bin" not in v.meta["checksums"] and "group-4-8.int8.bin" in v.meta["checksums"]
    want = index.quantize(x, "int8")
    got = v.prefix(8, "int8")[[9, 2]]
    assert torch.equal(got.codes, want.codes[[9, 2]]) and torch.equal(got.scale, want.scale[[9, 2]])
    assert torch.equal(v.prefix(4)[0:10], x[:, :4].bfloat16())
    with pytest.raises(ValueError, match=r"^index .* has no group-4-8.bin \(built with --keep-float 4: the float copy "
                                         r"of vectors 1-4 only\): r_c=8 is held in int8 alone$"):
        v.prefix(8)
    assert isinstance(v.rescore_view(4), index.Prefix) and isinstance(v.rescore_view(8), index.QuantizedPrefix)
    assert index.non_finite_rows(v) == []
    s = np.memmap(tmp_path / "group-4-8.scale.bin", dtype=np.float32, mode="r+").reshape(10, 4)
    s[6, 1] = np.nan
    s.flush()
    assert index.non_finite_rows(v) == [6]


def test_float_r_c_in_index_json_is_checked(tmp_path):
    """float_r_c must be 0 or a group end, and only in a low-bit index; an index.json without it (every
    index written before it) keeps its whole float copy."""
    v = index.create(tmp_path, 3, 8, 20, GROUPS, "bfloat16", "binary")
    v[0:3] = unit(3, 8, 20, 5)
    index.write_meta(tmp_path, v.meta)
    assert index.open_vectors(tmp_path).float_r_c == 8
    for meta, said in (({"float_r_c": 3}, "float_r_c 3 is not 0 or a group end"),
                       ({"float_r_c": -1}, "float_r_c -1 is not a whole number >= 0"),
                       ({"float_r_c": 0, "precision": "bfloat16"}, "float_r_c 0 is not 0 or a group end of a low-bit")):
        index.write_meta(tmp_path, {**v.meta, **meta})
        with pytest.raises(ValueError, match=f"index.json is damaged \\({said}"):
            index.open_vectors(tmp_path)


def test_one_precision_vocabulary_and_old_index_json_normalised_at_read(tmp_path):
    """One vocabulary (bf16 only a spelling of bfloat16) from the flag to the kernel's dispatch; an
    index.json written by the old code ("precision": "bf16" beside its float dtype, or none) opens
    as that float dtype with the same vectors; an unknown precision is one line."""
    assert Precision.parse("bf16") == "bfloat16" == Precision.parse(torch.bfloat16) == Precision.parse(" BFloat16 ")
    with pytest.raises(ValueError, match="--precision 'fp8' is none of float32, bfloat16, float16, int8, binary"):
        Precision.parse("fp8", "--precision")
    x = unit(5, 8, 20, 1)
    v = index.create(tmp_path, 5, 8, 20, GROUPS, "float32", "bf16")     # a float precision: the float copy alone
    v[0:5] = x
    assert "precision" not in v.meta and v.meta["dtype"] == "float32"
    for old in ({"precision": "bf16"}, {}, {"precision": "float32"}):    # as the old code wrote it: no checksums
        json.dump({**v.meta, **old}, open(tmp_path / "index.json", "w"))
        w = index.open_vectors(tmp_path)
        assert w.precision == Precision.FLOAT32 and not w.quantized and w.float_vector_bytes == 20 * 4
        assert torch.equal(w[:, :8][0:5], x)
    index.write_meta(tmp_path, {**v.meta, "precision": "int4"})
    with pytest.raises(ValueError, match="index.json is damaged .*'int4' is none of int8, binary"):
        index.open_vectors(tmp_path)
    q, c = unit(2, 1, 20, 2), unit(3, 4, 20, 3)
    assert [cpu_kernel.regime(q, y).split("/")[3] for y in (c, c.bfloat16(), c.half(), index.quantize(c, "int8"),
                                                            index.quantize(c, "binary"))] == list(Precision)


def test_bytes_per_vector_rule():
    assert [index.vector_bytes(3584, p) for p in ("bf16", "bfloat16", "float32", "int8", "binary")] == \
        [7168, 7168, 14336, 3588, 452]
    assert index.vector_bytes(21, "binary") == 3 + 4


def test_quantize_refuses_an_unknown_precision():
    with pytest.raises(ValueError, match="precision 'int4'"):
        index.quantize(torch.zeros(1, 1, 8), "int4")
    with pytest.raises(ValueError, match="precision 'int4'"):
        index.create("/tmp/never", 1, 1, 8, GROUPS, "bfloat16", "int4")
def test_on_disk_index_round_trip(tmp_path):
    """The one on-disk format (machinery/index.py): written batch by batch, group by group, read back
    by ranges, lists, tensors and prefix views; a prefix between group boundaries reads the next."""
    from machinery import index
    x = torch.randn(10, 6, 4).bfloat16()
    f = index.create(tmp_path / "c", 10, 6, 4, ((1, 1), (2, 4), (6, 6)), "bfloat16")
    f[0:4], f[4:10] = x[:4].float(), x[4:]                 # cast to the index's dtype on write
    sizes = {p.name: p.stat().st_size for p in (tmp_path / "c").iterdir()}
    assert sizes == {"group-0-1.bin": 10 * 1 * 4 * 2, "group-1-4.bin": 10 * 3 * 4 * 2, "group-4-6.bin": 10 * 2 * 4 * 2}
    assert torch.equal(f[2:7], x[2:7]) and torch.equal(f[torch.tensor([9, 0, 9])], x[[9, 0, 9]])
    b = f[:, :3]                                             # a prefix: nothing read yet
    assert b.shape == (10, 3, 4) and torch.equal(b[5:8], x[5:8, :3]) and torch.equal(b[[1]], x[[1], :3])
    assert torch.equal(f[:, :1][0:10], x[:, :1]) and torch.equal(f[::3], x[::3])
    index.write_meta(tmp_path / "c", f.meta)
    assert torch.equal(index.open_vectors(tmp_path / "c")[:, :4][3:5], x[3:5, :4])   # reopened from index.json
    with pytest.raises(ValueError, match="only prefixes"):
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


