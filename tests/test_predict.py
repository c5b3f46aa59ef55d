"""trainer.predict: output lines match the model, bad locations become error lines, sharding, resume, progress,
float precision, flags."""

import ast
import functools
import http.server
import io
import json
import os
import pathlib
import re
import sys
import threading

import numpy as np
import pytest

from tests.conftest import EXPORTED_CLASS_NAMES as NAMES
from tests.conftest import (
    assert_tool_help,
    ROOT,
    assert_user_error,
    encode,
    run_cli,
    run_main,
    tiny_image,
)
from trainer.cli import UserError
from trainer.serving import inference, output_file, predict


@pytest.fixture(scope="module")
def image_server(tmp_path_factory):
    """A local HTTP server over a folder of images: the http:// locations of the tests."""
    root = tmp_path_factory.mktemp("web")
    rng = np.random.default_rng(7)
    for i in range(2):
        (root / f"web{i}.png").write_bytes(encode(tiny_image(i, rng, size=24), "PNG"))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()


@pytest.fixture(scope="module")
def job(tmp_path_factory, image_server):
    """A list mixing good images (relative, absolute, URL) with a missing file, a corrupt one and a 404 URL."""
    url, web_root = image_server
    root = tmp_path_factory.mktemp("job")
    (root / "img").mkdir()
    rng = np.random.default_rng(3)
    locations, files = [], {}
    for i in range(7):
        fmt = "JPEG" if i % 2 else "PNG"
        path = root / "img" / f"{i}.{fmt.lower()}"
        path.write_bytes(encode(tiny_image(i % 3, rng, size=18 + i), fmt))
        location = f"img/{path.name}" if i % 3 else str(path)  # relative to the list file, or absolute
        locations.append(location)
        files[location] = path
    (root / "img" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    locations[2:2] = ["img/missing.jpg", f"{url}/web0.png"]
    locations[6:6] = ["img/corrupt.jpg", f"{url}/nothere.png", f"{url}/web1.png"]
    files[f"{url}/web0.png"], files[f"{url}/web1.png"] = web_root / "web0.png", web_root / "web1.png"
    (root / "list.txt").write_text("\n".join(locations) + "\n\n")
    return {"root": root, "list": str(root / "list.txt"), "locations": locations, "files": files,
            "failed": ["img/missing.jpg", "img/corrupt.jpg", f"{url}/nothere.png"]}


def read_output(path, output_format="text"):
    """[(location, record)] of an output file."""
    rows = []
    for line in pathlib.Path(path).read_text().splitlines():
        if output_format == "jsonl":
            record = json.loads(line)
            rows.append((record.pop("location"), record))
        else:
            location, _, payload = line.partition(", {")
            rows.append((location, json.loads("{" + payload)))
    return rows


def assert_same_predictions(rows, expected_rows):
    """Same locations in the same order, same errors, probabilities equal up to batching round-off."""
    assert [loc for loc, _ in rows] == [loc for loc, _ in expected_rows]
    for (loc, got), (_, want) in zip(rows, expected_rows):
        assert ("error" in got) == ("error" in want), loc
        if "error" not in got:
            np.testing.assert_allclose(list(got["class_probs"].values()), list(want["class_probs"].values()), atol=1e-5)


@pytest.fixture(scope="module")
def cli_output(job, model_dir):
    out = str(job["root"] / "out" / "predictions.txt")
    result = run_cli("trainer.predict", [f"--model_dir={model_dir}", f"--input_path={job['list']}",
                                         f"--output_path={out}", "--batch_size=4"])
    assert result.returncode == 0, result.stderr
    return out, result


def test_each_location_gets_the_models_prediction_or_an_error_line_in_input_order(job, model_dir, cli_output):
    import tensorflow as tf

    out, result = cli_output
    rows = read_output(out)
    assert [loc for loc, _ in rows] == job["locations"]  # blank lines are not inputs
    reference = tf.saved_model.load(model_dir).signatures["serving_default"]
    for location, record in rows:
        if location in job["failed"]:
            assert set(record) == {"error"} and location.split("/")[-1] in record["error"]
            continue
        want = reference(image_bytes=tf.constant([job["files"][location].read_bytes()]))
        assert list(record) == ["class_probs", "classes", "class_names"]  # each probability once, by name
        assert list(record["class_probs"]) == NAMES
        np.testing.assert_allclose(list(record["class_probs"].values()), want["probabilities"].numpy()[0], atol=1e-5)
        assert record["classes"] == want["classes"].numpy()[0].tolist()
        assert record["class_names"] == [NAMES[c] for c in record["classes"]]
    assert "not found" in dict(rows)["img/missing.jpg"]["error"]
    assert "404" in dict(rows)[job["failed"][2]]["error"]
    assert result.stdout.splitlines()[-1] == f"{len(job['locations'])} images, 3 failed: {out}"


def test_probabilities_are_written_with_the_significant_digits_asked_for(job, model_dir, cli_output, tmp_path):
    def digits(value):
        return len(f"{value:e}".split("e")[0].replace(".", "").replace("-", "").rstrip("0"))

    default = [r for _, r in read_output(cli_output[0]) if "error" not in r]
    assert max(digits(p) for r in default for p in r["class_probs"].values()) <= 6
    out = str(tmp_path / "p3.txt")
    predict.run_worker(model_dir, job["list"], out, batch_size=4, read_threads=4, float_precision=3)
    short = [r for _, r in read_output(out) if "error" not in r]
    assert max(digits(p) for r in short for p in r["class_probs"].values()) <= 3
    for a, b in zip(short, default):
        np.testing.assert_allclose(list(a["class_probs"].values()), list(b["class_probs"].values()), rtol=5e-3)


@pytest.mark.parametrize("precision, line", [
    (6, 'a.jpg, {"class_probs": {"cat": 0.123457, "dog": 4.02885e-10, "bird": 0.5}, "classes": [2]}\n'),
    (2, 'a.jpg, {"class_probs": {"cat": 0.12, "dog": 4e-10, "bird": 0.5}, "classes": [2]}\n'),
    (None, 'a.jpg, {"class_probs": {"cat": 0.123456789, "dog": 4.028851974258174e-10, "bird": 0.5}, "classes": [2]}\n'),
])
def test_a_line_rounds_every_float_to_significant_digits_not_decimals(precision, line):
    record = {"class_probs": {"cat": 0.123456789, "dog": 4.028851974258174e-10, "bird": 0.5}, "classes": [2]}
    assert output_file.format_line("a.jpg", record, "text", precision) == line


def test_a_log_gets_a_progress_line_from_the_first_batch_then_one_per_interval(job, model_dir, tmp_path, capsys,
                                                                             monkeypatch):
    total = len(job["locations"])
    predict.run_worker(model_dir, job["list"], str(tmp_path / "a.txt"), batch_size=4, read_threads=4)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"predicting {total} images into {tmp_path / 'a.txt'}"
    assert re.fullmatch(rf"predicted \d+/{total} images, \d+ failed, [\d.,]+ img/s, eta \d+:\d\d:\d\d", lines[1])
    assert len(lines) == 3  # a fast job: the first batch's line, then the summary
    monkeypatch.setattr(predict, "LOG_EVERY_S", 0.0)
    predict.run_worker(model_dir, job["list"], str(tmp_path / "b.txt"), batch_size=4, read_threads=4)
    done = [int(m) for m in re.findall(rf"^predicted (\d+)/{total} ", capsys.readouterr().out, re.M)]
    assert len(done) >= 3 and done == sorted(done)  # one per batch


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_terminal_gets_one_bar_redrawn_in_place_that_ends_at_the_total(monkeypatch):
    clock = iter([0.0, 1.0, 1.1, 2.0, 2.05])  # start, then one reading per update
    monkeypatch.setattr(predict.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(sys, "stdout", _Terminal())
    progress = predict.Progress(10, already_done=2)
    progress.update(2, 0)  # 4/10 after 1 s
    progress.update(3, 0)  # 0.1 s later: not redrawn
    progress.update(6, 1)  # 8/10 after 2 s
    progress.update(8, 1)  # done: drawn at once, and the line ends
    shown = sys.stdout.getvalue()
    assert shown.split("\r")[1:] == [
        "[############..................] 4/10 images, 0 failed, 2.0 img/s, eta 0:00:03\x1b[K",
        "[########################......] 8/10 images, 1 failed, 3.0 img/s, eta 0:00:00\x1b[K",
        "[##############################] 10/10 images, 1 failed, 3.9 img/s, eta 0:00:00\x1b[K\n",
    ]
    progress.update(8, 1)  # the job's closing update after the last batch draws nothing more
    assert sys.stdout.getvalue() == shown


def test_jsonl_holds_the_same_records_with_their_location(job, model_dir, cli_output, tmp_path):
    out = str(tmp_path / "p.jsonl")
    predict.run_worker(model_dir, job["list"], out, output_format="jsonl", batch_size=5, read_threads=4)
    assert_same_predictions(read_output(out, "jsonl"), read_output(cli_output[0]))


def test_shards_merge_into_the_unsharded_output(job, model_dir, cli_output, tmp_path, capsys):
    out = str(tmp_path / "sharded.txt")
    for index in range(3):
        predict.run_worker(model_dir, job["list"], out, num_workers=3, index=index, batch_size=2, read_threads=4)
    parts = sorted(os.listdir(tmp_path))
    assert parts == [f"sharded.txt-0000{i}-of-00003" for i in range(3)]
    predict.merge(job["list"], out, "text", 3, False)
    assert_same_predictions(read_output(out), read_output(cli_output[0]))
    assert "3 failed: merged 3 parts" in capsys.readouterr().out


def test_merge_refuses_while_a_part_is_unfinished(job, model_dir, tmp_path):
    out = str(tmp_path / "sharded.txt")
    predict.run_worker(model_dir, job["list"], out, num_workers=2, index=0, batch_size=4, read_threads=4)
    with pytest.raises(UserError, match="00001-of-00002 has 0 of 6 lines; run .*worker 1"):
        predict.merge(job["list"], out, "text", 2, False)
    assert not os.path.exists(out)


def test_rerun_after_a_kill_resumes_after_the_complete_lines(job, model_dir, cli_output, tmp_path, capsys):
    full = pathlib.Path(cli_output[0]).read_text().splitlines(keepends=True)
    out = tmp_path / "resumed.txt"
    out.write_text("".join(full[:4]) + full[4][:17])  # killed while writing line 5
    predict.run_worker(model_dir, job["list"], str(out), batch_size=4, read_threads=4)
    assert_same_predictions(read_output(out), read_output(cli_output[0]))
    assert "(resumed after 4), 3 failed" in capsys.readouterr().out


def test_finished_or_foreign_output_is_kept_unless_overwrite(job, model_dir, cli_output, tmp_path):
    finished = pathlib.Path(cli_output[0]).read_text()
    out = tmp_path / "out.txt"
    out.write_text(finished)
    with pytest.raises(UserError, match="already complete.*--overwrite"):
        predict.run_worker(model_dir, job["list"], str(out), batch_size=4, read_threads=4)
    with pytest.raises(UserError, match="line 1 is not this job.*--overwrite"):
        predict.run_worker(model_dir, job["list"], str(out), output_format="jsonl", batch_size=4, read_threads=4)
    out.write_text("someone else's notes\n")
    with pytest.raises(UserError, match="line 1 is not this job"):
        predict.run_worker(model_dir, job["list"], str(out), batch_size=4, read_threads=4)
    assert out.read_text() == "someone else's notes\n"
    predict.run_worker(model_dir, job["list"], str(out), output_format="jsonl", overwrite=True, batch_size=4,
                       read_threads=4)
    assert len(read_output(out, "jsonl")) == len(job["locations"])


@pytest.mark.parametrize("environ, expected", [
    ({}, (1, 0)),
    ({"TF_CONFIG": '{"cluster": {"chief": ["a"], "worker": ["b", "c"]}, "task": {"type": "worker", "index": 1}}'}, (3, 2)),
    ({"TF_CONFIG": '{"cluster": {"chief": ["a"], "worker": ["b"]}, "task": {"type": "chief", "index": 0}}'}, (2, 0)),
    ({"CLUSTER_SPEC": '{"cluster": {"workerpool0": ["a"], "workerpool1": ["b", "c"]}, '
                      '"task": {"type": "workerpool1", "index": 0}}'}, (3, 1)),
])
def test_worker_index_comes_from_the_cluster_environment(environ, expected):
    assert predict.workers(None, None, False, environ) == expected


@pytest.mark.parametrize("environ, fragment", [
    ({"TF_CONFIG": '{"cluster": {"ps": ["p"], "worker": ["b"]}, "task": {"type": "ps", "index": 0}}'}, "task 'ps'"),
    ({"CLUSTER_SPEC": "{not json"}, "$CLUSTER_SPEC is not a valid cluster spec"),
])
def test_a_process_outside_the_workers_is_not_given_the_whole_list(environ, fragment):
    with pytest.raises(UserError, match=re.escape(fragment) + ".*give --num_workers and --worker_index"):
        predict.workers(None, None, False, environ)


def test_contiguous_shards_cover_the_list_once():
    bounds = [output_file.shard_bounds(10, 3, i) for i in range(3)]
    assert bounds == [(0, 3), (3, 6), (6, 10)]
    assert [output_file.shard_bounds(2, 3, i) for i in range(3)] == [(0, 0), (0, 1), (1, 2)]


def test_multi_label_records_list_the_predicted_classes_most_probable_first():
    outputs = {
        "probabilities": np.array([[0.9, 0.2, 0.7], [0.1, 0.3, 0.2]], np.float32),
        "predictions": np.array([[True, False, True], [False, False, False]]),
        "classes": np.array([[0, 2, -1], [-1, -1, -1]]),
        "class_names": np.array([[b"a", b"c", b""], [b"", b"", b""]], object),
        "scores": np.array([[0.9, 0.7, 0.0], [0.0, 0.0, 0.0]], np.float32),
    }
    first, second = inference.pai_records(outputs, ("a", "b", "c"))
    assert list(first) == ["class_probs", "predictions", "classes", "class_names", "probs"]
    assert first["classes"] == [0, 2] and first["class_names"] == ["a", "c"]
    assert first["predictions"] == [True, False, True]
    assert first["class_probs"] == pytest.approx({"a": 0.9, "b": 0.2, "c": 0.7})
    assert second["classes"] == [] and second["class_names"] == [] and second["predictions"] == [False] * 3


@pytest.mark.parametrize("args, fragment", [
    (["--output_format=csv"], "--output_format must be one of text, jsonl, npy (got 'csv')"),
    (["--num_workers=2", "--worker_index=2"], "--worker_index=2 must lie in [0, 2)"),
    (["--num_workers=2"], "--num_workers > 1 needs --worker_index"),
    (["--batch_size=0"], "--batch_size=0 must be at least 1"),
    (["--float_precision=0"], "--float_precision=0 must lie in [1, 17]"),
    (["--model_dir="], "--model_dir is required"),
    (["--bogus=1"], "bogus"),
    (["--merge"], "--merge needs --num_workers > 1"),
    (["--worker_index=1"], "--worker_index needs --num_workers"),
])
def test_bad_flags_exit_with_one_error_line(tmp_path, capsys, args, fragment):
    (tmp_path / "list.txt").write_text("a.jpg\n")
    base = ["--model_dir=m", f"--input_path={tmp_path / 'list.txt'}", f"--output_path={tmp_path / 'o.txt'}"]
    assert_user_error(run_main(predict.main, base + args, capsys), fragment)


def test_missing_required_flags_are_named_together(capsys):
    result = run_main(predict.main, [], capsys)
    assert_user_error(result, "--model_dir, --input_path, --output_path are required")
    merging = run_main(predict.main, ["--merge", "--num_workers=2"], capsys)
    assert_user_error(merging, "--input_path, --output_path are required")  # --merge needs no model


def test_help_shows_usage_an_example_and_the_flags_by_group(capsys):
    result = run_main(predict.main, ["--help"], capsys)
    assert_tool_help(result, "trainer.predict", ("inputs", "outputs", "workers"), "input_path", 64)


def test_a_folder_without_a_saved_model_is_a_user_error(job, tmp_path):
    with pytest.raises(UserError, match=f"--model_dir={tmp_path} holds no saved_model.pb"):
        predict.run_worker(str(tmp_path), job["list"], str(tmp_path / "o.txt"))


def test_more_workers_than_images_leaves_empty_parts_that_merge(job, model_dir, tmp_path):
    (tmp_path / "one.txt").write_text(job["locations"][0] if os.path.isabs(job["locations"][0]) else "x.jpg")
    out = str(tmp_path / "out.txt")
    for index in range(2):
        predict.run_worker(model_dir, str(tmp_path / "one.txt"), out, output_format="jsonl", num_workers=2, index=index,
                           batch_size=4, read_threads=4)
    predict.merge(str(tmp_path / "one.txt"), out, "jsonl", 2, False)
    assert pathlib.Path(f"{out}-00000-of-00002").read_text() == ""
    assert len(read_output(out, "jsonl")) == 1


def test_multi_label_export_gives_boolean_predictions_from_its_thresholds(job, tmp_path, capsys):
    from trainer import export, models

    weights = str(tmp_path / "w.weights.h5")
    models.build_model("resnet-18", 3, 16, seed=4).save_weights(weights)
    thresholds = [0.0, 1.0, 0.5]  # always, never, and by probability
    export.export_saved_model(weights, "resnet-18", "multi_label", 3, 16, NAMES, str(tmp_path / "model"),
                              evaluation={"thresholds": thresholds})
    out = str(tmp_path / "out.jsonl")
    result = run_main(predict.main, [f"--model_dir={tmp_path / 'model'}", f"--input_path={job['list']}",
                                     f"--output_path={out}", "--output_format=jsonl"], capsys)
    assert result.returncode == 0, result.stderr
    records = [r for _, r in read_output(out, "jsonl") if "error" not in r]
    assert records
    for record in records:
        assert list(record) == ["class_probs", "predictions", "classes", "class_names"]
        assert record["predictions"][:2] == [True, False]
        assert record["predictions"][2] == (record["class_probs"][NAMES[2]] >= 0.5)
        assert sorted(record["classes"]) == [i for i, p in enumerate(record["predictions"]) if p]
        assert record["class_names"] == [NAMES[i] for i in record["classes"]]


def test_the_read_pipeline_leaves_out_what_cannot_be_read_or_decoded(job):
    """Bad images drop out before the model call, so the batches around them run whole."""
    paths = [predict.resolve(location, str(job["root"])) for location in job["locations"]]
    batches = predict.encoded_batches(paths, 4, 4, predict._fetcher(10.0, {}))
    kept = [job["locations"][i] for indices, _ in batches for i in indices.numpy().tolist()]
    assert kept == [location for location in job["locations"] if location not in job["failed"]]


def test_an_image_the_model_cannot_decode_fails_alone_in_its_batch():
    """The pipeline's decode probe drops most bad images; one that gets past it still costs only its own line."""
    import tensorflow as tf

    def serve_bytes(image_bytes):
        if b"bad" in image_bytes.numpy().tolist():
            raise tf.errors.InvalidArgumentError(None, None, "undecodable")
        return {"probabilities": tf.fill([len(image_bytes), 3], 1 / 3),
                "classes": tf.zeros([len(image_bytes), 1], tf.int64)}

    model = inference.Model(serve_bytes, None, tuple(NAMES), "classification", 16)
    records = predict.predict_batch(model, tf.constant([b"good", b"bad", b"fine"]))
    assert records[1] is None
    assert [r["class_names"] for r in (records[0], records[2])] == [["cat"], ["cat"]]


def test_serving_reads_only_the_export_never_the_training_code():
    """No import of trainer.images, models, data, tasks, train or config: only the shared plumbing, the
    NumPy-only nearest-neighbour search that evaluation also uses, and itself."""
    allowed = ("trainer.cli.", "trainer.files.", "trainer.cluster.", "trainer.retrieval.", "trainer.serving.")
    for path in pathlib.Path(ROOT, "trainer", "serving").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            for module in modules:
                assert not module.startswith("trainer") or f"{module}.".startswith(allowed), f"{path.name}: {module}"
