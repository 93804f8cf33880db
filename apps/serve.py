"""`search.py serve`: a local search page over an index, the standard library's HTTP server.

Routes (nothing else is served; no path from a request is ever opened):
    GET  /                      the page (apps/search_page.html)
    GET  /api/info              the index's size, budgets, model and dimension
    GET  /api/search?q=TEXT&budget=AxB&k=K[&first=AxB&depth=N]
    POST /api/search?...        an image as the body (with or without q)
    GET  /api/thumb/<n>         a thumbnail of indexed item n (its file as indexed, never a link swapped in)
Errors are {"error": ...} with a 4xx status (503 while the index on disk differs from the one
served); no traceback reaches a client. Searches are serialized on the model (one encode at a
time); the page and thumbnails are served in parallel, by at most MAX_THREADS threads.

Safe to leave running (docs/search.md has the figures): only requests naming the served address
in Host are answered, and only from the page itself (Origin / Sec-Fetch-Site; no CORS headers),
so no other web site can read or drive it; a body needs a Content-Length within MAX_UPLOAD and an
upload at most MAX_PIXELS decoded pixels; a socket idle for TIMEOUT seconds, a request line and
headers not in after HEADER_DEADLINE, or a connection open for DEADLINE, is closed; a request holds
one of the MAX_THREADS slots only once its headers are in (slow clients cannot starve fast ones);
only a path (origin-form) is taken as the target, and one Host and Content-Length header; the
image formats decoded are machinery.backbones.FORMATS only.
"""
import io
import json
import os
import re
import socket
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from collections import OrderedDict
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from apps.search_index import Index, plan, stored_budgets
from machinery.index import vector_bytes

MAX_UPLOAD = 20 << 20          # bytes of an uploaded query image
MAX_PIXELS = 25_000_000        # decoded pixels of an uploaded query image (a 6000 x 4000 photo fits)
THUMB = 256                    # pixels of a thumbnail's longer edge
THUMBS_CACHED = 1024           # thumbnails kept (a few MB of JPEG)
MAX_THREADS = 16               # requests handled at once (from when their headers are in)
CONNECTIONS = 4                # x MAX_THREADS: connections open at once; more wait in the listen queue
TIMEOUT = 10                   # seconds a socket may sit idle mid-request
HEADER_DEADLINE = 5            # seconds for a request's line and headers (a slow client cannot hold a slot)
DEADLINE = 60                  # seconds a connection may stay open at all
DECODES = 2                    # uploads and thumbnails decoded at once (their memory is the peak)
PAGE = Path(__file__).with_name("search_page.html")


class BadRequest(ValueError):
    def __init__(self, message, status=400):
        super().__init__(message)
        self.status = status


class Searcher:
    """The index, its model and one lock: what every request shares. Before each request the index
    folder is compared with what was opened (machinery.index.stamp): an index rebuilt in place by
    the same checkpoint is reopened whole (items, sizes, vectors); by another, or half-written, the
    server answers 503 naming the problem until it is put right."""

    def __init__(self, index, model):
        self.index, self.model = index, model
        self.lock = threading.Lock()                       # the model and the index: one search at a time
        self.decoding = threading.BoundedSemaphore(DECODES)
        self.thumbs, self.thumbs_lock = OrderedDict(), threading.Lock()
        self.reopening = threading.Lock()                  # not the search lock: thumbnails never wait on a search

    def current(self):
        """The index as it is on disk now (reopened if it was rebuilt by this model), or a 503."""
        with self.reopening:
            problem = self.index.changed()
            if problem is None:
                return self.index
            try:
                fresh = Index(self.index.path)
            except (ValueError, FileNotFoundError, OSError) as e:
                raise BadRequest(f"{problem}, and cannot be reopened: {e}", 503) from None
            if fresh.meta.get("fingerprint") != self.model.fingerprint:
                raise BadRequest(f"{problem}: it was rebuilt with another checkpoint ({fresh.checkpoint}); restart "
                                 f"`search.py serve` to serve it", 503)
            if fresh.changed() is not None:                # still being written
                raise BadRequest(f"{problem} and is still changing; try again", 503)
            self.index = fresh
            with self.thumbs_lock:
                self.thumbs.clear()
            return fresh

    def info(self):
        index = self.current()
        m = index.meta
        return {"count": index.N - len(index.skipped), "budgets": [str(b) for b in stored_budgets(index.meta)],
                "model": index.checkpoint, "backbone": m.get("backbone"), "dim": index.D, "dtype": m["dtype"],
                "precision": index.precision}

    def search(self, params, body=None, content_type=None):
        """A search; body: an uploaded image's bytes, decoded once the parameters are found good,
        and held (DECODES at a time, one encoding) until its search is done: the memory is bounded."""
        if body is None:
            return self.run(params)
        self.plan(self.current(), params)
        with self.decoding:
            return self.run(params, decode_upload(body, content_type))

    def plan(self, index, params):
        k = self.number(params, "k", 10)
        depth = self.number(params, "depth", None)
        try:
            return (*plan(index.meta, params.get("budget", "16x64"), params.get("first"), depth, k, flag=""), k)
        except ValueError as e:
            raise BadRequest(str(e)) from None

    def run(self, params, image=None):
        index = self.current()
        text = params.get("q", "")
        budget, first, depth, k = self.plan(index, params)
        if not text and image is None:
            raise BadRequest("a search needs q (a text) or an image in the body")
        t = time.perf_counter()
        with self.lock:                           # one encode and search at a time
            q = self.model.encode_queries([text], [image] if image is not None else None)
            try:
                s, i = index.search(q, budget, k, first, depth or 1000)
            except ValueError as e:                # files changed mid-search, or damaged: not the client's fault
                raise BadRequest(f"{index.changed()}: {e}" if index.changed() else str(e), 503) from None
        ms = 1e3 * (time.perf_counter() - t)
        items = index.items
        low = vector_bytes(index.D, index.precision)                                 # what the first pass reads
        vector = index.vectors.float_vector_bytes if budget[1] <= index.vectors.float_r_c else low  # the rescoring's
        read = index.N * (first or budget)[1] * low + (min(depth, index.N) * budget[1] * vector if first else 0)
        return {"results": [{"rank": r + 1, "n": j, "id": items[j]["id"], "score": x, "source": items[j]["source"],
                             "kind": items[j].get("kind", "image")} for r, (x, j) in enumerate(zip(s[0].tolist(), i[0].tolist()))],
                "budget": str(budget), "first": str(first) if first else None,
                "depth": depth, "ms": ms, "bytes_read": read}

    @staticmethod
    def number(params, key, default):
        v = params.get(key, None if default is None else str(default))
        if v is None:
            return None
        if not re.fullmatch(r"\d{1,7}", v) or int(v) < 1:
            raise BadRequest(f"{key} must be a whole number from 1, got {v[:40]!r}")
        return int(v)

    def thumbnail(self, n):
        """-> JPEG bytes of item n (kept: THUMBS_CACHED of them), or a 404."""
        index = self.current()
        if not 0 <= n < index.N or n in index.skipped:
            raise BadRequest("not found", 404)
        item = index.items[n]
        key = (n, thumb_file(item))               # the file checked each time; its identity keys the cache
        with self.thumbs_lock:
            if key in self.thumbs:
                self.thumbs.move_to_end(key)
                return self.thumbs[key]
        with self.decoding:
            jpeg = render_thumbnail(item)
        with self.thumbs_lock:
            self.thumbs[key] = jpeg
            while len(self.thumbs) > THUMBS_CACHED:
                self.thumbs.popitem(last=False)
        return jpeg


def thumb_file(item):
    """An image or PDF item's file as indexed (a regular file at the same real path, never a link
    swapped in) -> its (inode, size, mtime); None for items drawn without a file; else a 404."""
    if item.get("kind") not in ("image", "pdf"):
        return None
    f = item["file"]
    if not os.path.isfile(f) or os.path.islink(f) or os.path.realpath(f) != f:
        raise BadRequest("not found", 404)
    st = os.stat(f)
    return st.st_ino, st.st_size, st.st_mtime_ns


def render_thumbnail(item):
    """JPEG bytes of an item at THUMB px: its file as indexed (a regular file at the same real path;
    JPEG decoded at a reduced scale, PDF pages rendered at the scale that gives THUMB px), or a
    synthetic scene redrawn from its caption; text items have none. Images go through the
    encoder's one loader (its formats, 16-bit and float images scaled, bombs refused)."""
    from machinery.backbones import load_image, to_rgb
    kind = item.get("kind")
    if kind == "synthetic":
        import data
        im = data.render(data.scene_of(item["source"]))
    elif kind in ("image", "pdf"):
        f = item["file"]
        thumb_file(item)
        if kind == "pdf":
            import pypdfium2 as pdfium
            try:
                page = pdfium.PdfDocument(f)[item["page"]]
                im = page.render(scale=THUMB / max(page.get_size())).to_pil()     # points -> THUMB px
            except (pdfium.PdfiumError, IndexError, ValueError, ZeroDivisionError) as e:
                raise ValueError(f"page {item['page'] + 1} of the indexed PDF cannot be rendered ({e})") from None
        else:
            im = load_image(f, draft=(THUMB, THUMB))
    else:
        raise BadRequest("not found", 404)
    im = to_rgb(im)
    im.thumbnail((THUMB, THUMB))
    out = io.BytesIO()
    im.save(out, "JPEG", quality=85)
    return out.getvalue()


def decode_upload(body, content_type=None):
    """An uploaded file -> RGB image, by the encoder's own rules (machinery.backbones.load_image),
    at most MAX_PIXELS decoded pixels (counted from the header, before decoding)."""
    from machinery.backbones import FORMATS, load_image
    try:
        return load_image(bytes(body), " (the upload)", max_pixels=MAX_PIXELS)
    except (FileNotFoundError, ValueError) as e:
        if "pixels, over" in str(e):
            raise BadRequest(f"the upload is too large to decode: {e}", 413) from None
        kind = (content_type or "").split(";")[0].strip().lower()
        said = f" (it came as {kind}: send the file's own bytes, not a form, multipart or JSON)" \
            if kind.startswith(FORM_TYPES) else ""
        raise BadRequest(f"the body is not an image the encoder can take: the body must be the raw bytes of one "
                         f"image ({', '.join(FORMATS)}){said}: {e}") from None


FORM_TYPES = ("multipart/", "application/x-www-form-urlencoded", "application/json")   # what a raw body is not


def allowed_hosts(host, port):
    """The Host headers answered: the served address by its loopback names and as --host gave it,
    with the port (a page that rebinds its own name to this address sends its own name: refused)."""
    names = {"127.0.0.1", "localhost", "[::1]", f"[{host}]" if ":" in host else host}
    return {f"{h}:{port}".lower() for h in names} | ({h.lower() for h in names} if port == 80 else set())


class Handler(BaseHTTPRequestHandler):
    server_version = "metaembed-search"
    timeout = TIMEOUT                                  # each read and write on the socket

    def log_message(self, fmt, *args):                 # quiet: errors only
        pass

    def send(self, status, body, kind="application/json", head=False):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Content-Type-Options", "nosniff")
        if status == 405:
            self.send_header("Allow", "GET, HEAD, POST")
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def check_origin(self):
        """Only the page this server serves may use it: Host names this address, and a browser's
        request comes from this origin (Origin, Sec-Fetch-Site), so no other site can read or drive it."""
        host = (self.headers.get("Host") or "").strip().lower()
        if host not in self.server.hosts:
            raise BadRequest(f"Host {host[:100]!r} is not this server's address ({', '.join(sorted(self.server.hosts))})", 403)
        origin = self.headers.get("Origin")
        if origin is not None and origin.lower() not in {f"http://{h}" for h in self.server.hosts}:
            raise BadRequest(f"cross-origin request from {origin[:100]!r} refused", 403)
        if self.headers.get("Sec-Fetch-Site", "same-origin").lower() not in ("same-origin", "none"):
            raise BadRequest("cross-site request refused", 403)

    def read_body(self):
        """The raw image bytes of a POST: a Content-Length within MAX_UPLOAD, never a read
        without a bound; a chunked body is refused with what to send instead."""
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise BadRequest("a body must be sent with a Content-Length (Transfer-Encoding is not accepted)", 411)
        length = self.headers.get("Content-Length")
        if length is None or not length.strip():
            return None
        if not re.fullmatch(r"\d{1,15}", length.strip()):
            self.close_connection = True
            raise BadRequest(f"Content-Length {length[:40]!r} is not a byte count", 400)
        size = int(length)
        if size > MAX_UPLOAD:
            self.close_connection = True
            left = min(size, 4 * MAX_UPLOAD)      # drained (up to 80 MB), so the client reads the answer
            while left > 0:
                left -= len(self.rfile.read(min(1 << 20, left))) or left
            raise BadRequest(f"the upload is {size} bytes; at most {MAX_UPLOAD} are taken", 413)
        body = self.rfile.read(size) if size else b""
        if len(body) != size:
            self.close_connection = True
            raise BadRequest(f"the body ended after {len(body)} of its {size} bytes", 400)
        return body or None

    def route(self, post, head=False):
        if not self.path.startswith("/"):              # absolute-form (GET http://evil/...): not a path here
            raise BadRequest(f"the request target {self.path[:60]!r} is not a path: send its path (/api/...)")
        if self.path.startswith("//"):                 # urlsplit would read a host from it
            raise BadRequest("not found", 404)
        for name in ("Host", "Content-Length"):        # which one would win is a proxy's guess: refused
            if len(self.headers.get_all(name) or []) > 1:
                self.close_connection = True
                raise BadRequest(f"{name} is given {len(self.headers.get_all(name))} times: send it once")
        self.check_origin()
        url = urlsplit(self.path)
        params = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        if url.path == "/" and not post:
            return self.send(200, PAGE.read_bytes(), "text/html; charset=utf-8", head)
        if url.path == "/api/info" and not post:
            return self.send(200, self.server.searcher.info(), head=head)
        if url.path == "/api/search":
            body = self.read_body() if post else None
            return self.send(200, self.server.searcher.search(params, body, self.headers.get("Content-Type")),
                             head=head)
        m = re.fullmatch(r"/api/thumb/(\d{1,9})", url.path)
        if m and not post:
            return self.send(200, self.server.searcher.thumbnail(int(m.group(1))), "image/jpeg", head)
        raise BadRequest("not found", 404)

    def handle(self):                              # the connection, at most DEADLINE seconds in all
        self.ends, self.timer, self.slot = time.monotonic() + DEADLINE, None, False
        try:
            super().handle()
        finally:
            self.arm(None)

    def arm(self, seconds):
        """One hang-up timer at a time: `seconds` from now, never past the connection's DEADLINE
        (None: none)."""
        if self.timer is not None:
            self.timer.cancel()
        self.timer = None
        if seconds is not None:
            self.timer = threading.Timer(max(0.0, min(seconds, self.ends - time.monotonic())), self.hang_up)
            self.timer.daemon = True
            self.timer.start()

    def parse_request(self):
        """The request line and headers are in (within HEADER_DEADLINE): only now is a slot taken,
        and the rest (body, search, answer) has until the connection's DEADLINE."""
        if not super().parse_request():
            return False
        self.arm(DEADLINE)
        self.server.slots.acquire()
        self.slot = True
        return True

    def answer(self, post, head=False):
        try:
            self.route(post, head)
        except BadRequest as e:
            self.send(e.status, {"error": str(e)}, head=head)
        except (ConnectionError, TimeoutError, socket.timeout):   # the client left or stalled: nobody to answer
            self.close_connection = True
        except (ValueError, FileNotFoundError) as e:    # e.g. a damaged index item: named, as the CLI does
            self.send(400, {"error": str(e)}, head=head)
        except Exception:  # noqa: BLE001 - the server lives on; the client sees no traceback
            traceback.print_exc(file=sys.stderr)
            self.send(500, {"error": "internal error (see the server's log)"}, head=head)

    def hang_up(self):
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def handle_one_request(self):
        self.arm(HEADER_DEADLINE)                  # the request line and headers: a few seconds
        try:
            super().handle_one_request()
        except (ConnectionError, TimeoutError, socket.timeout):   # a reply cut short: no traceback
            self.close_connection = True
        finally:
            if self.slot:
                self.slot = False
                self.server.slots.release()

    def do_GET(self):
        self.answer(post=False)

    def do_HEAD(self):
        self.answer(post=False, head=True)

    def do_POST(self):
        self.answer(post=True)

    def do_OPTIONS(self):                      # no CORS preflight is ever granted
        self.send(405, {"error": "OPTIONS is not served (no cross-origin use)"})

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS


class Server(ThreadingHTTPServer):
    """ThreadingHTTPServer with at most `threads` requests handled at once (a slot is taken once a
    request's headers are in) and CONNECTIONS x threads connections open (the accept loop waits for
    one to close; a connection that sends no whole request line and headers is closed after
    HEADER_DEADLINE); further connections wait in the kernel's listen queue."""
    daemon_threads = True
    request_queue_size = 64

    def __init__(self, address, handler, threads=MAX_THREADS):
        self.slots = threading.BoundedSemaphore(threads)
        self.connections = threading.BoundedSemaphore(CONNECTIONS * threads)
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        self.connections.acquire()
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.connections.release()
            raise

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):   # a client gone: nothing to say
            super().handle_error(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connections.release()


def make_server(searcher, host="127.0.0.1", port=8765, threads=MAX_THREADS):
    """A bound, listening server (port 0: any free one); serve_forever() to run it. searcher may be
    set later (server.searcher = ...): search.py serve binds before the model loads. A port taken,
    out of range or an address not of this machine is one ValueError."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port {port}: a port is 0..65535")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        server = type("Server", (Server,), {"address_family": family})((host, port), Handler, threads)
    except socket.gaierror as e:
        raise ValueError(f"--host {host}: not an address this machine can listen on ({e.strerror})") from None
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}"
                         + (" (--port: another program uses it; choose another)" if e.errno == 98 else
                            " (--host: not an address of this machine)" if e.errno == 99 else "")) from None
    server.searcher, server.hosts = searcher, allowed_hosts(host, server.server_address[1])
    return server


def run(searcher, host, port, server=None):
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"search.py serve: warning: listening on {host}, not only this machine: anyone who can reach it "
              f"can search the index and see its items", file=sys.stderr)
    server = server or make_server(searcher, host, port)
    server.searcher = searcher
    print(f"serving on http://{host}:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("search.py serve: stopped")
    finally:
        server.server_close()
