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
and starting and stopping the server. The HTTP side (routes, limits, one log
line per request) is http_server.py's, the request format rest.py's, the
batching queue batching.py's. A bad request gets a 4xx with {"error": ...};
the server keeps running. Hostile input is bounded by the server flags: the
body's bytes, an image's pixels (read from its header, before decoding), the
connections served at once, and how long a client may pause.
"""

import os
import re
import signal
import threading

from absl import flags

from trainer import cli
from trainer.cli import Flag, UserError
from trainer.serving import image_limit, inference
from trainer.serving.http_server import make_server

FLAGS_TABLE = (
    Flag("model_dir", "string", None, "Exported SavedModel (the model/ folder of a job-dir), local or gs://. "
         "Required, unless $AIP_STORAGE_URI names it (Vertex AI prediction).", "model"),
    Flag("model_name", "string", "model", "The <name> in /v1/models/<name>.", "model"),
    Flag("port", "integer", 8501, "TCP port; $AIP_HTTP_PORT when this flag is not given; 0 picks a free one.",
         "server"),
    Flag("host", "string", "127.0.0.1", "Address to listen on (the container's serve role: 0.0.0.0).", "server"),
    Flag("max_body_bytes", "integer", 10 * 1024 * 1024, "Larger request bodies get 413.", "server"),
    Flag("max_image_pixels", "integer", image_limit.MAX_IMAGE_PIXELS, "An image whose header says more pixels "
         "(width x height, x frames for a GIF) gets 413 before it is decoded; one model call decodes at most twice "
         "this many.", "server"),
    Flag("max_connections", "integer", 256, "Connections served at once, a thread each; more get 503.", "server"),
    Flag("request_timeout_s", "float", 30.0, "Seconds a client may pause while sending a request, or keep an idle "
         "connection open.", "server"),
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
    for name in ("max_body_bytes", "max_batch_size", "max_image_pixels", "max_connections"):
        if values[name].value < 1:
            raise UserError(f"--{name}={values[name].value} must be at least 1")
    if not 0 < values.request_timeout_s < float("inf"):
        raise UserError(f"--request_timeout_s={values.request_timeout_s} must be a positive number of seconds")
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
                             values.max_batch_size, values.batch_timeout_ms, values.max_image_pixels,
                             values.max_connections, values.request_timeout_s)
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
    # docker stop: serve_forever returns at its next poll and the socket closes cleanly. The handler only asks:
    # an exception raised into the main thread wherever the signal lands (sys.exit) could leave a lock held.
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, name="stop").start())
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        server.log.shutdown()
