"""The server's HTTP side: routes, reading a request within its limits, answers, one log line per request.

Standard library only (the request format is rest.py's, the batching queue
batching.py's). Every request gets a JSON answer: 200, or a 4xx/5xx with
{"error": ...}, http.server's own refusals included. Hostile input is bounded:
a body above max_body_bytes gets 413; an image whose header says more than
max_image_pixels gets 413 before anything decodes it (image_limit.py), and a
model call decodes at most twice that many pixels; at most max_connections
connections get a thread (more get 503 at once); a client that pauses for
request_timeout_s seconds is dropped (408 when it stopped mid-body); at most
WORK_SLOTS requests are parsed and predicted at once. A client that goes away
is one log line, never a traceback.
"""

import http
import contextlib
import http.server
import json
import os
import queue
import re
import socket
import sys
import threading
import time
import traceback

import numpy as np

from trainer import cli
from trainer.serving import image_limit, inference
from trainer.serving.batching import Batcher
from trainer.serving.rest import BadRequest, model_status, parse_request

_PATH = re.compile(r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>\d+))?(?P<verb>:\w+)?/?$")
SAGEMAKER_ROUTES = {"/invocations": ":predict", "/ping": None}  # path -> the TF Serving verb it stands for
WORK_SLOTS = 8  # requests parsed and predicted at once: what bounds the memory of parsed bodies
REFUSAL_S = 1.0  # seconds a refused connection gets to read its 503


class ClientGone(Exception):
    """The client closed the connection, or stopped sending, before its request was whole."""


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as TF Serving clients expect
    server_version = "trainer.serve"

    def setup(self):
        self.timeout = self.server.request_timeout_s  # per read: a paused client is dropped, its thread freed
        super().setup()

    def log_message(self, format, *args):  # noqa: A002 - BaseHTTPRequestHandler's signature
        pass  # _handle logs each request in one line of its own

    def send_error(self, code, message=None, explain=None):
        """http.server's own refusals (a malformed request line or header, an unknown method) as JSON too."""
        self.close_connection = True
        try:
            self._send(code, {"error": message or http.HTTPStatus(code).phrase})
        except OSError:
            pass
        command, path = getattr(self, "command", None) or "-", (getattr(self, "path", None) or "-").split("?")[0]
        self.server.log.request(command, path, code, 0, 0.0)

    def _send(self, status, payload):
        body = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _route(self, want_verb):
        path = self.path.split("?")[0]
        if path in self.server.routes:  # SageMaker's and a Vertex AI custom container's predict and health routes
            if self.server.routes[path] != want_verb:
                raise BadRequest(f"{self.command} {path} is not supported", 405)
            return
        match = _PATH.match(path)
        if not match:
            raise BadRequest(f"no route {self.path}; use /v1/models/{self.server.model_name}[:predict]", 404)
        name, version, verb = match.group("name", "version", "verb")
        if name != self.server.model_name or version not in (None, self.server.model.version):
            raise BadRequest(f"Servable not found for request: {'Latest' if version is None else 'Specific'}({name}"
                             f"{'' if version is None else ', ' + version})", 404)
        if verb != want_verb:
            raise BadRequest(f"{self.command} {self.path} is not supported", 404 if verb else 405)

    def _handle(self, work):
        with self.server.log.in_flight():
            self._answer(work)

    def _answer(self, work):
        started, self.images = time.perf_counter(), 0
        route = self.path.split("?")[0]
        try:
            status, payload = 200, work()
        except BadRequest as e:
            status, payload = e.status, {"error": str(e)}
            if status >= 500:
                print(f"{self.command} {self.path}: {e}", file=sys.stderr, flush=True)
        except ClientGone as e:
            self.close_connection = True
            self.server.log.note(f"{self.command} {route}: {e}")
            return
        except Exception as e:  # noqa: BLE001 - a bug: the client gets a 500, the log its traceback
            traceback.print_exc()
            status, payload = 500, {"error": f"internal error: {type(e).__name__}"}
        try:
            self._send(status, payload)
        except OSError as e:  # BrokenPipeError, ConnectionResetError, a timeout: the client has gone
            self.close_connection = True
            self.server.log.note(f"{self.command} {route}: the client went away before the answer "
                                 f"({type(e).__name__})")
            return
        self.server.log.request(self.command, route, status, self.images, (time.perf_counter() - started) * 1000)

    def do_GET(self):
        def status():
            self._route(None)
            return model_status(self.server.model.version)
        self._handle(status)

    def do_POST(self):
        self._handle(self._predict)

    def _read_body(self):
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            raise BadRequest("a Content-Length header is required", 411)
        if int(length) > self.server.max_body_bytes:
            self._discard(int(length))
            raise BadRequest(f"body of {length} bytes exceeds --max_body_bytes={self.server.max_body_bytes}", 413)
        try:
            body = self.rfile.read(int(length))
        except TimeoutError:
            self.close_connection = True
            raise BadRequest(f"the body did not arrive: nothing came for --request_timeout_s="
                             f"{self.server.request_timeout_s:g} seconds", 408) from None
        except ConnectionError as e:
            raise ClientGone(f"the client went away while sending its body ({type(e).__name__})") from None
        if len(body) < int(length):
            raise ClientGone(f"the client closed the connection after {len(body)} of its {length} body bytes")
        return body

    def _discard(self, length):
        """Reads an oversized body away in chunks, so the client sees the 413 and not a reset connection."""
        if length > 100 * self.server.max_body_bytes:
            self.close_connection = True
            return
        try:
            while length > 0:
                chunk = self.rfile.read(min(length, 1 << 16))
                if not chunk:
                    break
                length -= len(chunk)
        except OSError:  # a timeout or a reset: the 413 may still reach the client
            self.close_connection = True

    def _predict(self):
        body = self._read_body()
        self._route(":predict")
        with self.server.work_slots:
            signature, inputs, columnar = parse_request(body, self.headers.get("Content-Type"))
            del body  # parsed: only the inputs stay in memory
            self.images = len(inputs)
            if signature == "serving_default":
                outputs = self.server.batcher.predict(inputs, self._pixels(inputs))
            else:
                outputs = self._predict_images(inputs)
        return {"outputs": inference.columns(outputs)} if columnar else {"predictions": inference.rows(outputs)}

    def _pixels(self, encoded_images):
        """What each image decodes to, from its header; 413 for the first above --max_image_pixels."""
        pixels = []
        for index, encoded in enumerate(encoded_images):
            found = image_limit.decoded_pixels(encoded)
            if found is not None and found[0] > self.server.max_image_pixels:
                raise BadRequest(f"instance {index} is too large to decode: its header says {found[1]}, more than "
                                 f"--max_image_pixels={self.server.max_image_pixels}", 413)
            pixels.append(found[0] if found else 0)
        return pixels

    def _predict_images(self, arrays):
        import tensorflow as tf

        if len({a.shape for a in arrays}) != 1:
            raise BadRequest("every instance of one serving_images request must have the same [height, width, 3]")
        try:
            return self.server.model.serve_images(images=tf.constant(np.stack(arrays)))
        except tf.errors.InvalidArgumentError:
            raise BadRequest("these images do not fit the serving_images signature (uint8 [B, H, W, 3])") from None


class RequestLog:
    """One line per request (method, route, status, images, milliseconds) and the totals at shutdown."""

    SHUTDOWN_WAIT_S = 5.0  # how long shutdown() waits for requests in flight to finish their line

    def __init__(self):
        self._done, self.requests, self.images, self._in_flight = threading.Condition(), 0, 0, 0

    @contextlib.contextmanager
    def in_flight(self):
        """Around a request's handling: shutdown() counts it once its answer is sent and its line written."""
        with self._done:
            self._in_flight += 1
        try:
            yield
        finally:
            with self._done:
                self._in_flight -= 1
                self._done.notify_all()

    def request(self, method, route, status, images, milliseconds):
        with self._done:
            self.requests, self.images = self.requests + 1, self.images + images
        cli.say(f"{method} {route} {status} {images} image{'' if images == 1 else 's'} {milliseconds:.1f} ms")

    def note(self, text):
        """One line about a connection that ended without an answer (a client that went away)."""
        cli.say(text)

    def shutdown(self):
        """The totals, once the requests in flight are done (a client may have its answer before the
        handler has counted it)."""
        with self._done:
            self._done.wait_for(lambda: self._in_flight == 0, timeout=self.SHUTDOWN_WAIT_S)
            cli.say(f"stopped after {self.requests} requests ({self.images} images)")


class Server(http.server.ThreadingHTTPServer):
    """A thread per connection, at most max_connections of them. The others get 503 from one thread of their own
    (what they sent is read away first, so they see the answer, not a reset), or are closed when it is behind."""

    daemon_threads = True
    block_on_close = False  # stopping does not wait for idle keep-alive connections to time out
    request_queue_size = 1024  # the listen backlog: socketserver's 5 drops the connections of a burst (SYN retries)

    def __init__(self, address, max_connections):
        super().__init__(address, Handler)
        self.connection_slots = threading.BoundedSemaphore(max_connections)
        self.max_connections = max_connections
        self._refusals = queue.Queue(maxsize=64)
        threading.Thread(target=self._refuse_forever, daemon=True, name="refuse").start()

    def process_request(self, request, client_address):
        if not self.connection_slots.acquire(blocking=False):
            try:
                self._refusals.put_nowait(request)
            except queue.Full:  # a flood: close without an answer
                self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.connection_slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connection_slots.release()

    def _refuse_forever(self):
        while True:
            self._refuse(self._refusals.get())

    def _refuse(self, request):
        """503, then up to REFUSAL_S seconds reading away what the client sends, and close."""
        body = json.dumps({"error": f"the server has --max_connections={self.max_connections} connections open; "
                                    "retry later"}).encode("utf-8")
        deadline = time.monotonic() + REFUSAL_S
        try:
            request.settimeout(REFUSAL_S)
            request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                            b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            request.shutdown(socket.SHUT_WR)
            while request.recv(1 << 16) and time.monotonic() < deadline:
                pass
        except OSError:
            pass
        request.close()
        self.log.note(f"refused a connection with 503: --max_connections={self.max_connections} are open")

    def handle_error(self, request, client_address):
        """A client that resets or times out is one line; anything else is a bug, with its traceback."""
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):
            self.log.note(f"a connection from {client_address[0]} ended: {type(error).__name__}")
        else:
            super().handle_error(request, client_address)


def make_server(model, host, port, model_name, max_body_bytes, max_batch_size, batch_timeout_ms,
                max_image_pixels=image_limit.MAX_IMAGE_PIXELS, max_connections=256, request_timeout_s=30.0):
    server = Server((host, port), max_connections)
    server.model, server.model_name, server.max_body_bytes = model, model_name, max_body_bytes
    server.max_image_pixels, server.request_timeout_s = max_image_pixels, request_timeout_s
    server.work_slots = threading.BoundedSemaphore(WORK_SLOTS)
    # Vertex AI tells a custom container where its predict and health requests arrive.
    vertex = {os.environ.get("AIP_PREDICT_ROUTE"): ":predict", os.environ.get("AIP_HEALTH_ROUTE"): None}
    server.routes = {**SAGEMAKER_ROUTES, **{path: verb for path, verb in vertex.items() if path}}
    server.batcher = Batcher(model.serve_bytes, max_batch_size, batch_timeout_ms / 1000,
                             max_batch_pixels=2 * max_image_pixels)
    server.log = RequestLog()
    return server
