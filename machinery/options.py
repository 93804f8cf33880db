"""How a tool encodes and scores, not what: one small options object for the paper's encode and
evaluate functions (metaembed.encode, evaluate.encode_unique / score_retrieval / score_mmeb)."""
from dataclasses import dataclass

import torch

from machinery.precision import Precision


@dataclass
class ScoringOptions:
    """How a tool encodes and scores, not what: batches of `batch_size` prepared by `workers`
    processes (0: in this one), a progress bar; candidates held in `precision` (machinery/precision.py:
    a float dtype, or int8 / binary quantised from a `float_copy`, default bfloat16), on disk at
    `index_path` (None: in memory), scored on `device` by the MaxSim `backend` (None: maxsim's own)."""
    batch_size: int = 32
    workers: int = 0
    progress: bool = False
    precision: str = "bfloat16"
    float_copy: str | None = None
    index_path: str | None = None
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    def __post_init__(self):
        self.precision = Precision.parse(self.precision)
        self.float_copy = self.precision if not self.precision.quantized else \
            Precision.parse(self.float_copy or Precision.BFLOAT16, "float_copy")
        self.device = torch.device(self.device)
