"""search.py serve: the JSON API (with urllib), its bad inputs and traversal attempts, 20 parallel
searches, and the page in a real headless browser (Debian's chromium, driven by Playwright)."""
import io
import json
import os
import shutil
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

import search
from apps import serve
from metaembed import MetaEmbed

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    MetaEmbed.from_backbone("tiny", seed=1, proj_dim=8).save_pretrained(root / "ck")
    search.main(["index", "--checkpoint", str(root / "ck"), "--out", str(root / "scenes"), "--synthetic-scenes", "12"])
    pics = root / "pics"
    pics.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 40), (80 * i, 0, 0)).save(pics / f"p{i}.png")
    search.main(["index", "--checkpoint", str(root / "ck"), "--out", str(root / "pics-index"), "--images", str(pics)])
    index, model = search.open_for_search(search.get_args(["query", "--index", str(root / "scenes"), "x"]))
    srv = serve.make_server(serve.Searcher(index, model), "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    pics_index, _ = search.open_for_search(search.get_args(["query", "--index", str(root / "pics-index"), "x"]))
    srv2 = serve.make_server(serve.Searcher(pics_index, model), "127.0.0.1", 0)
    threading.Thread(target=srv2.serve_forever, daemon=True).start()
    yield (f"http://127.0.0.1:{srv.server_address[1]}", str(root / "scenes"),
           f"http://127.0.0.1:{srv2.server_address[1]}", root)
    srv.shutdown()
    srv2.shutdown()


def get(url, body=None):
    """-> (status, parsed JSON or bytes); never raises for a 4xx / 5xx."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body, method="POST" if body is not None else "GET"),
                                    timeout=60) as r:
            data, status, kind = r.read(), r.status, r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        data, status, kind = e.read(), e.code, e.headers.get("Content-Type", "")
    return status, json.loads(data) if kind.startswith("application/json") else data


def test_api_matches_the_cli(server, capsys):
    base, index_path, _, _ = server
    status, info = get(base + "/api/info")
    assert status == 200 and info["count"] == 48 and info["budgets"] == ["1x1", "2x4", "4x8", "8x16", "16x64"]
    assert info["precision"] == info["dtype"] == "float32"               # no low-bit groups in this index
    for query in ("budget=2x4&k=5", "budget=16x64&k=7&first=1x1&depth=10"):
        status, got = get(f"{base}/api/search?q=red+top+left&{query}")
        assert status == 200
        cli = ["query", "--index", index_path, "red top left", "--json"] + sum(
            ([f"--{k}" if k != "k" else "-k", v] for k, v in (p.split("=") for p in query.split("&"))), [])
        search.main(cli)
        want = json.loads(capsys.readouterr().out)["results"]
        assert [r["id"] for r in got["results"]] == [r["id"] for r in want]
        assert [r["score"] for r in got["results"]] == pytest.approx([r["score"] for r in want], abs=1e-6)
    assert got["first"] == "1x1" and got["budget"] == "16x64" and got["bytes_read"] == 48 * 1 * 8 * 4 + 10 * 64 * 8 * 4
    status, thumb = get(f"{base}/api/thumb/{got['results'][0]['n']}")
    assert status == 200 and Image.open(io.BytesIO(thumb)).size == (84, 84)            # the scene, redrawn
    png = io.BytesIO()
    Image.new("RGB", (60, 60), "red").save(png, "PNG")
    status, by_image = get(f"{base}/api/search?budget=1x1&k=3", png.getvalue())
    assert status == 200 and len(by_image["results"]) == 3


def test_bad_input_is_a_named_4xx_and_the_server_lives(server):
    base, _, pics_base, root = server
    for path, status, said in (("/api/search?budget=2x4", 400, "needs q"),
                               ("/api/search?q=x&budget=3x3", 400, "not stored in this index"),
                               ("/api/search?q=x&budget=2,4", 400, "not a number or 'AxB'"),
                               ("/api/search?q=x&k=0", 400, "k must be a whole number from 1"),
                               ("/api/search?q=x&k=ten", 400, "k must be"),
                               ("/api/search?q=x&depth=5", 400, "depth is the cascade's"),
                               ("/api/search?q=x&first=16x64&budget=1x1", 400, "not cheaper"),
                               ("/api/search?q=x&first=1x1&depth=-3", 400, "depth must be")):
        got_status, body = get(base + path)
        assert (got_status, said in body.get("error", "")) == (status, True), (path, body)
    assert get(base + "/api/search?q=x", b"not an image at all")[0] == 400
    assert "not an image" in get(base + "/api/search?q=x", b"not an image at all")[1]["error"]
    big = b"\0" * (serve.MAX_UPLOAD + 1)
    assert get(base + "/api/search?q=x", big)[0] == 413
    # nothing is served by a path from the request
    for path in ("/api/thumb/../../etc/passwd", "/api/thumb/%2e%2e/%2e%2e/etc/passwd", "/etc/passwd", "//etc/passwd",
                 "/api/thumb//etc/passwd", f"/api/thumb/{root}/pics/p0.png", "/index.json", "/scenes/index.json",
                 "/api/thumb/48", "/api/thumb/-1", "/api/thumb/1e3", "/machinery/serve.py", "/search_page.html"):
        status, body = get(base + path)
        assert status == 404 and body == {"error": "not found"}, path
    # an indexed image swapped for a link out of the index after indexing: not followed
    assert get(pics_base + "/api/thumb/0")[0] == 200
    os.remove(root / "pics" / "p0.png")
    os.symlink("/etc/hostname", root / "pics" / "p0.png")
    assert get(pics_base + "/api/thumb/0")[0] == 404
    assert get(base + "/api/info")[0] == 200                                          # still serving


def test_twenty_parallel_searches_get_one_answer(server):
    base = server[0]
    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda _: get(base + "/api/search?q=green+center&budget=8x16&k=5")[1]["results"], range(20)))
    assert all(a == answers[0] for a in answers) and len(answers[0]) == 5


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed (.ci/run installs it)")
def test_the_page_in_a_real_browser(server, tmp_path):
    from playwright.sync_api import sync_playwright
    base = server[0]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 800})
        page.goto(base + "/")
        page.wait_for_function("document.querySelector('#budget').max === '4'")
        page.fill("#q", "red top left, blue center")
        page.fill("#k", "6")
        page.wait_for_function("document.querySelectorAll('.result').length === 6")
        api = get(base + "/api/search?q=red+top+left%2C+blue+center&budget=16x64&k=6")[1]
        ids = page.eval_on_selector_all(".result", "cards => cards.map(c => c.dataset.id)")
        assert ids == [r["id"] for r in api["results"]]                                 # the API's order
        assert page.get_attribute("#status", "data-budget") == "16x64"
        page.eval_on_selector("#budget", "el => { el.value = 0; el.dispatchEvent(new Event('input')); }")
        page.wait_for_function("document.querySelector('#status').dataset.budget === '1x1'")
        small = get(base + "/api/search?q=red+top+left%2C+blue+center&budget=1x1&k=6")[1]
        assert page.eval_on_selector_all(".result", "cards => cards.map(c => c.dataset.id)") == [r["id"] for r in small["results"]]
        assert int(page.get_attribute("#status", "data-bytes")) == small["bytes_read"] < api["bytes_read"]
        assert "1x1" in page.url and "q=red" in page.url                               # the URL follows
        page.wait_for_function("[...document.querySelectorAll('.result img')].every(i => i.complete && i.naturalWidth > 0)")
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        png = io.BytesIO()
        Image.new("RGB", (84, 84), (230, 40, 40)).save(png, "PNG")
        (tmp_path / "q.png").write_bytes(png.getvalue())
        page.fill("#q", "")
        page.set_input_files("#image", str(tmp_path / "q.png"))                         # an image query
        page.wait_for_function("document.querySelectorAll('.result').length === 6 && "
                               "document.querySelector('#status').textContent.includes('results')")
        linked = browser.new_page()
        linked.goto(base + "/?q=green+center&budget=2x4&k=4")                          # a linked search
        linked.wait_for_function("document.querySelectorAll('.result').length === 4")
        assert linked.get_attribute("#status", "data-budget") == "2x4"
        assert linked.input_value("#q") == "green center"
        for link, said in (("budget=3x5", "budget 3x5 is not one of"), ("first=3x5", "first 3x5 is not one of")):  # #17
            bad = browser.new_page()
            bad.goto(f"{base}/?q=red&{link}")
            bad.wait_for_function("document.querySelector('#status').className === 'error'")
            assert said in bad.text_content("#status") and not bad.is_checked("#cascade")
        long = browser.new_page()                                                        # #17: a 414, not JSON
        long.goto(base + "/")
        long.wait_for_function("document.querySelector('#budget').max === '4'")
        long.fill("#q", "x" * 70000)
        long.wait_for_function("document.querySelector('#status').className === 'error'")
        assert "414" in long.text_content("#status")
        browser.close()
    assert Image.open(tmp_path / "page.png").size[0] == 1200
    if os.environ.get("METAEMBED_SCREENSHOT"):                                          # for the README
        shutil.copy(tmp_path / "page.png", os.environ["METAEMBED_SCREENSHOT"])


# -- issue 32: a server safe to leave running -----------------------------------------------------

def raw(base, request, timeout=5):
    """Send raw request bytes to base's port -> (status, headers text, body bytes); the reply must
    come within `timeout` seconds (a server that waits for more is a failure, not a hang)."""
    import socket
    port = int(base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), head.decode("latin-1"), body


def post(base, path, headers, body=b""):
    port = base.rsplit(":", 1)[1]
    lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", *headers]
    return raw(base, ("\r\n".join(lines) + "\r\n\r\n").encode() + body)


def test_content_length_negative_non_numeric_or_chunked_is_a_4xx_at_once(server):
    """#1: never an unbounded read: the client here keeps its socket open, so a server reading to
    the end of the stream would time the test out."""
    base = server[0]
    png = io.BytesIO()
    Image.new("RGB", (60, 60), "red").save(png, "PNG")
    for headers, status, said in ((["Content-Length: -1"], 400, b"is not a byte count"),
                                  (["Content-Length: abc"], 400, b"is not a byte count"),
                                  (["Transfer-Encoding: chunked"], 411, b"Content-Length"),
                                  ([f"Content-Length: {len(png.getvalue()) + 100}"], 400, b"ended after")):
        import socket
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
            s.sendall(("\r\n".join(["POST /api/search?q=x HTTP/1.1", f"Host: 127.0.0.1:{port}", *headers])
                       + "\r\n\r\n").encode() + png.getvalue())
            if "ended" in said.decode():
                s.shutdown(socket.SHUT_WR)                 # a body shorter than it said
            reply = b""
            while chunk := s.recv(65536):              # the server answers and hangs up, never waits for more
                reply += chunk
        assert int(reply.split()[1]) == status and said in reply, (headers, reply[:300])


def gs_stand_in(tmp_path, monkeypatch):
    """A `gs` first on PATH that logs any call: Pillow would run Ghostscript for EPS / PS."""
    from PIL import EpsImagePlugin
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "gs").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/gs-called.log\necho 10.0\n")
    (folder / "gs").chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}:{os.environ['PATH']}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)      # Pillow looks gs up once and keeps it
    return tmp_path / "gs-called.log"


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 40 40\n0 0 moveto 40 40 lineto stroke\nshowpage\n%%EOF\n"


def test_uploads_never_run_ghostscript(server, tmp_path, monkeypatch):
    """#2: an EPS body is refused as a format the encoder does not decode; `gs` is never called."""
    log = gs_stand_in(tmp_path, monkeypatch)
    status, body = get(server[0] + "/api/search?q=x", EPS)
    assert not log.exists()
    assert status == 400 and "PNG, JPEG, WEBP, GIF, BMP, TIFF" in body["error"]


def test_upload_pixels_are_capped_and_thumbnails_rendered_small_and_cached(server, tmp_path, monkeypatch):
    """#3: a small file of many pixels is a 413 before decoding; a PDF page's thumbnail is rendered at
    the scale that gives THUMB px (not the page's size), and a thumbnail is made once."""
    import pypdfium2 as pdfium
    big = io.BytesIO()
    Image.new("1", (5001, 5001)).save(big, "PNG")              # 25M pixels in a few kB
    assert len(big.getvalue()) < 100_000
    status, body = get(server[0] + "/api/search?q=x", big.getvalue())
    assert status == 413 and "5001x5001" in body["error"] and "\n" not in body["error"]
    doc = pdfium.PdfDocument.new()
    doc.new_page(3000, 2000)
    doc.save(str(tmp_path / "big.pdf"))
    search.main(["index", "--checkpoint", str(server[3] / "ck"), "--out", str(tmp_path / "pdf-index"),
                 "--pdf", str(tmp_path / "big.pdf")])
    index, model = search.open_for_search(search.get_args(["query", "--index", str(tmp_path / "pdf-index"), "x"]))
    searcher = serve.Searcher(index, model)
    rendered, made = [], []
    render = pdfium.PdfPage.render
    monkeypatch.setattr(pdfium.PdfPage, "render", lambda self, **kw: rendered.append(render(self, **kw)) or rendered[-1])
    draw = serve.render_thumbnail
    monkeypatch.setattr(serve, "render_thumbnail", lambda item: made.append(item) or draw(item))
    jpeg = searcher.thumbnail(0)
    assert Image.open(io.BytesIO(jpeg)).size == (256, 171)
    assert [max(b.width, b.height) for b in rendered] == [256]      # not 3000 x 2000 then shrunk
    assert searcher.thumbnail(0) == jpeg and len(made) == 1         # cached


def test_only_the_served_address_and_its_own_page_are_answered(server):
    """#4: a foreign Host (DNS rebinding), a cross-site Origin or Sec-Fetch-Site: 403; no CORS header."""
    base = server[0]
    port = base.rsplit(":", 1)[1]

    def ask(*headers, host=f"127.0.0.1:{port}"):
        return raw(base, ("\r\n".join(["GET /api/info HTTP/1.1", f"Host: {host}", *headers]) + "\r\n\r\n").encode())
    for host in (f"attacker.example:{port}", "127.0.0.1:1", "127.0.0.1", ""):
        assert ask(host=host)[0] == 403, host
    assert ask("Origin: http://attacker.example")[0] == 403
    assert ask(f"Origin: http://localhost:{port}.attacker.example")[0] == 403
    assert ask("Sec-Fetch-Site: cross-site")[0] == 403
    assert ask("Sec-Fetch-Site: same-site")[0] == 403
    status, _, body = post(base, "/api/search?q=x", ["Origin: http://attacker.example", "Content-Type: text/plain",
                                                      "Content-Length: 3"], b"abc")
    assert status == 403 and b"cross-origin" in body
    for ok in (ask(), ask(host=f"localhost:{port}"), ask(f"Origin: http://127.0.0.1:{port}", "Sec-Fetch-Site: same-origin"),
               ask("Sec-Fetch-Site: none")):
        assert ok[0] == 200 and "access-control" not in ok[1].lower()
    assert raw(base, f"OPTIONS /api/search HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())[0] == 405
    status, headers, body = raw(base, f"HEAD /api/info HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    assert status == 200 and body == b"" and "application/json" in headers              # #17: HEAD


def test_slow_clients_are_timed_out_and_threads_bounded(server, monkeypatch):
    """#5: 20 connections sending half a request: at most `threads` handle them at once, each is
    closed after the socket timeout, and the server answers again afterwards."""
    import socket
    import time
    searcher = serve.Searcher(*search.open_for_search(search.get_args(["query", "--index", server[1], "x"])))
    monkeypatch.setattr(serve.Handler, "timeout", 0.5)
    srv = serve.make_server(searcher, "127.0.0.1", 0, threads=3)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    port = srv.server_address[1]
    try:
        before = threading.active_count()
        slow = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(20)]
        for s in slow:
            s.sendall(b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1")      # half a request, never finished
        peak, t = 0, time.time()
        while time.time() - t < 1.5:
            peak = max(peak, threading.active_count() - before)
            time.sleep(0.02)
        assert peak <= serve.CONNECTIONS * 3 * 2   # 12 connections (a handler and a timer each), not 20
        closed = [s.recv(100) for s in slow]         # the server hangs up on each (a 408-free close)
        assert all(c == b"" for c in closed)
        for s in slow:
            s.close()
        status, _, body = raw(f"http://127.0.0.1:{port}", f"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        assert status == 200 and json.loads(body)["count"] == 48
    finally:
        srv.shutdown()
        srv.server_close()


def test_slow_headers_hold_no_slot_and_are_cut_short(server, monkeypatch):
    """#41 case 7: connections sending a request line, then a header line every 0.3 s (never idle long
    enough for the socket timeout), three times the slot count: a normal request is answered at once,
    and each slow one is closed after HEADER_DEADLINE, not the connection's whole DEADLINE."""
    import socket
    import time
    searcher = serve.Searcher(*search.open_for_search(search.get_args(["query", "--index", server[1], "x"])))
    monkeypatch.setattr(serve, "HEADER_DEADLINE", 2, raising=False)
    srv = serve.make_server(searcher, "127.0.0.1", 0, threads=2)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    port, stop = srv.server_address[1], threading.Event()
    slow = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(6)]

    def trickle():
        for _ in range(40):                                   # bounded: 12 s at most
            for s in slow:
                try:
                    s.sendall(b"X-Slow: 1\r\n")
                except OSError:
                    pass
            if stop.wait(0.3):
                return
    try:
        for s in slow:
            s.sendall(f"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode())
        threading.Thread(target=trickle, daemon=True).start()
        time.sleep(0.5)                                        # every slow connection accepted and waiting
        t = time.time()
        status, _, body = raw(f"http://127.0.0.1:{port}", f"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n"
                              .encode(), timeout=1.5)
        assert status == 200 and json.loads(body)["count"] == 48 and time.time() - t < 1.5
        t = time.time()
        for s in slow:                                         # the server hangs up on each, headers unfinished
            assert s.recv(100) == b""
        assert time.time() - t < 4
    finally:
        stop.set()
        for s in slow:
            s.close()
        srv.shutdown()
        srv.server_close()


def test_a_damaged_index_is_a_503_naming_verify(server, tmp_path):
    """#41: a search whose results the index cannot stand behind (a NaN written into item 5) is the
    server's problem, not the client's: 503 naming `search.py verify`."""
    import numpy as np
    bad = tmp_path / "scenes"
    shutil.copytree(server[1], bad)
    g = np.memmap(bad / "group-0-1.bin", dtype=np.float32, mode="r+")
    g[8 * 5] = np.nan
    g.flush()
    index, model = search.open_for_search(search.get_args(["query", "--index", str(bad), "x"]))
    srv = serve.make_server(serve.Searcher(index, model), "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        status, body = get(f"http://127.0.0.1:{srv.server_address[1]}/api/search?q=red&budget=1x1&k=48")
        assert status == 503 and "search.py verify" in body["error"] and "item(s) 5 " in body["error"]
    finally:
        srv.shutdown()
        srv.server_close()


def test_absolute_form_and_repeated_headers_are_refused(server):
    """#41: GET http://evil/api/info (absolute form) and //host/... are not paths here; a repeated Host or
    Content-Length header is refused (the first one won)."""
    base = server[0]
    port = base.rsplit(":", 1)[1]
    host = f"Host: 127.0.0.1:{port}"
    for target, status, said in (("http://evil/api/info", 400, b"is not a path"), ("//evil/api/info", 404, b"not found")):
        got = raw(base, f"GET {target} HTTP/1.1\r\n{host}\r\n\r\n".encode())
        assert got[0] == status and said in got[2], target
    for extra, name in ((f"Host: evil.example", "Host"), ("Content-Length: 0\r\nContent-Length: 5", "Content-Length")):
        got = raw(base, f"GET /api/info HTTP/1.1\r\n{host}\r\n{extra}\r\n\r\n".encode())
        assert got[0] == 400 and f"{name} is given 2 times".encode() in got[2], extra


def test_an_index_replaced_under_the_server_is_noticed(server, tmp_path):
    """#6: the served folder replaced by another model's index: 503 naming it; by the same model's
    smaller index: reopened whole (count, labels, vectors), never stale labels or a short read."""
    root = server[3]
    served = tmp_path / "served"
    shutil.copytree(server[1], served)
    searcher = serve.Searcher(*search.open_for_search(search.get_args(["query", "--index", str(served), "x"])))
    srv = serve.make_server(searcher, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        assert get(base + "/api/info")[1]["count"] == 48
        other = tmp_path / "other-ck"
        MetaEmbed.from_backbone("tiny", seed=2, proj_dim=8).save_pretrained(other)
        search.main(["index", "--checkpoint", str(other), "--out", str(tmp_path / "other"), "--synthetic-scenes", "3"])
        shutil.rmtree(served)
        shutil.copytree(tmp_path / "other", served)
        status, body = get(base + "/api/search?q=red&budget=2x4")
        assert status == 503 and "another checkpoint" in body["error"]
        search.main(["index", "--checkpoint", str(root / "ck"), "--out", str(tmp_path / "small"), "--synthetic-scenes", "5"])
        shutil.rmtree(served)
        shutil.copytree(tmp_path / "small", served)
        assert get(base + "/api/info")[1]["count"] == 20
        status, body = get(base + "/api/search?q=red&budget=16x64&k=30")
        assert status == 200 and len(body["results"]) == 20
        assert all(r["n"] < 20 and abs(r["score"]) <= 16.001 for r in body["results"])
        with open(served / "group-16-64.bin", "r+b") as f:              # truncated under it
            f.truncate(100)
        status, body = get(base + "/api/search?q=red&budget=16x64")
        assert status == 503 and "group-16-64.bin" in body["error"]
    finally:
        srv.shutdown()
        srv.server_close()


def test_api_parameters_follow_the_one_budget_rule(server):
    """#16: empty or huge parameters are named, a form body is told to send raw bytes, and 1x4 runs
    in the API as on the command line."""
    base = server[0]
    for query, said in (("budget=", "budget '': empty"), ("first=&budget=2x4", "first '': empty"),
                        ("k=", "k must be a whole number"), ("budget=" + "9" * 5000, "not a number or 'AxB'")):
        status, body = get(f"{base}/api/search?q=x&{query}")
        assert status == 400 and said in body["error"] and "4300" not in body["error"], (query, body)
    status, body = get(base + "/api/search?q=x", b"------boundary\r\nContent-Disposition: form-data; name=f\r\n\r\nabc")
    assert status == 400 and "raw bytes of one image" in body["error"] and "BytesIO" not in body["error"]
    status, body = get(base + "/api/search?q=red&budget=1x4&k=3")
    assert status == 200 and body["budget"] == "1x4"


def test_serve_checks_host_and_port_before_the_model_loads(tmp_path, monkeypatch):
    """#12: a port in use or out of range, an address not of this machine: one line, no model loaded."""
    import socket
    monkeypatch.setattr(search, "open_for_search", lambda *a: pytest.fail("the model was loaded first"))
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        for argv, said in ((["--port", str(taken.getsockname()[1])], "another program uses it"),
                           (["--port", "99999"], "--port 99999: a port is 0..65535"),
                           (["--host", "203.0.113.5"], "not an address of this machine")):
            with pytest.raises(SystemExit, match=said):
                search.main(["serve", "--index", str(tmp_path)] + argv)
    finally:
        taken.close()


def test_a_client_leaving_mid_reply_leaves_no_traceback(server, capfd):
    """#18: clients that reset the connection before or while the answer is written: nothing in the
    server's log (it was two BrokenPipe tracebacks labelled as internal errors)."""
    import socket
    import struct
    import time
    port = int(server[0].rsplit(":", 1)[1])
    capfd.readouterr()
    for path in ("/api/search?q=red&budget=16x64&k=40", "/api/thumb/0", "/"):
        for _ in range(5):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))      # reset, not close
            s.close()
    time.sleep(1.0)
    assert get(server[0] + "/api/info")[0] == 200
    err = capfd.readouterr().err
    assert "Traceback" not in err and "internal error" not in err, err[-2000:]
