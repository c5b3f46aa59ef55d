"""trainer.serve over real HTTP: TF Serving's predict and status API, concurrent clients, bad requests."""

import base64
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tests.conftest import EXPORTED_CLASS_NAMES as NAMES
from tests.conftest import ROOT, assert_tool_help, assert_user_error, encode, run_main, tiny_image
from trainer.serving import batching, serve
from trainer.serving.rest import BadRequest

MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def server(model_dir):
    """`python -m trainer.serve` on an ephemeral port; yields the port."""
    args = [sys.executable, "-m", "trainer.serve", f"--model_dir={model_dir}", "--host=127.0.0.1", "--port=0",
            "--model_name=tiny", f"--max_body_bytes={MAX_BODY}", "--max_batch_size=4", "--batch_timeout_ms=20"]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                               env=dict(os.environ, PYTHONPATH=ROOT, AIP_HTTP_PORT="1",
                                        AIP_PREDICT_ROUTE="/vertex/predict", AIP_HEALTH_ROUTE="/vertex/health"))
    banner = process.stdout.readline()  # printed once the socket is listening
    if "serving tiny" not in banner:
        process.kill()
        pytest.fail(f"server did not start: {banner}{process.stderr.read()}")
    yield int(banner.rsplit(":", 1)[1].split("/")[0])
    process.terminate()
    assert process.wait(timeout=30) == 0


@pytest.fixture(scope="module")
def reference(model_dir):
    import tensorflow as tf

    return tf.saved_model.load(model_dir).signatures


def request(port, method, path, body=None, headers=None):
    """(status, parsed JSON) of one HTTP request on a fresh connection."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        connection.request(method, path, body=data, headers=headers or {})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def images(count, seed=0):
    rng = np.random.default_rng(seed)
    return [encode(tiny_image(i % 3, rng, size=16 + i), "JPEG" if i % 2 else "PNG") for i in range(count)]


def b64(data):
    return {"b64": base64.b64encode(data).decode()}


def test_status_of_the_served_model_and_404_for_another(server):
    assert request(server, "GET", "/v1/models/tiny") == (200, {"model_version_status": [
        {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]})
    assert request(server, "GET", "/v1/models/tiny/versions/1")[0] == 200
    status, body = request(server, "GET", "/v1/models/other")
    assert status == 404 and "other" in body["error"]


def test_concurrent_clients_get_the_models_own_predictions(server, reference):
    import tensorflow as tf

    pictures = images(12)
    # 8 clients at once, 1 to 3 images each: the server batches across them.
    chunks = [pictures[i:i + 1 + i % 3] for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda chunk: request(server, "POST", "/v1/models/tiny:predict",
                                                      {"instances": [b64(p) for p in chunk]}), chunks))
    for chunk, (status, body) in zip(chunks, answers):
        assert status == 200, body
        want = reference["serving_default"](image_bytes=tf.constant(chunk))
        assert len(body["predictions"]) == len(chunk)
        for i, row in enumerate(body["predictions"]):
            assert set(row) == {"probabilities", "classes", "scores", "class_names"}
            np.testing.assert_allclose(row["probabilities"], want["probabilities"].numpy()[i], atol=1e-5)
            assert row["classes"] == want["classes"].numpy()[i].tolist()
            assert row["class_names"] == [NAMES[c] for c in row["classes"]]


def test_columnar_inputs_and_the_uint8_image_signature(server, reference):
    import tensorflow as tf

    picture = images(1)[0]
    status, body = request(server, "POST", "/v1/models/tiny/versions/1:predict",
                           {"inputs": {"image_bytes": [b64(picture)]}})
    assert status == 200 and set(body) == {"outputs"}
    want = reference["serving_default"](image_bytes=tf.constant([picture]))["probabilities"].numpy()
    np.testing.assert_allclose(body["outputs"]["probabilities"], want, atol=1e-5)

    pixels = np.random.default_rng(1).integers(0, 256, size=(2, 9, 7, 3), dtype=np.uint8)
    status, body = request(server, "POST", "/v1/models/tiny:predict",
                           {"signature_name": "serving_images", "instances": pixels.tolist()})
    assert status == 200, body
    want = reference["serving_images"](images=tf.constant(pixels))["probabilities"].numpy()
    np.testing.assert_allclose([row["probabilities"] for row in body["predictions"]], want, atol=1e-5)


def test_vertex_ai_routes_answer_like_the_tf_serving_ones(server):
    assert request(server, "GET", "/vertex/health") == request(server, "GET", "/v1/models/tiny")
    picture = {"instances": [b64(images(1)[0])]}
    assert request(server, "POST", "/vertex/predict", picture) == request(server, "POST", "/v1/models/tiny:predict", picture)


BAD_REQUESTS = [
    (b'{"instances": [', 400, "malformed JSON"),
    ({"instances": [{"b64": "not base64!"}]}, 400, "not valid base64"),
    ({"instances": [b64(b"plain text, not an image")]}, 400, "instance 0 is not a JPEG, PNG, GIF or BMP image"),
    ({"instances": [b64(images(2)[0]), b64(b"corrupt!"), b64(images(2)[1])]}, 400,
     "instance 1 is not a JPEG, PNG, GIF or BMP image"),
    ({"instances": ["raw string"]}, 400, '"b64"'),
    ({"instances": []}, 400, "non-empty list"),
    ({"predictions": []}, 400, '"instances" or "inputs"'),
    ({"signature_name": "nope", "instances": [{"b64": ""}]}, 400, "unknown signature_name"),
    ({"signature_name": "serving_images", "instances": [[1, 2, 3]]}, 400, "[height][width][3]"),
    ({"signature_name": "serving_images", "instances": [[[[1, 2, 3]]], [[[1, 2, 3], [4, 5, 6]]]]}, 400, "same"),
    (b"x" * (MAX_BODY + 1), 413, "--max_body_bytes"),
]


@pytest.mark.parametrize("body, status, fragment", BAD_REQUESTS)
def test_bad_requests_get_a_4xx_with_a_json_error(server, body, status, fragment):
    got_status, got = request(server, "POST", "/v1/models/tiny:predict", body)
    assert got_status == status and fragment in got["error"]


def test_a_bad_request_among_concurrent_good_ones_fails_alone(server):
    good, bad = {"instances": [b64(p) for p in images(2)]}, {"instances": [b64(b"GIF89a broken")]}
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda body: request(server, "POST", "/v1/models/tiny:predict", body),
                                [good, bad, good, good, bad, good]))
    assert [status for status, _ in answers] == [200, 400, 200, 200, 400, 200]
    assert request(server, "GET", "/v1/models/tiny")[0] == 200  # still serving


def test_batcher_joins_waiting_requests_up_to_the_batch_size():
    """While one model call runs, arriving requests queue; the next call takes them, never more than 4 images."""
    import tensorflow as tf

    calls, release = [], threading.Event()

    def fake_model(image_bytes):
        calls.append(image_bytes.numpy().tolist())
        release.wait()
        if b"bad" in calls[-1]:
            raise tf.errors.InvalidArgumentError(None, None, "undecodable")
        return {"probabilities": tf.constant([[len(b)] for b in calls[-1]], tf.float32)}

    batcher = batching.Batcher(fake_model, max_batch_size=4, timeout_s=0)
    with ThreadPoolExecutor(8) as pool:
        first = pool.submit(batcher.predict, [b"a"])
        while not calls:
            release.wait(0.01)
        later = [pool.submit(batcher.predict, items) for items in ([b"bb"], [b"bad"], [b"dddd", b"eeeee"], [b"f"])]
        while batcher._queue.qsize() < 4:
            release.wait(0.01)
        release.set()
        assert first.result()["probabilities"].tolist() == [[1]]
        assert later[0].result()["probabilities"].tolist() == [[2]]
        with pytest.raises(BadRequest, match="not a JPEG"):
            later[1].result()
        assert later[2].result()["probabilities"].tolist() == [[4], [5]]
        assert later[3].result()["probabilities"].tolist() == [[1]]
    assert calls[1] == [b"bb", b"bad", b"dddd", b"eeeee"]  # one call for three requests
    assert all(len(call) <= 4 for call in calls)


@pytest.mark.parametrize("args, fragment", [
    (["--port=70000"], "--port=70000 must lie in [0, 65535]"),
    (["--model_dir="], "--model_dir is required"),
    (["--max_batch_size=0"], "--max_batch_size=0 must be at least 1"),
    (["--batch_timeout_ms=-1"], "--batch_timeout_ms=-1.0 must be at least 0"),
    (["--model_name=a/b"], "--model_name='a/b' must not contain"),
    (["--bogus=1"], "bogus"),
])
def test_bad_flags_exit_with_one_error_line(capsys, args, fragment):
    assert_user_error(run_main(serve.main, ["--model_dir=m"] + args, capsys), fragment)


def test_a_folder_without_a_model_or_a_taken_port_is_one_error_line(model_dir, tmp_path, capsys):
    result = run_main(serve.main, [f"--model_dir={tmp_path}", "--port=0"], capsys)
    assert_user_error(result, f"--model_dir={tmp_path} holds no saved_model.pb")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        serve.FLAGS.unparse_flags()
        serve.FLAGS(["serve", f"--model_dir={model_dir}", "--host=127.0.0.1", f"--port={port}"])
        # _start, not main: were the port free after all, main would serve forever instead of failing.
        with pytest.raises(serve.UserError, match=f"--port={port} on --host=127.0.0.1"):
            serve._start(serve.FLAGS, {})


def test_help_shows_usage_an_example_and_the_flags_by_group(capsys):
    result = run_main(serve.main, ["--help"], capsys)
    assert_tool_help(result, "trainer.serve", ("model", "server", "batching"), None, 8501)
    assert "unless $AIP_STORAGE_URI names it" in " ".join(result.stdout.split())


def test_vertex_ai_prediction_names_the_model_by_aip_storage_uri(model_dir):
    serve.FLAGS.unparse_flags()
    serve.FLAGS(["serve", "--host=127.0.0.1", "--port=0"])  # no --model_dir: the platform names the artifacts
    model, server = serve._start(serve.FLAGS, {"AIP_STORAGE_URI": model_dir})
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert model.class_names == tuple(NAMES)
        status, body = request(server.server_address[1], "GET", "/v1/models/model")
        assert status == 200 and body["model_version_status"][0]["state"] == "AVAILABLE"
    finally:
        server.shutdown()
        server.server_close()
