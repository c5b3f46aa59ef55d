"""The image's three roles, driven as each platform drives them: SageMaker training (`train` over a
SAGEMAKER_BASE_DIR tree), SageMaker hosting and Vertex AI prediction (`serve` over real HTTP)."""

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import numpy as np
import pytest

from tests.conftest import EXPORTED_CLASS_NAMES, ROOT, encode, run_cli, tiny_image, write_folder, write_tfrecords
from trainer import cluster, container, sagemaker, sources
from trainer.cli import UserError

# As SageMaker writes them: every value a string; the SDK's framework estimators JSON-encode strings.
HYPERPARAMETERS = {
    "num_classes": "2", "model_type": '"resnet-18"', "image_size": "16", "max_steps": "4", "eval_frequency": "2",
    "train_batch_size": "8", "eval_batch_size": "8", "initial_learning_rate": "0.01", "optimizer_type": "adam",
    "log_frequency": "2", "random_flip": "False", "sagemaker_region": '"eu-west-1"',
    "_tuning_objective_metric": "top_1_accuracy",
}


def sagemaker_tree(base, hyperparameters=HYPERPARAMETERS):
    """/opt/ml as SageMaker lays it out: the train channel a folder of TFRecord shards, validation one of classes."""
    config = base / "input" / "config"
    config.mkdir(parents=True)
    train = base / "input" / "data" / "train"
    write_tfrecords(train, per_class=12, shards=2)
    for i, shard in enumerate(sorted(train.iterdir())):  # the names Google's converters give shards
        shard.rename(train / f"train-{i:05d}-of-00002")
    (train / "_SUCCESS").write_text("")
    write_folder(base / "input" / "data" / "validation", per_class=4)
    (config / "hyperparameters.json").write_text(json.dumps(hyperparameters))
    (config / "resourceconfig.json").write_text(json.dumps({"current_host": "algo-1", "hosts": ["algo-1"]}))
    (config / "inputdataconfig.json").write_text(json.dumps(
        {"train": {"TrainingInputMode": "File"}, "validation": {"TrainingInputMode": "FastFile"}}))
    return base


def run_container(args, base, env=None):
    return run_cli("trainer.container", args, env={"SAGEMAKER_BASE_DIR": str(base), **(env or {})})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A SageMaker training job run to its end: (base folder, the finished process)."""
    base = sagemaker_tree(tmp_path_factory.mktemp("opt_ml"))
    return base, run_container(["train"], base)


def test_sagemaker_training_writes_a_numbered_savedmodel_that_tensorflow_serves(trained):
    import tensorflow as tf

    base, result = trained
    assert result.returncode == 0, result.stderr[-3000:]
    translation = result.stdout.splitlines()[0]
    assert "--random_flip=False" in translation and "--model_type=resnet-18" in translation
    assert "sagemaker_region" not in translation and f"--training_data_path={base}/input/data/train" in translation
    assert sorted(os.listdir(base / "model")) == ["1"]  # the version folder TF Serving's container expects
    signature = tf.saved_model.load(str(base / "model" / "1")).signatures["serving_default"]
    picture = encode(tiny_image(1, np.random.default_rng(5)), "PNG")
    outputs = signature(image_bytes=tf.constant([picture]))
    assert outputs["probabilities"].shape == (1, 2)
    assert set(outputs["class_names"].numpy()[0].tolist()) <= {b"0", b"1"}
    assert json.loads((base / "checkpoints" / "state.json").read_text())["step"] == 4
    data = base / "output" / "data"
    assert json.loads((data / "config.json").read_text())["random_flip"] is False
    assert {"metrics.json", "labels.txt", "logs"} <= set(os.listdir(data))
    assert not (base / "output" / "failure").exists()


def test_a_restarted_job_resumes_from_the_checkpoints_folder(tmp_path):
    """Managed spot training: the restarted job finds checkpoints/ as the first attempt left it (SageMaker syncs
    it), the rest of the instance fresh, and runs `train` again."""
    base = sagemaker_tree(tmp_path / "opt_ml", {**HYPERPARAMETERS, "max_steps": "2"})
    assert run_container(["train"], base).returncode == 0
    shutil.rmtree(base / "model")
    shutil.rmtree(base / "output")
    (base / "input" / "config" / "hyperparameters.json").write_text(json.dumps(HYPERPARAMETERS))  # max_steps 4
    result = run_container(["train"], base)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from the checkpoint at step 2" in result.stdout
    assert "step 4/4" in result.stdout and "step 2/" not in result.stdout
    assert (base / "model" / "1" / "saved_model.pb").exists()


@pytest.mark.parametrize("name, value, fragment", [
    ("random_flip", "maybe", "random_flip"),  # absl's boolean parse
    ("optimizer_type", "sgd", "--optimizer_type must be one of"),  # the Config's check
    ("job-dir", "s3://b/out", "hyperparameter job-dir"),  # the translation's own
])
def test_a_bad_hyperparameter_fails_the_job_with_its_error_line_in_output_failure(tmp_path, name, value, fragment):
    base = sagemaker_tree(tmp_path / "opt_ml", {**HYPERPARAMETERS, name: value})
    (base / "output").mkdir()
    (base / "output" / "failure").write_text("an earlier attempt's failure\n")
    result = run_container(["train"], base)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert (base / "output" / "failure").read_text() == error[-1] + "\n"
    assert fragment in error[-1]


def test_an_unexpected_exception_leaves_its_last_line_in_output_failure(tmp_path, monkeypatch):
    from trainer import task

    base = sagemaker_tree(tmp_path / "opt_ml")

    def broken(argv):
        raise RuntimeError("in user code:\n\n    File x.py\n\n    ValueError: the cause")

    monkeypatch.setattr(task, "main", broken)
    with pytest.raises(SystemExit) as stopped:
        container.main(["trainer.container", "train"], environ=dict(os.environ, SAGEMAKER_BASE_DIR=str(base)))
    assert stopped.value.code == 1
    assert (base / "output" / "failure").read_text() == "RuntimeError: ValueError: the cause\n"


def test_hyperparameters_and_channels_become_the_trainers_flags_and_variables(tmp_path):
    base = sagemaker_tree(tmp_path, {"random_flip": "False", "max_steps": "4", "model_type": '"resnet-18"',
                                     "sagemaker_program": '"x.py"', "_tuning_objective_metric": "loss",
                                     "stepwise_learning_rate_steps": [10, 20], "eval_each_category": True})
    job = sagemaker.training_job(str(base), environ={})
    assert job.flags == ("--random_flip=False", "--max_steps=4", "--model_type=resnet-18",
                         "--stepwise_learning_rate_steps=10,20", "--eval_each_category=true",
                         f"--training_data_path={base}/input/data/train",
                         f"--validation_data_path={base}/input/data/validation", f"--job-dir={base}/output/data")
    assert job.environ == {"AIP_MODEL_DIR": f"{base}/model/1", "AIP_CHECKPOINT_DIR": f"{base}/checkpoints"}
    # A hyperparameter that names the data wins over the channel (an image list inside it, say).
    named = sagemaker.training_job(str(sagemaker_tree(tmp_path / "b", {"training_data_path": "/d/list.txt"})), {})
    assert [f for f in named.flags if "training_data_path" in f] == ["--training_data_path=/d/list.txt"]


def test_several_hosts_become_the_trainers_cluster(tmp_path):
    base = sagemaker_tree(tmp_path)
    resources = {"current_host": "algo-3", "hosts": ["algo-1", "algo-2", "algo-3"]}
    (base / "input" / "config" / "resourceconfig.json").write_text(json.dumps(resources))
    job = sagemaker.training_job(str(base), environ={})
    assert cluster.cluster_from_env({"TF_CONFIG": job.environ["TF_CONFIG"]}) == cluster.Cluster(
        ("algo-1:2222", "algo-2:2222", "algo-3:2222"), 2)
    assert "TF_CONFIG" not in sagemaker.training_job(str(base), environ={"TF_CONFIG": "{}"}).environ  # the user's wins
    (base / "input" / "config" / "resourceconfig.json").write_text(json.dumps({**resources, "hosts": ["algo-3"]}))
    assert "TF_CONFIG" not in sagemaker.training_job(str(base), environ={}).environ


def test_a_pipe_mode_channel_or_a_missing_job_folder_is_refused(tmp_path):
    base = sagemaker_tree(tmp_path / "a")
    (base / "input" / "config" / "inputdataconfig.json").write_text(json.dumps({"train": {"TrainingInputMode": "Pipe"}}))
    with pytest.raises(UserError, match="channel train uses Pipe input mode"):
        sagemaker.training_job(str(base), {})
    with pytest.raises(UserError, match="SAGEMAKER_BASE_DIR"):
        sagemaker.training_job(str(tmp_path / "nothing"), {})


def test_a_folder_of_tfrecord_shards_is_a_tfrecord_source_for_any_path(tmp_path):
    base = sagemaker_tree(tmp_path)
    source = sources.open_source(str(base / "input" / "data" / "train"), "training_data_path")
    assert source.kind == "tfrecord"
    assert [os.path.basename(f) for f in source.files] == ["train-00000-of-00002", "train-00001-of-00002"]
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.png").write_bytes(encode(tiny_image(0, np.random.default_rng(0)), "PNG"))
    with pytest.raises(UserError, match="has no class subfolders .* and no TFRecord files"):
        sources.open_source(str(flat), "training_data_path")


# ---- serve: SageMaker hosting and Vertex AI prediction, over HTTP --------------------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_container_server(env):
    process = subprocess.Popen([sys.executable, "-m", "trainer.container", "serve", "--batch_timeout_ms=1"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                               env=dict(os.environ, PYTHONPATH=ROOT, **env))
    banner = process.stdout.readline()  # printed once the socket is listening
    if not banner.startswith("serving "):
        process.kill()
        pytest.fail(f"server did not start: {banner}{process.stderr.read()}")
    return process, banner


def stop(process):
    """The server's stdout lines after SIGTERM, as docker stop sends it; fails with all it wrote if it does not exit."""
    process.send_signal(signal.SIGTERM)
    try:
        out, err = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"the server did not exit within 30 s of SIGTERM\nstdout:\n{out}\nstderr:\n{err}")
    assert process.returncode == 0, err
    return out.splitlines()


def call(port, method, path, body=None, content_type="application/json"):
    """(status, parsed JSON answer) of one request, over urllib as a client library would send it."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method,
                                     headers={"Content-Type": content_type} if data is not None else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def sagemaker_hosting(model_dir, tmp_path_factory):
    """`serve` as SageMaker hosting starts it: the model extracted into /opt/ml/model, in numbered versions."""
    base = tmp_path_factory.mktemp("hosting")
    (base / "model").mkdir()
    for version in ("1", "2"):
        os.symlink(model_dir, base / "model" / version)
    (base / "model" / "code").mkdir()  # not a version
    port = free_port()
    process, banner = start_container_server({"SAGEMAKER_BASE_DIR": str(base), "SAGEMAKER_BIND_TO_PORT": str(port)})
    yield process, banner, port
    if process.poll() is None:
        process.kill()


def test_sagemaker_hosting_answers_ping_and_invocations_and_logs_each_request(sagemaker_hosting, model_dir):
    import tensorflow as tf

    process, banner, port = sagemaker_hosting
    assert "version 2" in banner and f"http://0.0.0.0:{port}/" in banner  # every interface: a container
    reference = tf.saved_model.load(model_dir).signatures["serving_default"]
    rng = np.random.default_rng(3)
    jpeg, png = encode(tiny_image(0, rng), "JPEG"), encode(tiny_image(2, rng), "PNG")

    assert call(port, "GET", "/ping")[0] == 200
    for picture, content_type in ((jpeg, "application/x-image"), (png, "image/png"), (jpeg, "image/jpeg")):
        status, body = call(port, "POST", "/invocations", picture, content_type)
        assert status == 200, body
        want = reference(image_bytes=tf.constant([picture]))
        np.testing.assert_allclose(body["predictions"][0]["probabilities"], want["probabilities"].numpy()[0], atol=1e-5)
        assert body["predictions"][0]["class_names"][0] in EXPORTED_CLASS_NAMES
    as_json = {"instances": [{"b64": base64.b64encode(png).decode()}]}
    assert call(port, "POST", "/invocations", as_json) == call(port, "POST", "/v1/models/model:predict", as_json)
    status, body = call(port, "POST", "/invocations", b"not an image", "application/x-image")
    assert status == 400 and "instance 0 is not a JPEG, PNG, GIF or BMP image" in body["error"]
    assert call(port, "GET", "/invocations")[0] == 405
    status, body = call(port, "GET", "/v1/models/model/versions/2")
    assert status == 200 and body["model_version_status"][0]["version"] == "2"

    lines = stop(process)  # after the banner
    assert [line.split()[:4] for line in lines[:3]] == [
        ["GET", "/ping", "200", "0"], ["POST", "/invocations", "200", "1"], ["POST", "/invocations", "200", "1"]]
    assert lines[0].endswith(" ms") and " 1 image " in lines[1]
    assert any(line.startswith("POST /invocations 400 1 image ") for line in lines)
    assert lines[-1] == "stopped after 9 requests (6 images)"


def test_vertex_ai_prediction_serves_aip_storage_uri_on_its_port_and_routes(model_dir, tmp_path):
    port = free_port()
    process, banner = start_container_server({
        "SAGEMAKER_BASE_DIR": str(tmp_path), "AIP_STORAGE_URI": model_dir, "AIP_HTTP_PORT": str(port),
        "AIP_HEALTH_ROUTE": "/v1/endpoints/e/deployedModels/d", "AIP_PREDICT_ROUTE": "/v1/endpoints/e/deployedModels/d:predict"})
    try:
        assert f"http://0.0.0.0:{port}/" in banner
        assert call(port, "GET", "/v1/endpoints/e/deployedModels/d")[0] == 200
        picture = {"instances": [{"b64": base64.b64encode(encode(tiny_image(1, np.random.default_rng(1)), "JPEG")).decode()}]}
        status, body = call(port, "POST", "/v1/endpoints/e/deployedModels/d:predict", picture)
        assert status == 200 and len(body["predictions"]) == 1 and len(body["predictions"][0]["probabilities"]) == 3
    finally:
        stop(process)


@pytest.mark.parametrize("flags, environ, want", [
    ([], {}, ("/opt/ml/model", "0.0.0.0", 8080)),  # SageMaker hosting
    ([], {"SAGEMAKER_BIND_TO_PORT": "9000"}, ("/opt/ml/model", "0.0.0.0", 9000)),  # an inference pipeline's port
    ([], {"AIP_STORAGE_URI": "gs://b/m", "AIP_HTTP_PORT": "7080"}, ("gs://b/m", "0.0.0.0", 7080)),  # Vertex AI
    (["--model_dir=m", "--port=1", "--host=::1"], {"AIP_STORAGE_URI": "gs://b/m", "AIP_HTTP_PORT": "7080"},
     ("m", "::1", 1)),  # flags win
])
def test_where_the_container_serves_from(flags, environ, want):
    from trainer.serving import serve

    serve.FLAGS.unparse_flags()
    serve.FLAGS(["serve", *flags])
    defaults = {"host": container.CONTAINER_HOST, **sagemaker.serving_defaults(environ)}
    assert serve.settings(serve.FLAGS, environ, defaults) == want


def test_a_local_server_listens_on_loopback_only(model_dir):
    from trainer.serving import serve

    serve.FLAGS.unparse_flags()
    serve.FLAGS(["serve", f"--model_dir={model_dir}", "--port=0"])
    _, server = serve._start(serve.FLAGS, {})
    try:
        assert server.server_address[0] == "127.0.0.1"
    finally:
        server.server_close()
