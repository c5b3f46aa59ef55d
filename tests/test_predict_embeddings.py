"""trainer.predict on a metric-learning export: embedding lines, .npy shards that resume, nearest gallery
images, and the flags refused for other models. The serving side of the same export: REST returns the
embeddings."""

import functools
import json
import os

import numpy as np
import pytest

from tests.conftest import assert_user_error, encode, run_main, tiny_image
from trainer.serving import predict

EMBEDDING = 8


@pytest.fixture(scope="module")
def embedding_model(tmp_path_factory):
    """An untrained metric-learning ResNet-18 at 16x16 with 8-wide embeddings, exported."""
    from trainer import export, models
    from trainer.tasks import METRIC_LEARNING

    root = tmp_path_factory.mktemp("embedding_model")
    options = {"embedding_size": EMBEDDING, "plain_classifier": False}
    weights = str(root / "w.weights.h5")
    models.build_model("resnet-18", 3, 16, seed=1, head=functools.partial(METRIC_LEARNING.head, **options)).save_weights(weights)
    export.export_saved_model(weights, "resnet-18", "metric_learning", 3, 16, ["a", "b", "c"], str(root / "model"),
                              head_options=options, metadata={"embedding_size": EMBEDDING, "metric_loss": "arcface"})
    return str(root / "model")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Seven images and one that is not an image, listed."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(5)
    names = []
    for i in range(7):
        (root / f"{i}.png").write_bytes(encode(tiny_image(i % 4, rng, size=16), "PNG"))
        names.append(f"{i}.png")
    (root / "broken.png").write_bytes(b"not an image")
    names.insert(3, "broken.png")
    (root / "list.txt").write_text("".join(f"{n}\n" for n in names))
    return root


def _predict(capsys, model_dir, images, out, *args):
    result = run_main(predict.main, [f"--model_dir={model_dir}", f"--input_path={images / 'list.txt'}",
                                     f"--output_path={out}", *args], capsys)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in open(out)]


def test_lines_hold_normalised_embeddings(capsys, embedding_model, images, tmp_path):
    lines = _predict(capsys, embedding_model, images, tmp_path / "e.jsonl", "--output_format=jsonl")
    assert [line["location"] for line in lines] == (images / "list.txt").read_text().split()
    assert "error" in lines[3]
    vectors = np.array([line["embedding"] for line in lines if "embedding" in line])
    assert vectors.shape == (7, EMBEDDING)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_npy_shards_hold_the_same_embeddings_and_a_cut_job_resumes(capsys, embedding_model, images, tmp_path):
    reference = _predict(capsys, embedding_model, images, tmp_path / "e.jsonl", "--output_format=jsonl",
                         "--float_precision=9")
    out = tmp_path / "big.jsonl"
    lines = _predict(capsys, embedding_model, images, out, "--output_format=npy", "--shard_size=3")
    assert sorted(p for p in os.listdir(tmp_path) if p.endswith(".npy")) == [
        f"big.jsonl.embeddings-0000{i}.npy" for i in range(3)]  # 8 lines in shards of 3

    def vectors(lines):
        return [np.load(tmp_path / line["embeddings"])[line["row"]] for line in lines if "row" in line]

    expected = [line["embedding"] for line in reference if "embedding" in line]
    np.testing.assert_allclose(vectors(lines), expected, atol=1e-7)
    assert "error" in lines[3]

    # Killed after the first shard: its lines stayed, the next shards' lines and files did not.
    with open(out) as f:
        first = f.readlines()[:3]
    out.write_text("".join(first))
    for i in (1, 2):
        os.remove(tmp_path / f"big.jsonl.embeddings-0000{i}.npy")
    resumed = _predict(capsys, embedding_model, images, out, "--output_format=npy", "--shard_size=3")
    assert resumed == lines
    np.testing.assert_allclose(vectors(resumed), expected, atol=1e-7)


def test_a_gallery_answers_each_query_with_its_nearest_images(capsys, embedding_model, images, tmp_path):
    gallery = tmp_path / "gallery.jsonl"
    _predict(capsys, embedding_model, images, gallery, "--output_format=npy", "--shard_size=4")
    answers = _predict(capsys, embedding_model, images, tmp_path / "answers.jsonl", "--output_format=jsonl",
                       f"--gallery={gallery}", "--top_k=3")
    for line in answers:
        if "error" in line:
            continue
        nearest = line["neighbours"]
        assert len(nearest) == 3 and "embedding" not in line
        assert nearest[0]["location"] == line["location"]  # each image is in the gallery: itself first
        assert nearest[0]["similarity"] == pytest.approx(1.0, abs=1e-5)
        similarities = [n["similarity"] for n in nearest]
        assert similarities == sorted(similarities, reverse=True)


def test_embedding_options_are_refused_for_a_classifier(capsys, model_dir, images, tmp_path):
    for args, flag in ((["--output_format=npy"], "--output_format=npy"), ([f"--gallery={tmp_path}"], "--gallery")):
        result = run_main(predict.main, [f"--model_dir={model_dir}", f"--input_path={images / 'list.txt'}",
                                         f"--output_path={tmp_path / 'o.jsonl'}", *args], capsys)
        assert_user_error(result, flag, "needs an embedding model (--task=metric_learning)", "classification model")


def test_a_gallery_of_another_models_embeddings_is_refused(capsys, embedding_model, images, tmp_path):
    gallery = tmp_path / "other.jsonl"
    gallery.write_text(json.dumps({"location": "x.png", "embedding": [1.0, 0.0, 0.0]}) + "\n")
    result = run_main(predict.main, [f"--model_dir={embedding_model}", f"--input_path={images / 'list.txt'}",
                                     f"--output_path={tmp_path / 'o.jsonl'}", f"--gallery={gallery}"], capsys)
    assert_user_error(result, "--gallery holds embeddings of size 3 but the model gives 8")


def test_the_server_returns_embeddings_over_http(embedding_model, images):
    """trainer.serve on the embedding export: TF Serving's predict API answers each instance's embedding,
    the same as the SavedModel's."""
    import base64
    import http.client
    import subprocess
    import sys

    import tensorflow as tf

    from tests.conftest import ROOT

    args = [sys.executable, "-m", "trainer.serve", f"--model_dir={embedding_model}", "--host=127.0.0.1", "--port=0",
            "--model_name=faces"]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                               env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        banner = process.stdout.readline()
        assert "serving faces (metric_learning" in banner, banner + process.stderr.read()
        port = int(banner.rsplit(":", 1)[1].split("/")[0])
        encoded = [(images / f"{i}.png").read_bytes() for i in range(3)]
        body = json.dumps({"instances": [{"image_bytes": {"b64": base64.b64encode(e).decode()}} for e in encoded]})
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        connection.request("POST", "/v1/models/faces:predict", body=body)
        response = connection.getresponse()
        assert response.status == 200
        rows = json.loads(response.read())["predictions"]
        connection.close()
    finally:
        process.terminate()
        process.wait(timeout=30)
    expected = tf.saved_model.load(embedding_model).signatures["serving_default"](image_bytes=tf.constant(encoded))
    np.testing.assert_allclose([row["embeddings"] for row in rows], expected["embeddings"].numpy(), atol=1e-6)
