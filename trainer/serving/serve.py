"""REST serving: `python -m trainer.serve --model_dir=... --port=8501 [--model_name=model]`.

Speaks TensorFlow Serving's REST predict API, so a client written for TF
Serving or Vertex AI works unchanged:
  POST /v1/models/<name>[/versions/N]:predict
       {"instances": [{"b64": "..."}, ...]}  -> {"predictions": [{output: value}, ...]}
       {"inputs": [{"b64": "..."}, ...]}     -> {"outputs": {output: [value, ...]}}
       "signature_name": "serving_images" takes uint8 [H, W, 3] nested lists instead.
  GET  /v1/models/<name>[/versions/N]       -> the model status
SageMaker hosting's routes: POST /invocations (the same JSON, or one encoded
image as the body with Content-Type application/x-image or image/*) and
GET /ping; in a Vertex AI custom container, the same at $AIP_PREDICT_ROUTE and
$AIP_HEALTH_ROUTE on $AIP_HTTP_PORT.
Owns its flags, where the model, address and port come from (a flag, then
Vertex AI's variables, then the container role's defaults: trainer.container),
the HTTP handling (standard library only; the request format is rest.py's),
one log line per request, and the batching queue: encoded images of
concurrent requests arriving within --batch_timeout_ms are run as one call of
the serving_default signature, at most --max_batch_size images. A bad request
gets a 4xx with {"error": ...}; the server keeps running.
"""

import http.server
import json
import os
import queue
import re
import signal
import sys
import threading
import time

import numpy as np
from absl import flags

from trainer import cli
from trainer.cli import Flag, UserError
from trainer.serving import inference
from trainer.serving.rest import BadRequest, model_status, parse_request

FLAGS_TABLE = (
    Flag("model_dir", "string", None, "Exported SavedModel (the model/ folder of a job-dir), local or gs://. "
         "Required, unless $AIP_STORAGE_URI names it (Vertex AI prediction).", "model"),
    Flag("model_name", "string", "model", "The <name> in /v1/models/<name>.", "model"),
    Flag("port", "integer", 8501, "TCP port; $AIP_HTTP_PORT when this flag is not given; 0 picks a free one.",
         "server"),
    Flag("host", "string", "127.0.0.1", "Address to listen on (the container's serve role: 0.0.0.0).", "server"),
    Flag("max_body_bytes", "integer", 10 * 1024 * 1024, "Larger request bodies get 413.", "server"),
    Flag("max_batch_size", "integer", 32, "Most images in one model call.", "batching"),
    Flag("batch_timeout_ms", "float", 5.0, "How long the first request of a batch waits for others.", "batching"),
)
PROGRAM = cli.Program(
    usage="python -m trainer.serve --model_dir=DIR [--port=8501] [--model_name=model] [--flag=value ...]",
    summary="Serves an exported model over TensorFlow Serving's REST predict API (and Vertex AI's routes).",
    example="python -m trainer.serve --model_dir=runs/digits/model --port=8501 --model_name=digits",
    groups=("model", "server", "batching"),
    notes="It also answers SageMaker's POST /invocations and GET /ping, and in a Vertex AI custom container "
          "$AIP_PREDICT_ROUTE and $AIP_HEALTH_ROUTE. In a container run `python -m trainer.container serve`. "
          "Stop it with Ctrl-C or SIGTERM.",
)
FLAGS = flags.FlagValues()
cli.define(FLAGS_TABLE, FLAGS)

_PATH = re.compile(r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>\d+))?(?P<verb>:\w+)?/?$")
SAGEMAKER_ROUTES = {"/invocations": ":predict", "/ping": None}  # path -> the TF Serving verb it stands for


class _Item:
    """Some encoded images of one request, waiting for their outputs."""

    def __init__(self, images):
        self.images, self.outputs, self.error = images, None, None
        self.done = threading.Event()


class Batcher:
    """Runs the encoded images of concurrent requests through serve_bytes in shared calls."""

    def __init__(self, serve_bytes, max_batch_size, timeout_s):
        self._serve, self._max, self._timeout = serve_bytes, max_batch_size, timeout_s
        self._queue, self._held = queue.Queue(), None
        threading.Thread(target=self._loop, daemon=True, name="batcher").start()

    def predict(self, images):
        """Outputs {name: array [len(images), ...]}; raises BadRequest for an undecodable image."""
        items = [_Item(images[i:i + self._max]) for i in range(0, len(images), self._max)]
        for item in items:
            self._queue.put(item)
        for item in items:
            item.done.wait()
            if item.error:
                raise item.error
        return {key: np.concatenate([item.outputs[key] for item in items]) for key in items[0].outputs}

    def _next_batch(self):
        batch = [self._held or self._queue.get()]
        self._held, size = None, len(batch[0].images)
        deadline = time.monotonic() + self._timeout
        while size < self._max:
            try:
                item = self._queue.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                break
            if size + len(item.images) > self._max:
                self._held = item  # first of the next batch: a batch never exceeds max_batch_size
                break
            batch.append(item)
            size += len(item.images)
        return batch

    def _loop(self):
        while True:
            self._run(self._next_batch())

    def _run(self, batch):
        import tensorflow as tf

        try:
            outputs = self._serve(image_bytes=tf.constant([b for item in batch for b in item.images]))
            outputs = {key: value.numpy() for key, value in outputs.items()}
            start = 0
            for item in batch:
                item.outputs = {key: value[start:start + len(item.images)] for key, value in outputs.items()}
                start += len(item.images)
        except tf.errors.InvalidArgumentError:
            if len(batch) > 1:  # find the request at fault; the others still get answers
                for item in batch:
                    self._run([item])
                return
            batch[0].error = BadRequest(f"{_undecodable(batch[0].images)} is not a JPEG, PNG, GIF or BMP image")
        except Exception as e:  # noqa: BLE001 - a model failure answers 500 instead of killing the batcher
            for item in batch:
                item.error = BadRequest(f"prediction failed: {e}", status=500)
        for item in batch:
            item.done.set()


def _undecodable(images):
    """Names the first instance of a failed request that does not decode (only failed requests pay for this)."""
    import tensorflow as tf

    for index, image in enumerate(images):
        try:
            tf.io.decode_image(image, channels=3, expand_animations=False)
        except tf.errors.InvalidArgumentError:
            return f"instance {index}"
    return "an instance"


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as TF Serving clients expect
    timeout = 60  # seconds a client may take to send its request
    server_version = "trainer.serve"

    def log_message(self, format, *args):  # noqa: A002 - BaseHTTPRequestHandler's signature
        pass  # _handle logs each request in one line of its own

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
        started, self.images = time.perf_counter(), 0
        try:
            status, payload = 200, work()
        except BadRequest as e:
            status, payload = e.status, {"error": str(e)}
            if status >= 500:
                print(f"{self.command} {self.path}: {e}", file=sys.stderr, flush=True)
        self._send(status, payload)
        self.server.log.request(self.command, self.path.split("?")[0], status, self.images,
                                (time.perf_counter() - started) * 1000)

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
        return self.rfile.read(int(length))

    def _discard(self, length):
        """Reads an oversized body away in chunks, so the client sees the 413 and not a reset connection."""
        if length > 100 * self.server.max_body_bytes:
            self.close_connection = True
            return
        while length > 0:
            chunk = self.rfile.read(min(length, 1 << 16))
            if not chunk:
                break
            length -= len(chunk)

    def _predict(self):
        body = self._read_body()
        self._route(":predict")
        signature, inputs, columnar = parse_request(body, self.headers.get("Content-Type"))
        self.images = len(inputs)
        if signature == "serving_default":
            outputs = self.server.batcher.predict(inputs)
        else:
            outputs = self._predict_images(inputs)
        return {"outputs": inference.columns(outputs)} if columnar else {"predictions": inference.rows(outputs)}

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

    def __init__(self):
        self._lock, self.requests, self.images = threading.Lock(), 0, 0

    def request(self, method, route, status, images, milliseconds):
        with self._lock:
            self.requests, self.images = self.requests + 1, self.images + images
        cli.say(f"{method} {route} {status} {images} image{'' if images == 1 else 's'} {milliseconds:.1f} ms")

    def shutdown(self):
        cli.say(f"stopped after {self.requests} requests ({self.images} images)")


def make_server(model, host, port, model_name, max_body_bytes, max_batch_size, batch_timeout_ms):
    server = http.server.ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    server.model, server.model_name, server.max_body_bytes = model, model_name, max_body_bytes
    # Vertex AI tells a custom container where its predict and health requests arrive.
    vertex = {os.environ.get("AIP_PREDICT_ROUTE"): ":predict", os.environ.get("AIP_HEALTH_ROUTE"): None}
    server.routes = {**SAGEMAKER_ROUTES, **{path: verb for path, verb in vertex.items() if path}}
    server.batcher = Batcher(model.serve_bytes, max_batch_size, batch_timeout_ms / 1000)
    server.log = RequestLog()
    return server


def settings(values, environ, defaults=None):
    """(model_dir, host, port): a flag that was given, else Vertex AI's AIP_STORAGE_URI / AIP_HTTP_PORT, else
    defaults (the container role's: trainer.container), else the flag's default. model_dir may be None."""
    defaults = defaults or {}
    model_dir = values.model_dir or environ.get("AIP_STORAGE_URI") or defaults.get("model_dir")
    host = values.host if values["host"].present else defaults.get("host", values.host)
    port = values.port
    if not values["port"].present:
        aip_port = environ.get("AIP_HTTP_PORT", "")
        port = int(aip_port) if aip_port.isdigit() else defaults.get("port", values.port)
    return model_dir, host, port


def _check(values, model_dir, port):
    """Raises UserError for the first bad value, every missing required flag named together."""
    cli.require([] if model_dir else ["model_dir"], "the model/ folder of a job-dir; see --help")
    cli.check_choices(values, FLAGS_TABLE)
    if not 0 <= port <= 65535:
        raise UserError(f"--port={port} must lie in [0, 65535]")
    for name in ("max_body_bytes", "max_batch_size"):
        if values[name].value < 1:
            raise UserError(f"--{name}={values[name].value} must be at least 1")
    if values.batch_timeout_ms < 0:
        raise UserError(f"--batch_timeout_ms={values.batch_timeout_ms} must be at least 0")
    if not re.fullmatch(r"[^/:?\s]+", values.model_name):
        raise UserError(f"--model_name={values.model_name!r} must not contain '/', ':', '?' or spaces")


def _start(values, environ, defaults=None):
    """(model, listening server) for the checked flags; UserError for a bad model folder or port."""
    model_dir, host, port = settings(values, environ, defaults)
    _check(values, model_dir, port)
    cli.import_tensorflow_quietly()
    model = inference.load(model_dir)
    try:
        server = make_server(model, host, port, values.model_name, values.max_body_bytes,
                             values.max_batch_size, values.batch_timeout_ms)
    except OSError as e:
        raise UserError(f"--port={port} on --host={host}: {e.strerror or e}") from None
    return model, server


def main(argv=None, defaults=None):
    """defaults: {"model_dir", "host", "port"} where neither a flag nor Vertex AI's variables say (a container)."""
    cli.parse_command_line(FLAGS, argv, help_of=(PROGRAM, FLAGS_TABLE))
    try:
        model, server = _start(FLAGS, os.environ, defaults)
    except UserError as e:
        cli.fail(str(e))
    host, port = server.server_address[:2]
    cli.say(f"serving {FLAGS.model_name} ({model.task}, {len(model.class_names)} classes, version {model.version} "
            f"from {model.path}) at http://{host}:{port}/v1/models/{FLAGS.model_name}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # docker stop: close the socket cleanly
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        server.log.shutdown()
