"""REST serving: `python -m trainer.serve --model_dir=... --port=8501 [--model_name=model]`.

Speaks TensorFlow Serving's REST predict API, so a client written for TF
Serving or Vertex AI works unchanged:
  POST /v1/models/<name>[/versions/1]:predict
       {"instances": [{"b64": "..."}, ...]}  -> {"predictions": [{output: value}, ...]}
       {"inputs": [{"b64": "..."}, ...]}     -> {"outputs": {output: [value, ...]}}
       "signature_name": "serving_images" takes uint8 [H, W, 3] nested lists instead.
  GET  /v1/models/<name>[/versions/1]       -> the model status
and, in a Vertex AI custom container, the same at $AIP_PREDICT_ROUTE and
$AIP_HEALTH_ROUTE on $AIP_HTTP_PORT.
Owns the HTTP handling (standard library only) and the batching queue: encoded
images of concurrent requests arriving within --batch_timeout_ms are run as
one call of the serving_default signature, at most --max_batch_size images.
A bad request gets a 4xx with {"error": ...}; the server keeps running.
"""

import base64
import binascii
import http.server
import json
import queue
import os
import re
import signal
import sys
import threading
import time

import numpy as np
from absl import flags

from trainer import inference, report
from trainer.config import fail, parse_command_line

FLAGS = flags.FlagValues()
flags.DEFINE_string("model_dir", None, "Exported SavedModel (the model/ folder of a job-dir), local or gs://.", flag_values=FLAGS)
flags.DEFINE_integer("port", 8501, "TCP port (default: $AIP_HTTP_PORT, else TF Serving's 8501); 0 picks a free one.", flag_values=FLAGS)
flags.DEFINE_string("host", "0.0.0.0", "Address to listen on.", flag_values=FLAGS)
flags.DEFINE_string("model_name", "model", "The <name> in /v1/models/<name>.", flag_values=FLAGS)
flags.DEFINE_integer("max_body_bytes", 10 * 1024 * 1024, "Larger request bodies get 413.", flag_values=FLAGS)
flags.DEFINE_integer("max_batch_size", 32, "Most images in one model call.", flag_values=FLAGS)
flags.DEFINE_float("batch_timeout_ms", 5.0, "How long the first request of a batch waits for others.", flag_values=FLAGS)

_PATH = re.compile(r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>\d+))?(?P<verb>:\w+)?/?$")
SIGNATURES = ("serving_default", "serving_images")


class BadRequest(Exception):
    """Becomes an HTTP 4xx with {"error": message}."""

    def __init__(self, message, status=400):
        super().__init__(message)
        self.status = status


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
        except Exception as e:  # a model failure answers 500 instead of killing the batcher
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


def _b64(instance, where):
    if isinstance(instance, dict) and set(instance) == {"image_bytes"}:
        instance = instance["image_bytes"]
    if not (isinstance(instance, dict) and isinstance(instance.get("b64"), str)):
        raise BadRequest(f'{where} must be {{"b64": "<base64 of an encoded image>"}}')
    try:
        return base64.b64decode(instance["b64"], validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{where}: b64 is not valid base64")


def _image_array(instance, where):
    if isinstance(instance, dict) and set(instance) == {"images"}:
        instance = instance["images"]
    try:
        array = np.asarray(instance)
    except ValueError:
        array = np.asarray(0)  # ragged nested lists
    if array.ndim != 3 or array.shape[-1] != 3 or array.dtype.kind not in "iu" or array.min() < 0 or array.max() > 255:
        raise BadRequest(f"{where} must be an image: [height][width][3] integers in [0, 255]")
    return array.astype(np.uint8)


def parse_body(body):
    """(signature name, per-image inputs, columnar?) of a predict request body."""
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"malformed JSON: {e}")
    if not isinstance(request, dict) or ("instances" in request) == ("inputs" in request):
        raise BadRequest('the body must be a JSON object with one of "instances" or "inputs"')
    signature = request.get("signature_name", "serving_default")
    if signature not in SIGNATURES:
        raise BadRequest(f"unknown signature_name {signature!r}; this model has {', '.join(SIGNATURES)}")
    columnar = "inputs" in request
    values = request["inputs"] if columnar else request["instances"]
    if isinstance(values, dict) and len(values) == 1 and next(iter(values)) in ("image_bytes", "images"):
        values = next(iter(values.values()))  # {"inputs": {"image_bytes": [...]}}
    if isinstance(values, dict) and signature == "serving_default":
        values = [values]  # a single {"b64": ...}
    if not isinstance(values, list) or not values:
        raise BadRequest('"instances" / "inputs" must be a non-empty list')
    convert = _b64 if signature == "serving_default" else _image_array
    return signature, [convert(v, f"instance {i}") for i, v in enumerate(values)], columnar


def model_status():
    return {"model_version_status": [{"version": "1", "state": "AVAILABLE",
                                      "status": {"error_code": "OK", "error_message": ""}}]}


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as TF Serving clients expect
    timeout = 60  # seconds a client may take to send its request
    server_version = "trainer.serve"

    def log_message(self, format, *args):  # noqa: A002  quiet: no line per request
        pass

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
        if path in self.server.vertex_routes:  # a Vertex AI custom container's predict and health routes
            if self.server.vertex_routes[path] != want_verb:
                raise BadRequest(f"{self.command} {path} is not supported", 405)
            return
        match = _PATH.match(path)
        if not match:
            raise BadRequest(f"no route {self.path}; use /v1/models/{self.server.model_name}[:predict]", 404)
        name, version, verb = match.group("name", "version", "verb")
        if name != self.server.model_name or version not in (None, "1"):
            raise BadRequest(f"Servable not found for request: {'Latest' if version is None else 'Specific'}({name}"
                             f"{'' if version is None else ', ' + version})", 404)
        if verb != want_verb:
            raise BadRequest(f"{self.command} {self.path} is not supported", 404 if verb else 405)

    def _handle(self, work):
        try:
            status, payload = 200, work()
        except BadRequest as e:
            status, payload = e.status, {"error": str(e)}
            if status >= 500:
                print(f"{self.command} {self.path}: {e}", file=sys.stderr, flush=True)
        self._send(status, payload)

    def do_GET(self):  # noqa: N802
        def status():
            self._route(None)
            return model_status()
        self._handle(status)

    def do_POST(self):  # noqa: N802
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
        signature, inputs, columnar = parse_body(body)
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
            raise BadRequest("these images do not fit the serving_images signature (uint8 [B, H, W, 3])")


def make_server(model, host, port, model_name, max_body_bytes, max_batch_size, batch_timeout_ms):
    server = http.server.ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    server.model, server.model_name, server.max_body_bytes = model, model_name, max_body_bytes
    # Vertex AI tells a custom container where its predict and health requests arrive.
    routes = {os.environ.get("AIP_PREDICT_ROUTE"): ":predict", os.environ.get("AIP_HEALTH_ROUTE"): None}
    server.vertex_routes = {path: verb for path, verb in routes.items() if path}
    server.batcher = Batcher(model.serve_bytes, max_batch_size, batch_timeout_ms / 1000)
    return server


def _check(values):
    if not values.model_dir:
        fail("--model_dir is required (the model/ folder of a job-dir)")
    if not 0 <= values.port <= 65535:
        fail(f"--port={values.port} must lie in [0, 65535]")
    for name in ("max_body_bytes", "max_batch_size"):
        if values[name].value < 1:
            fail(f"--{name}={values[name].value} must be at least 1")
    if values.batch_timeout_ms < 0:
        fail(f"--batch_timeout_ms={values.batch_timeout_ms} must be at least 0")
    if not re.fullmatch(r"[^/:?\s]+", values.model_name):
        fail(f"--model_name={values.model_name!r} must not contain '/', ':', '?' or spaces")


def main(argv=None):
    parse_command_line(FLAGS, argv)
    _check(FLAGS)
    port = FLAGS.port
    if not FLAGS["port"].present and os.environ.get("AIP_HTTP_PORT", "").isdigit():
        port = int(os.environ["AIP_HTTP_PORT"])
    report.import_tensorflow_quietly()
    try:
        model = inference.load(FLAGS.model_dir)
        server = make_server(model, FLAGS.host, port, FLAGS.model_name, FLAGS.max_body_bytes,
                             FLAGS.max_batch_size, FLAGS.batch_timeout_ms)
    except inference.ModelError as e:
        fail(str(e))
    except OSError as e:
        fail(f"--port={port} on --host={FLAGS.host}: {e.strerror or e}")
    host, port = server.server_address[:2]
    print(f"serving {FLAGS.model_name} ({model.task}, {len(model.class_names)} classes) at "
          f"http://{host}:{port}/v1/models/{FLAGS.model_name}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # docker stop: close the socket cleanly
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
