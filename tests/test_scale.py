"""bench/scale.py (python -m bench --scale): the stub encoder's structure and the study's rows."""
import pytest
import torch

from bench import scale
from maxsim import maxsim_topk


def test_the_stub_is_streamed_deterministically_and_its_first_vector_finds_the_topic():
    """Candidates come a batch at a time from (seed, batch): the same rows whatever is asked; a query's
    exhaustive 16x64 top 1 is the candidate it was copied from, and the 1x1 score ranks the rest of its
    topic first (the structure that makes a cascade's recall mean something)."""
    N = 700
    topics = scale.centres(N)
    x = scale.candidates(0, N, N, topics)                                  # (N, 64, 128)
    assert x.shape == (N, 64, 128) and torch.allclose(x.norm(dim=-1), torch.ones(N, 64), atol=1e-5)
    assert torch.equal(x[:5], scale.candidates(0, 5, N, topics))
    q = scale.queries(N, topics, 6)
    top = maxsim_topk(q, x, 10, exact=True)[1]
    g = torch.Generator().manual_seed(scale.SEED + 7)
    targets = torch.randint(0, N, (6,), generator=g)
    assert torch.equal(top[:, 0], targets)                                 # the copied candidate first
    same_topic = (top % len(topics)) == (targets % len(topics))[:, None]
    assert same_topic.float().mean() >= 0.9                                # the top 10: its own topic
    first = maxsim_topk(q[:, :1], x[:, :1], scale.TOPIC_SIZE, exact=True)[1]
    assert ((first % len(topics)) == (targets % len(topics))[:, None]).float().mean() >= 0.9


def test_the_study_writes_every_method_with_the_row_schema(tmp_path):
    """A tiny study (N = 600, 4 queries, depth 100, in this process): one row per method with the issue's
    fields; the exhaustive method's recall against the exact top 10 is 1.0; disk and memory measured."""
    rows = scale.study([600], str(tmp_path), count=4, depth=100, log=lambda *a: None, isolate=False)
    assert [r["method"] for r in rows] == list(scale.METHODS)
    for r in rows:
        assert {"n", "method", "p50_ms", "p95_ms", "recall_at_10", "build_s", "peak_rss_mb", "disk_bytes"} <= set(r)
        assert r["n"] == 600 and 0 < r["p50_ms"] <= r["p95_ms"] and r["build_s"] > 0 and r["disk_bytes"] > 0
        assert r["peak_rss_mb"] > 50 and 0 <= r["recall_at_10"] <= 1
    by = {r["method"]: r for r in rows}
    assert by["exhaustive 16x64"]["recall_at_10"] == 1.0
    assert by["cascade 1x1->16x64"]["recall_at_10"] >= 0.9 and by["engine hnsw"]["recall_at_10"] >= 0.9
    assert 1 <= by["exhaustive 16x64"]["disk_bytes"] / (600 * 64 * 128 * 2) < 1.01  # the bf16 16x64 index (+ its json)
    assert not list(tmp_path.iterdir())                                           # the work folder removed


def test_the_keep_float_rows(tmp_path):
    """--keep-float all / none on int8 and binary (N = 600): each row builds its own index; without the
    float copy the disk is the low bits alone (int8: about half of bf16, binary: about a 12th) and
    recall is measured, not assumed; int8 rescored from its codes keeps the exhaustive bf16 top 10."""
    rows = scale.study([600], str(tmp_path), count=4, depth=100, log=lambda *a: None, isolate=False,
                       methods=scale.KEEP_FLOAT)
    by = {r["method"]: r for r in rows}
    assert list(by) == list(scale.KEEP_FLOAT)
    bf16 = 600 * 64 * 128 * 2
    for p, low in (("int8", 600 * 64 * (128 + 4)), ("binary", 600 * 64 * (16 + 4))):
        kept, none = by[f"cascade {p} + bf16 copy"], by[f"cascade {p}, no float copy"]
        assert 1 <= none["disk_bytes"] / low < 1.1 and 1 <= kept["disk_bytes"] / (low + bf16) < 1.1   # + items, blocks
        assert none["stored"] == f"16x64 {p}" and 0 <= none["recall_at_10"] <= kept["recall_at_10"] + 0.1
    assert by["cascade int8 + bf16 copy"]["recall_at_10"] >= 0.9 and by["cascade int8, no float copy"]["recall_at_10"] >= 0.9
