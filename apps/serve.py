"""`search.py serve`: a local search page over an index, the standard library's HTTP server.

Routes (nothing else is served; no path from a request is ever opened):
    GET  /                      the page (apps/search_page.html)
    GET  /api/info              the index's size, budgets, model and dimension
    GET  /api/search?q=TEXT&budget=AxB&k=K[&first=AxB&depth=N]
    POST /api/search?...        an image as the body (with or without q)
    GET  /api/thumb/<n>         a thumbnail of indexed item n (its file as indexed, never a link swapped in)
Errors are {"error": ...} with a 4xx status; no traceback reaches a client. Searches are
serialized on the model (one encode at a time); the page and thumbnails are served in parallel.
"""
import io
import json
import os
import re
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from machinery.index import vector_bytes

MAX_UPLOAD = 20 << 20          # bytes of an uploaded query image
THUMB = 256                    # pixels of a thumbnail's longer edge
PAGE = Path(__file__).with_name("search_page.html")


class BadRequest(ValueError):
    def __init__(self, message, status=400):
        super().__init__(message)
        self.status = status


class Searcher:
    """The index, its model and one lock: what every request shares."""

    def __init__(self, index, model):
        self.index, self.model = index, model
        self.lock = threading.Lock()

    def info(self):
        m = self.index.meta
        return {"count": self.index.N - len(self.index.skipped), "budgets": [f"{rq}x{rc}" for rq, rc in self.budgets()],
                "model": m.get("checkpoint"), "backbone": m.get("backbone"), "dim": self.index.D, "dtype": m["dtype"],
                "precision": self.index.precision}

    def budgets(self):
        """The budgets a search can take: the model's groups that the index stores."""
        stored = {b for _, b in self.index.bounds}
        return [tuple(g) for g in self.index.meta["model_groups"] if g[1] in stored]

    def search(self, params, image=None):
        text = params.get("q", "")
        if not text and image is None:
            raise BadRequest("a search needs q (a text) or an image in the body")
        budget = self.budget(params, "budget", "16x64")
        first = self.budget(params, "first", None)
        k = self.number(params, "k", 10)
        depth = self.number(params, "depth", 1000) if first else None
        if "depth" in params and not first:
            raise BadRequest("depth is the cascade's: give first too (e.g. first=1x1&depth=300)")
        if first and (first[0] > budget[0] or first[1] > budget[1]):
            raise BadRequest(f"first {first[0]}x{first[1]} is not cheaper than budget {budget[0]}x{budget[1]}")
        depth = max(depth, k) if first else None
        t = time.perf_counter()
        with self.lock:                           # one encode and search at a time
            q = self.model.encode_queries([text], [image] if image is not None else None)
            s, i = self.index.search(q, budget, k, first, depth or 1000, os.environ.get("METAEMBED_MAXSIM"))
        ms = 1e3 * (time.perf_counter() - t)
        items = self.index.items
        vector = self.index.D * self.index.vectors.dtype.itemsize                    # the float copy's
        low = vector_bytes(self.index.D, self.index.precision)                       # what the first pass reads
        read = self.index.N * (first or budget)[1] * low + (min(depth, self.index.N) * budget[1] * vector if first else 0)
        return {"results": [{"rank": r + 1, "n": j, "id": items[j]["id"], "score": x, "source": items[j]["source"],
                             "kind": items[j].get("kind", "image")} for r, (x, j) in enumerate(zip(s[0].tolist(), i[0].tolist()))],
                "budget": f"{budget[0]}x{budget[1]}", "first": f"{first[0]}x{first[1]}" if first else None,
                "depth": depth, "ms": ms, "bytes_read": read}

    def budget(self, params, key, default):
        spec = params.get(key, default)
        if spec is None:
            return None
        if not re.fullmatch(r"\d+x\d+", spec):
            raise BadRequest(f"{key} {spec!r} is not a budget like 2x4 (one of {', '.join(self.info()['budgets'])})")
        budget = tuple(int(x) for x in spec.split("x"))
        if budget not in self.budgets():
            raise BadRequest(f"{key} {spec} is not stored in this index: one of {', '.join(self.info()['budgets'])}")
        return budget

    @staticmethod
    def number(params, key, default):
        v = params.get(key, str(default))
        if not re.fullmatch(r"\d{1,7}", v) or int(v) < 1:
            raise BadRequest(f"{key} must be a whole number from 1, got {v!r}")
        return int(v)

    def thumbnail(self, n):
        """-> JPEG bytes of item n: its file as indexed (a regular file at the same real path), a PDF
        page, or a synthetic scene redrawn from its caption; text items have none. Images are read
        as the encoder reads them (16-bit and float images scaled, bombs refused)."""
        from machinery.backbones import load_image, to_rgb
        item = self.index.items[n]
        kind = item.get("kind")
        if kind == "synthetic":
            import data
            im = data.render(data.scene_of(item["source"]))
        elif kind in ("image", "pdf"):
            f = item["file"]
            if not os.path.isfile(f) or os.path.islink(f) or os.path.realpath(f) != f:
                raise BadRequest("not found", 404)
            if kind == "pdf":
                import pypdfium2 as pdfium
                im = pdfium.PdfDocument(f)[item["page"]].render(scale=1.0).to_pil()
            else:
                im = load_image(f)
        else:
            raise BadRequest("not found", 404)
        im = to_rgb(im)
        im.thumbnail((THUMB, THUMB))
        out = io.BytesIO()
        im.save(out, "JPEG", quality=85)
        return out.getvalue()


def decode_upload(body):
    """An uploaded file -> RGB image, by the encoder's own rules (machinery.backbones.load_image)."""
    from machinery.backbones import load_image
    try:
        return load_image(bytes(body), " (the upload)")
    except (FileNotFoundError, ValueError) as e:
        raise BadRequest(f"the body is not an image the encoder can take: {e}") from None


def handler_for(searcher):
    class Handler(BaseHTTPRequestHandler):
        server_version = "metaembed-search"

        def log_message(self, fmt, *args):                 # quiet: errors only
            pass

        def send(self, status, body, kind="application/json"):
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            self.wfile.write(data)

        def route(self, post):
            url = urlsplit(self.path)
            params = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=False).items()}
            if url.path == "/" and not post:
                return self.send(200, PAGE.read_bytes(), "text/html; charset=utf-8")
            if url.path == "/api/info" and not post:
                return self.send(200, searcher.info())
            if url.path == "/api/search":
                image = None
                if post:
                    size = int(self.headers.get("Content-Length") or 0)
                    if size > MAX_UPLOAD:
                        left = min(size, 4 * MAX_UPLOAD)      # drained, so the client reads the answer
                        while left > 0:
                            left -= len(self.rfile.read(min(1 << 20, left))) or left
                        self.close_connection = True
                        raise BadRequest(f"the upload is {size} bytes; at most {MAX_UPLOAD} are taken", 413)
                    image = decode_upload(self.rfile.read(size)) if size else None
                return self.send(200, searcher.search(params, image))
            m = re.fullmatch(r"/api/thumb/(\d{1,9})", url.path)
            if m and not post and int(m.group(1)) < searcher.index.N and int(m.group(1)) not in searcher.index.skipped:
                return self.send(200, searcher.thumbnail(int(m.group(1))), "image/jpeg")
            raise BadRequest("not found", 404)

        def answer(self, post):
            try:
                self.route(post)
            except BadRequest as e:
                self.send(e.status, {"error": str(e)})
            except (ValueError, FileNotFoundError) as e:    # e.g. a damaged index item: named, as the CLI does
                self.send(400, {"error": str(e)})
            except Exception:  # noqa: BLE001 - the server lives on; the client sees no traceback
                traceback.print_exc(file=sys.stderr)
                self.send(500, {"error": "internal error (see the server's log)"})

        def do_GET(self):
            self.answer(post=False)

        def do_POST(self):
            self.answer(post=True)
    return Handler


def make_server(searcher, host="127.0.0.1", port=8765):
    """A bound, listening server (port 0: any free one); serve_forever() to run it."""
    server = ThreadingHTTPServer((host, port), handler_for(searcher))
    server.daemon_threads = True
    return server


def run(searcher, host, port):
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"search.py serve: warning: listening on {host}, not only this machine: anyone who can reach it "
              f"can search the index and see its items", file=sys.stderr)
    server = make_server(searcher, host, port)
    print(f"serving on http://{host}:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("search.py serve: stopped")
    finally:
        server.server_close()
