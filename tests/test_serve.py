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
                               ("/api/search?q=x&budget=2,4", 400, "not a budget like 2x4"),
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
        browser.close()
    assert Image.open(tmp_path / "page.png").size[0] == 1200
    if os.environ.get("METAEMBED_SCREENSHOT"):                                          # for the README
        shutil.copy(tmp_path / "page.png", os.environ["METAEMBED_SCREENSHOT"])
