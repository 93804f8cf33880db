"""apps/search_index.py through search.py: an index knows its model and checks its own files, a
Qdrant collection is tied to its index, every input problem (texts, PDFs, image folders, flags)
is one named line."""
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import search
from apps import search_index
from metaembed import MetaEmbed


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("cks")
    for seed in (1, 2):
        MetaEmbed.from_backbone("tiny", seed=seed, proj_dim=8).save_pretrained(root / f"ck{seed}")
    return str(root / "ck1"), str(root / "ck2")


@pytest.fixture(scope="module")
def scenes(two_checkpoints, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("idx") / "scenes")
    search.main(["index", "--checkpoint", two_checkpoints[0], "--out", out, "--synthetic-scenes", "12"])
    return out


def pictures(folder, n=10):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (40, 40), (25 * i, 0, 200 - 20 * i)).save(folder / f"p{i}.png")
    return folder


def fails(argv, said, tool=search.main):
    with pytest.raises(SystemExit, match=said):
        tool(argv)


# 1. a resumed index with another checkpoint
def test_a_resumed_index_refuses_another_checkpoint(two_checkpoints, tmp_path, monkeypatch):
    a, b = two_checkpoints
    pics = pictures(tmp_path / "pics")
    monkeypatch.setattr(search_index, "SHARD", 4)
    real, calls = MetaEmbed.encode_candidates, []

    def crash_on_second_shard(self, *args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated crash")
        return real(self, *args, **kw)
    monkeypatch.setattr(MetaEmbed, "encode_candidates", crash_on_second_shard)
    fails(["index", "--checkpoint", a, "--out", str(tmp_path / "idx"), "--images", str(pics)], "interrupted; run the same")
    monkeypatch.setattr(MetaEmbed, "encode_candidates", real)
    fails(["index", "--checkpoint", b, "--out", str(tmp_path / "idx"), "--images", str(pics)],
          r"encoded by checkpoint .*ck1 \(fingerprint \w+\), not by .*ck2")
    search.main(["index", "--checkpoint", a, "--out", str(tmp_path / "idx"), "--images", str(pics)])   # a finishes it


# 2. a checkpoint folder whose contents changed under the index
def test_a_query_refuses_a_changed_checkpoint(two_checkpoints, tmp_path, capsys):
    a, b = two_checkpoints
    ck = tmp_path / "ck"
    shutil.copytree(a, ck)
    search.main(["index", "--checkpoint", str(ck), "--out", str(tmp_path / "idx"), "--synthetic-scenes", "4"])
    before = search.main(["query", "--index", str(tmp_path / "idx"), "red top left", "-k", "3", "--json"])
    shutil.rmtree(ck)
    shutil.copytree(b, ck)                                     # retrained into the same folder
    fails(["query", "--index", str(tmp_path / "idx"), "red top left"], "is not the one .* was built with .*rebuild")
    shutil.copytree(a, tmp_path / "moved")                     # the right one, elsewhere
    again = search.main(["query", "--index", str(tmp_path / "idx"), "red top left", "-k", "3", "--json",
                         "--checkpoint", str(tmp_path / "moved")])
    assert [r["id"] for r in again] == [r["id"] for r in before]


# 3. and 7. Qdrant: a collection belongs to one index, uploads can be completed, clients are checked first
def test_qdrant_collections_are_tied_to_their_index(two_checkpoints, scenes, tmp_path, capsys):
    a, b = two_checkpoints
    other = str(tmp_path / "other")
    search.main(["index", "--checkpoint", b, "--out", other, "--synthetic-scenes", "4"])
    where = str(tmp_path / "qdrant")
    search.main(["push", "--index", scenes, "--qdrant", where])
    fails(["push", "--index", other, "--qdrant", where], "holds another index .* --overwrite")
    search.main(["push", "--index", other, "--qdrant", where, "--overwrite"])
    fails(["query", "--index", scenes, "--qdrant", where, "red"], "holds another index")
    search.main(["push", "--index", scenes, "--qdrant", where, "--overwrite"])
    store = search_index.qdrant_client(where)
    import qdrant_edge as qe
    store.shard("metaembed").update(qe.UpdateOperation.delete_points(list(range(40))))   # an upload cut short
    store.close()
    fails(["query", "--index", scenes, "--qdrant", where, "red"], "holds 8 of the index's 48 points .*search.py push")
    search.main(["push", "--index", scenes, "--qdrant", where])                   # completes it
    got = search.main(["query", "--index", scenes, "--qdrant", where, "red", "--json"])
    assert len(got) == 10
    held = search_index.qdrant_client(where)
    held.shard("metaembed")                                   # the engine's shard, open elsewhere: one line
    fails(["query", "--index", scenes, "--qdrant", where, "red"], "cannot open collection 'metaembed' .held open by")
    fails(["index", "--checkpoint", a, "--out", str(tmp_path / "never"), "--qdrant", where], "held open by")
    assert not (tmp_path / "never" / "progress.json").exists()                  # said before any encoding
    held.close()
    for bad in (str(tmp_path / "a-file"), "http://127.0.0.1:9"):                  # found before any encoding
        (tmp_path / "a-file").write_text("x")
        fails(["index", "--checkpoint", a, "--out", str(tmp_path / "never"), "--qdrant", bad], f"--qdrant {bad}: cannot use it")
        assert not (tmp_path / "never" / "progress.json").exists()


def test_qdrant_batches_skipped_whole_and_first_budgets(scenes, tmp_path):
    index = search_index.Index(scenes)
    index.skipped = set(range(4))                             # a whole batch of 4 skipped: nothing to send
    client = search_index.qdrant_client(str(tmp_path / "q"))
    search_index.to_qdrant(index, client, batch=4)
    assert client.count("metaembed") == index.N - 4
    index = search_index.Index(scenes)
    client.drop("metaembed")
    search_index.to_qdrant(index, client)
    model = search.load_model(index.meta["checkpoint"])
    q = model.encode_queries(["red top left, blue center"])
    for first in ((1, 1), (4, 8)):                            # 9. the cheap stage at the budget given
        hits = search_index.qdrant_search(client, q[0].numpy(), (16, 64), 3, first=first, depth=10)
        s, i = index.search(q, (16, 64), k=3, first=first, depth=10)
        assert [j for _, j in hits] == i[0].tolist(), first
        assert max(abs(x - y) for (x, _), y in zip(hits, s[0].tolist())) < 1e-3


# 6. index files are checked
def test_damaged_index_files_are_named(scenes, tmp_path, capsys):
    assert search_index.verify(scenes) == []
    bad = str(tmp_path / "nan")
    shutil.copytree(scenes, bad)
    group = np.memmap(os.path.join(bad, "group-0-1.bin"), dtype=np.float32, mode="r+")
    group[8 * 5] = np.nan                                     # item 5's first vector (D = 8)
    group.flush()
    for budget in ("1x1", "16x64"):
        fails(["query", "--index", bad, "red", "--budget", budget, "-k", "48"], r"item\(s\) 5 .* NaN or inf .*verify")
    fails(["query", "--index", bad, "red", "--first", "1x1", "--depth", "48", "-k", "48"], r"item\(s\) 5 ")
    problems = search_index.verify(bad)
    assert any("group-0-1.bin does not match its checksum" in p for p in problems)
    assert any("1 item(s) hold NaN or inf: 5 (" in p for p in problems)
    fails(["verify", bad], "failed verification")
    meta = json.load(open(os.path.join(scenes, "index.json")))
    short = str(tmp_path / "short")
    shutil.copytree(scenes, short)
    json.dump({**meta, "count": 40}, open(os.path.join(short, "index.json"), "w"))
    fails(["query", "--index", short, "red"], "group-0-1.bin is 1536 bytes, but index.json says 40 candidates")
    shuffled = str(tmp_path / "shuffled")
    shutil.copytree(scenes, shuffled)
    lines = open(os.path.join(shuffled, "items.jsonl")).read().splitlines()
    open(os.path.join(shuffled, "items.jsonl"), "w").write("\n".join(lines[1:] + lines[:1]) + "\n")
    fails(["query", "--index", shuffled, "red"], "items.jsonl lists 48 items out of order")


# 12. --texts
def test_texts_inputs(two_checkpoints, tmp_path, capsys):
    a = two_checkpoints[0]
    for body, said in (('[1, 2]\n', "line 1: expected a JSON object with 'text'"),
                       ('{"text": ["a", "b"]}\n', "line 1: expected a JSON object with 'text' \\(a string\\)")):
        (tmp_path / "t.jsonl").write_text(body)
        fails(["index", "--checkpoint", a, "--out", str(tmp_path / "o"), "--texts", str(tmp_path / "t.jsonl")], said)
    fails(["index", "--checkpoint", a, "--out", str(tmp_path / "o"), "--texts", str(tmp_path)], "not a file")
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + b'{"id": "x", "text": "red top left"}\n'
                                         + json.dumps({"id": "long", "text": "red blue " * 4000}).encode() + b"\n")
    search.main(["index", "--checkpoint", a, "--out", str(tmp_path / "bom"), "--texts", str(tmp_path / "bom.jsonl")])
    assert "1 text(s) longer than the model's 3952 text tokens were cut to fit" in capsys.readouterr().err
    assert [it["id"] for it in search_index.Index(tmp_path / "bom").items] == ["x", "long"]


# 13. --pdf, --out, Ctrl-C
def test_pdf_inputs_and_out(two_checkpoints, tmp_path, capsys):
    import pypdfium2 as pdfium
    a = two_checkpoints[0]
    docs = tmp_path / "docs"
    docs.mkdir()
    pdf = pdfium.PdfDocument.new()
    pdf.new_page(300, 400)
    pdf.save(str(docs / "good.pdf"))
    (docs / "fake.pdf").write_text("not a pdf")
    raw = (docs / "good.pdf").read_bytes()
    (docs / "short.pdf").write_bytes(raw.replace(b"/Count 1", b"/Count 3"))    # a /Count larger than the pages
    search.main(["index", "--checkpoint", a, "--out", str(tmp_path / "pdf"), "--pdf", str(docs)])
    said = capsys.readouterr().out
    assert "skipped " + str(docs / "fake.pdf") + ": not a readable PDF" in said
    index = search_index.Index(tmp_path / "pdf")
    assert "good.pdf#p1" in [it["id"] for it in index.items if not it.get("skipped")]
    assert f"skipped item 2 ({docs / 'short.pdf'} page 2): cannot decode image: page 2 of" in said   # the /Count's ghosts
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(SystemExit):
        search.main(["index", "--checkpoint", a, "--out", str(tmp_path / "a-file"), "--synthetic-scenes", "2"])
    assert "cannot write --out " + str(tmp_path / "a-file") in capsys.readouterr().err


# 14. and 15. what an images folder can hold
def test_image_folders(two_checkpoints, tmp_path, capsys):
    a = two_checkpoints[0]
    pics = pictures(tmp_path / "pics", 3)
    os.mkfifo(pics / "x.png")                                  # would block a reader forever
    linked = pictures(tmp_path / "elsewhere", 2)
    os.symlink(linked, pics / "linked")
    os.symlink(pics, linked / "loop")                          # a link back up: walked once
    g16 = np.linspace(0, 30000, 40 * 40).astype(np.uint16).reshape(40, 40)
    Image.fromarray(g16).save(pics / "scan16.png")
    Image.fromarray(np.full((40, 40), 0.5, dtype=np.float32)).save(pics / "half.tiff")
    items = search_index.image_files(str(pics))
    assert [i for i, _, _, _ in items] == ["half.tiff", "linked/p0.png", "linked/p1.png", "p0.png", "p1.png", "p2.png",
                                           "scan16.png"]
    from machinery.backbones import load_image
    assert load_image(str(pics / "half.tiff")).getpixel((3, 3)) == (128, 128, 128)       # not black
    assert np.asarray(load_image(str(pics / "scan16.png"))).max() == round(30000 / 65535 * 255)   # not white
    search.main(["index", "--checkpoint", a, "--out", str(tmp_path / "idx"), "--images", str(pics)])
    assert search_index.Index(tmp_path / "idx").N == 7


# 16. messages
def test_messages(two_checkpoints, scenes, tmp_path, capsys):
    a = two_checkpoints[0]
    for argv, said in ((["query", "--index", scenes, "x", "--budget", "1,4"], "one budget each"),
                       (["query", "--index", scenes, "x", "--depth", "5"], "--depth is the cascade's: give --first"),
                       (["query", "--index", scenes, "x", "-k", "0"], "-k must be at least 1")):
        with pytest.raises(SystemExit):
            search.main(argv)
        assert said in capsys.readouterr().err
    fails(["query", "--index", scenes, "x", "--first", "16x64", "--budget", "1x1"], "is not cheaper than --budget")
    search.main(["query", "--index", scenes, "red", "-k", "20", "--first", "1x1", "--depth", "5"])
    assert "then 16x64 on the best 20:" in capsys.readouterr().out
    pics = tmp_path / "broken"
    pics.mkdir()
    for i in range(2):
        (pics / f"b{i}.png").write_bytes(b"\x89PNG not really")
    fails(["index", "--checkpoint", a, "--out", str(tmp_path / "none"), "--images", str(pics)],
          "every one of the 2 items was skipped")
    progress = json.load(open(tmp_path / "none" / "progress.json"))
    assert [r["item"] for r in progress["skipped"]] == [0, 1] and "(item" not in progress["skipped"][1]["error"]
    big = tmp_path / "big.png"
    Image.new("RGB", (200, 200)).save(big)
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = 30000                             # 40,000 pixels: past the warning, under the error
    try:
        from machinery.backbones import load_image
        with pytest.raises(FileNotFoundError, match=r"cannot read image .*big.png.*exceeds limit"):
            load_image(str(big))
    finally:
        Image.MAX_IMAGE_PIXELS = old


def test_keep_float_none_through_the_command_line(two_checkpoints, tmp_path, capsys):
    """search.py index --precision int8 --keep-float none: index.json records float_r_c 0, no float
    group file is written, verify passes, a cascade query says it rescored from the low bits; a
    --keep-float that is not stored, or on a float index, is one line before any encoding."""
    a, out = two_checkpoints[0], str(tmp_path / "int8")
    search.main(["index", "--checkpoint", a, "--out", out, "--synthetic-scenes", "3", "--precision", "int8",
                 "--keep-float", "none"])
    assert json.load(open(os.path.join(out, "index.json")))["float_r_c"] == 0
    assert " MiB float32 (no float copy) + " in capsys.readouterr().out
    assert sorted(f for f in os.listdir(out) if f.endswith(".bin") and f.count(".") == 1) == []
    assert os.path.isfile(os.path.join(out, "group-16-64.int8.bin"))
    capsys.readouterr()
    search.main(["verify", out])
    assert ": ok (" in capsys.readouterr().out
    search.main(["query", "--index", out, "red top left", "--first", "1x1", "--depth", "5", "-k", "3"])
    assert "(int8, rescored in int8 (no float copy))" in capsys.readouterr().out
    fails(["index", "--checkpoint", a, "--out", str(tmp_path / "x"), "--synthetic-scenes", "3", "--precision", "int8",
           "--keep-float", "3"], r"^search.py: error: --keep-float 3: give all, none, or an r_c the index stores \(1, 4")
    fails(["index", "--checkpoint", a, "--out", str(tmp_path / "y"), "--synthetic-scenes", "3", "--keep-float", "none"],
          r"^search.py: error: --keep-float none: only an int8 / binary index can drop its float copy")
    assert not os.path.exists(tmp_path / "y" / "progress.json")




# 41. what an index reads back is checked: index.json and items.jsonl whole on every open, every field's
# type, every read's length, every search's results against what unit vectors can be
@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """D = 128 (a bf16 index) and the same 24 items in int8 too, as the issue's reproductions."""
    root = tmp_path_factory.mktemp("wide")
    MetaEmbed.from_backbone("tiny", seed=1, proj_dim=128).save_pretrained(root / "ck")
    for p in ("bf16", "int8"):
        search.main(["index", "--checkpoint", str(root / "ck"), "--out", str(root / p), "--synthetic-scenes", "6",
                     "--precision", p])
    return root


def edited(src, dst, meta=None, items=None):
    """A copy of an index folder with index.json's fields updated (its checksum left as it was), or
    items.jsonl's lines {line number: new text}."""
    shutil.copytree(src, dst)
    if meta is not None:
        m = json.load(open(os.path.join(dst, "index.json")))
        json.dump({**m, **meta}, open(os.path.join(dst, "index.json"), "w"))
    if items is not None:
        lines = open(os.path.join(dst, "items.jsonl")).read().splitlines()
        for n, text in items.items():
            lines[n - 1] = text
        open(os.path.join(dst, "items.jsonl"), "w").write("\n".join(lines) + "\n")
    return str(dst)


def test_an_edited_index_json_is_refused_and_verify_names_it(wide, tmp_path, capsys):
    """#41 case 1: dtype bfloat16 -> float16 keeps every size; index.json's own checksum refuses it."""
    assert json.load(open(wide / "bf16" / "index.json"))["dtype"] == "bfloat16"
    bad = edited(wide / "bf16", tmp_path / "fp16", meta={"dtype": "float16"})
    fails(["query", "--index", bad, "red"], r"^search.py: error: index .*: index.json does not match its own "
                                           r"checksum .*search.py verify")
    fails(["verify", bad], "failed verification")
    out = capsys.readouterr().out
    assert "index.json does not match its own checksum" in out and ".bin" not in out      # no other file blamed
    search.main(["verify", str(wide / "bf16")])                                          # the untouched one: ok
    assert ": ok (" in capsys.readouterr().out


def test_same_size_damage_to_low_bits_is_never_served(wide, tmp_path, monkeypatch):
    """#41 case 2: item 12's codes set to 127, or item 5's scales to 1e20: every search's results are
    checked against what unit vectors can be; verify names the one file that changed."""
    D = 128
    codes = edited(wide / "int8", tmp_path / "codes")
    c = np.memmap(os.path.join(codes, "group-16-64.int8.bin"), dtype=np.int8, mode="r+").reshape(24, 48, D)
    c[12] = 127
    c.flush()
    fails(["query", "--index", codes, "red", "-k", "24"],
          r"item 12 .* holds a vector of norm .* in group-16-64.int8.bin: the file is damaged; run `search.py verify")
    scales = edited(wide / "int8", tmp_path / "scales")
    s = np.memmap(os.path.join(scales, "group-0-1.scale.bin"), dtype=np.float32, mode="r+")
    s[5] = 1e20
    s.flush()
    for budget in ("1x1", "16x64"):
        fails(["query", "--index", scales, "red", "--budget", budget, "-k", "3"],
              r"item 5 .* holds a scale of 1e\+20 .* in group-0-1.scale.bin")
    assert search_index.verify(codes) == ["group-16-64.int8.bin does not match its checksum: the file changed after "
                                          "indexing"]
    # a score no unit vectors can reach, whole files or not (here: a scoring path made to return 100x)
    real = search_index.maxsim_topk
    monkeypatch.setattr(search_index, "maxsim_topk", lambda *a, **k: (lambda s, i: (100 * s, i))(*real(*a, **k)))
    fails(["query", "--index", str(wide / "int8"), "red", "--budget", "2x4", "-k", "3"],
          r"scores .*, more than 2 unit query vectors can reach \(2.0.*\), from group-0-1.int8.bin, "
          r"group-0-1.scale.bin, group-1-4.int8.bin, group-1-4.scale.bin: run `search.py verify")


def test_files_truncated_after_opening_are_an_error_not_memory(wide, tmp_path):
    """#41 case 3: an Index opened, then its .int8.bin / .scale.bin truncated (a rebuild in place with fewer
    items): every read checks its length (a plain read's count, a memory map's file size)."""
    for name in ("group-0-1.int8.bin", "group-0-1.scale.bin", "group-1-4.bin"):
        folder = edited(wide / "int8", tmp_path / name)
        index = search_index.Index(folder)
        q = torch.nn.functional.normalize(torch.randn(1, 16, 128), dim=-1)
        with open(os.path.join(folder, name), "r+b") as f:
            f.truncate(os.path.getsize(os.path.join(folder, name)) // 2)
        with pytest.raises(ValueError, match=f"{name} is shorter than index.json says"):
            index.search(q, (4, 4) if name == "group-1-4.bin" else (1, 1), k=5,
                         first=(1, 1) if name == "group-1-4.bin" else None)       # the cascade: a memory map


def test_type_damage_is_one_line(scenes, wide, tmp_path, capsys):
    """#41 case 9 and the smaller ones: each field's type and range, items.jsonl line by line."""
    for i, (meta, items, said) in enumerate((
            ({"count": 48.0}, None, r"index.json is damaged \(count 48.0 is not a whole number >= 0\)"),
            ({"count": "48"}, None, r"index.json is damaged \(count '48' is not a whole number"),
            ({"groups": [[0, "1/../x"]]}, None, r"index.json is damaged \(groups \[\[0, \"1/../x\"\]\] is not a list"),
            ({"groups": [[0, 1], [2, 64]]}, None, r"groups .* are not consecutive ranges from 0"),
            ({"precision": "float16"}, None, r"precision 'float16' is none of int8, binary \(or the dtype, float32\)"),
            ({"fingerprint": 7}, None, r"fingerprint 7 is not a string"),
            (None, {1: "[1, 2]"}, r"items.jsonl line 1 is \[1, 2\], not an object"),
            (None, {3: '{"n": 2, "id": "x", "source": '}, r"items.jsonl line 3 is not JSON"),
            (None, {2: '{"n": 1, "id": null, "source": "s"}'}, r"items.jsonl line 2: id null is not a string"))):
        bad = edited(scenes, tmp_path / f"t{i}", meta, items)
        fails(["query", "--index", bad, "red"], f"^search.py: error: index .*{said}")
        assert search_index.verify(bad) and re.search(said, search_index.verify(bad)[0])
    # an int8 index said to be bf16: index.json is blamed, not the code files beside it
    bad = edited(wide / "int8", tmp_path / "bf16-said", {"precision": "bf16"})
    assert search_index.verify(bad) == [f"index {bad}: index.json is damaged (precision 'bf16' is none of int8, "
                                        f"binary (or the dtype, bfloat16)): rebuild the index"]
    # an items.jsonl changed in a way every field allows: its checksum in index.json
    same = edited(scenes, tmp_path / "renamed", items={4: json.dumps({**json.loads(
        open(os.path.join(scenes, "items.jsonl")).read().splitlines()[3]), "id": "renamed"})})
    fails(["query", "--index", same, "red"], r"items.jsonl does not match its checksum in index.json")


def test_push_of_an_index_holding_nan_is_refused_before_qdrant(scenes, tmp_path):
    """#41: a NaN in a stored vector is said before a collection is made (it left an empty one, and the
    next query said 'holds another index (None)'); an empty collection is said to be empty."""
    bad = edited(scenes, tmp_path / "nan")
    g = np.memmap(os.path.join(bad, "group-0-1.bin"), dtype=np.float32, mode="r+")
    g[8 * 5] = np.nan
    g.flush()
    where = str(tmp_path / "qdrant")
    fails(["push", "--index", bad, "--qdrant", where], r"1 item\(s\) hold NaN or inf: 5 .*nothing pushed")
    store, index = search_index.qdrant_client(where), search_index.Index(scenes)
    store.create("metaembed", search_index.qdrant_collection(index.D, [b for _, b in index.bounds]))
    store.finish("metaembed")
    store.close()
    fails(["query", "--index", scenes, "--qdrant", where, "red"], r"collection 'metaembed' is empty")
