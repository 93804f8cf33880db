"""The one precision vocabulary: how a stored candidate vector is held, from the command line
through index.json to the kernels' dispatch.

    float32, bfloat16, float16   a float index in that dtype
    int8                         a code a number and a float32 scale a vector (beside a float copy)
    binary                       a sign bit a number and a float32 scale a vector (beside a float copy)

`bf16` (and fp16 / fp32) are accepted on input as the short spellings; what is written and
printed is always the long name. The rules of the numbers themselves are machinery/index.py's.
"""
from enum import StrEnum

import torch


class Precision(StrEnum):
    """A precision: a str (it compares, prints and serialises as its name), parsed from any
    spelling by Precision.parse."""
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"
    INT8 = "int8"
    BINARY = "binary"

    @classmethod
    def parse(cls, value, name="precision"):
        """'bf16' / 'bfloat16' / a torch dtype / a Precision -> Precision; anything else is one
        ValueError naming `name` and the accepted names."""
        if isinstance(value, torch.dtype):
            value = str(value).removeprefix("torch.")
        text = str(value).strip().lower()
        text = SHORT.get(text, text)
        if text not in cls._value2member_map_:
            raise ValueError(f"{name} {value!r} is none of {', '.join(cls)} (bf16 is accepted for bfloat16)")
        return cls(text)

    def __repr__(self):                 # as its plain name, in argparse's messages and printed dicts
        return repr(self.value)

    @property
    def quantized(self):
        """int8 / binary: fewer bits than a float, each vector with a float32 scale."""
        return self in (Precision.INT8, Precision.BINARY)

    @property
    def dtype(self):
        """The torch dtype of a float precision (None for int8 / binary)."""
        return FLOATS.get(self)

    def vector_bytes(self, D):
        """Bytes one stored vector of D numbers takes: the one rule behind every bytes-per-candidate
        figure (r_c * vector_bytes)."""
        if self == Precision.INT8:
            return D + 4                                   # codes + a float32 scale
        if self == Precision.BINARY:
            return -(-D // 8) + 4                          # sign bits + a float32 scale
        return D * self.dtype.itemsize


SHORT = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
FLOATS = {Precision.FLOAT32: torch.float32, Precision.BFLOAT16: torch.bfloat16, Precision.FLOAT16: torch.float16}
QUANTIZED = (Precision.INT8, Precision.BINARY)


def default_float(D):
    """The one default: bfloat16 (the paper's index) from D = 128 up; float32 below, where bf16's
    8 bits turn near-ties of small vectors (the offline model's D = 4) into reorderings."""
    return Precision.BFLOAT16 if D >= 128 else Precision.FLOAT32


def of(c):
    """The precision of candidates as a kernel sees them: a float tensor's dtype, or a quantized
    index's own (anything with a .precision)."""
    return Precision.parse(c.precision if hasattr(c, "precision") else c.dtype)


def vector_bytes(D, precision):
    """Bytes one stored vector takes at a precision (any spelling Precision.parse takes)."""
    return Precision.parse(precision).vector_bytes(D)


def of_index(meta):
    """The precision an index.json records, normalised: its "precision" if int8 / binary, else its
    float "dtype" (old indexes wrote "bf16" or nothing for a float index: the dtype is what they hold)."""
    p = meta.get("precision")
    p = Precision.parse(p, "index.json's precision") if p is not None else None
    return p if p is not None and p.quantized else Precision.parse(meta["dtype"], "index.json's dtype")


def argument(text):
    """argparse's type= for a --precision flag: any spelling -> Precision, a bad one argparse's one line."""
    import argparse
    try:
        return Precision.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
