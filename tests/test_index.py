"""machinery/index.py: the on-disk format, its precisions (bf16, int8, binary) and prefixes."""
import os

import pytest
import torch

from machinery import index


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


def test_bytes_per_vector_rule():
    assert [index.vector_bytes(3584, p) for p in ("bf16", "bfloat16", "float32", "int8", "binary")] == \
        [7168, 7168, 14336, 3588, 452]
    assert index.vector_bytes(21, "binary") == 3 + 4


def test_quantize_refuses_an_unknown_precision():
    with pytest.raises(ValueError, match="precision 'int4'"):
        index.quantize(torch.zeros(1, 1, 8), "int4")
    with pytest.raises(ValueError, match="precision 'int4'"):
        index.create("/tmp/never", 1, 1, 8, GROUPS, "bfloat16", "int4")
