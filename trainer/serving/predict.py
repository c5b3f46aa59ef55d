"""Offline batch prediction: `python -m trainer.predict --model_dir=... --input_path=... --output_path=...`.

Owns the prediction job: its flags, the input list (one image location a
line: local path, gs:// or http(s):// URL; blank lines ignored; relative paths
are relative to the list file), the tf.data pipeline that reads the encoded
images in parallel, and batched calls of the SavedModel's serving_default
signature (which decodes, crops and resizes as evaluation did). The output
file, its resume and its part files are output_file.py's.

A location that cannot be read or decoded gets {"error": ...}; the job goes on.
So does an image whose header says more than --max_image_pixels, which is
never decoded (image_limit.py).
Lines are written whole and flushed after every batch, so a killed job leaves
a valid prefix and the same command resumes after it. Progress shows from the
first batch on stdout: a bar redrawn in place on a terminal, else a line
every LOG_EVERY_S seconds (a log keeps every line). Sharding: worker i of N
(flags, else TF_CONFIG or Vertex AI's CLUSTER_SPEC) predicts a contiguous
block of the list; the same command with --merge concatenates the parts.
An embedding model's lines hold embeddings, in .npy shards for large sets, or
with --gallery the nearest gallery images (embeddings.py).
"""

import os
import sys
import time
import urllib.request

from absl import flags

from trainer import cli, files
from trainer.cli import Flag, UserError
from trainer.cluster import cluster_from_env
from trainer.serving import embeddings, image_limit, inference, output_file

FLAGS_TABLE = (
    Flag("model_dir", "string", None, "Exported SavedModel (the model/ folder of a job-dir), local or gs://; "
         "not needed with --merge.", "inputs", required=True),
    Flag("input_path", "string", None, "Text file of image locations, one a line (local, gs:// or http(s)://).",
         "inputs", required=True),
    Flag("batch_size", "integer", 64, "Images per model call.", "inputs"),
    Flag("read_threads", "integer", 16, "Images read at once (http(s) fetches and file reads).", "inputs"),
    Flag("url_timeout_s", "float", 30.0, "Seconds to wait for an http(s) image.", "inputs"),
    Flag("max_image_pixels", "integer", image_limit.MAX_IMAGE_PIXELS, "An image whose header says more pixels "
         "(width x height, x frames for a GIF) gets an error line and is never decoded.", "inputs"),
    Flag("output_path", "string", None, "Output file (local or gs://); with several workers, the merged file.",
         "outputs", required=True),
    Flag("output_format", "string", "text", "text: `location, {json}` lines (PAI style); jsonl: one JSON object "
         "a line; npy (embedding models): the embeddings in .npy files of --shard_size rows beside the output, "
         "each jsonl line naming its file and row.", "outputs", choices=("text", "jsonl", "npy")),
    Flag("shard_size", "integer", 65536, "--output_format=npy: lines per .npy file.", "outputs"),
    Flag("gallery", "string", "", "Embedding models: an earlier output of this command on the gallery images; "
         "each image then gets its --top_k nearest gallery images (cosine similarity, exact) instead of its "
         "embedding.", "inputs"),
    Flag("top_k", "integer", 5, "--gallery: nearest gallery images per image.", "inputs"),
    Flag("float_precision", "integer", 6, "Significant digits of each probability written (1 to 17; 9 keeps "
         "the model's float32 values exactly).", "outputs"),
    Flag("overwrite", "boolean", False, "Replace an existing output instead of resuming it.", "outputs"),
    Flag("num_workers", "integer", None, "Processes sharing the list (default: from TF_CONFIG / CLUSTER_SPEC, "
         "else 1).", "workers"),
    Flag("worker_index", "integer", None, "This process's share, in [0, num_workers).", "workers"),
    Flag("merge", "boolean", False, "Concatenate the finished part files of all workers into --output_path.",
         "workers"),
)
PROGRAM = cli.Program(
    usage="python -m trainer.predict --model_dir=DIR --input_path=LIST --output_path=FILE [--flag=value ...]",
    summary="Predicts every image of a list with an exported model and writes one line per image, in list order.",
    example="python -m trainer.predict --model_dir=runs/digits/model --input_path=images.txt "
            "--output_path=predictions.txt",
    groups=("inputs", "outputs", "workers"),
    notes="A killed job resumes when the same command runs again. Without --num_workers, TF_CONFIG or Vertex "
          "AI's CLUSTER_SPEC says which share of the list this process predicts.",
)
FLAGS = flags.FlagValues()
cli.define(FLAGS_TABLE, FLAGS)


def read_locations(input_path):
    if not files.exists(input_path):
        raise UserError(f"--input_path={input_path} does not exist")
    with files.open_file(input_path) as f:
        return [line.strip() for line in f if line.strip()]


def resolve(location, list_dir):
    if "://" in location or os.path.isabs(location):
        return location
    return os.path.join(list_dir, location)


def _fetcher(timeout_s, errors):
    def fetch(url):
        url = url.numpy().decode("utf-8")
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                return response.read()
        except Exception as e:  # any failure becomes this image's error line
            errors[url] = f"cannot fetch {url}: {e}"
            raise
    return fetch


def _pixel_check(max_pixels, errors):
    """A tf.py_function body: whether an image's header allows decoding it; records why not in errors."""
    def allowed(path, data):
        reason = image_limit.refusal(data.numpy(), max_pixels)
        if reason:
            errors[path.numpy().decode("utf-8")] = f"too large to decode: {reason} (--max_image_pixels)"
        return reason is None
    return allowed


def encoded_batches(paths, batch_size, read_threads, fetch, allowed=None):
    """(indices, encoded images) batches in input order; unreadable or undecodable images are left out, and
    those for which allowed(path, data) (a tf.py_function body) says False, before anything decodes them."""
    import tensorflow as tf

    is_url = [p.startswith(("http://", "https://")) for p in paths]
    ds = tf.data.Dataset.from_tensor_slices(
        (tf.range(len(paths), dtype=tf.int64), tf.constant(paths, tf.string), tf.constant(is_url, tf.bool)))

    def read(index, path, url):
        data = tf.cond(url, lambda: tf.py_function(fetch, [path], tf.string), lambda: tf.io.read_file(path))
        data = tf.ensure_shape(data, [])
        if allowed is not None:  # a failed assertion drops the image in ignore_errors() below
            check = tf.debugging.Assert(tf.py_function(allowed, [path, data], tf.bool), ["image above the pixel limit"])
            with tf.control_dependencies([check]):
                data = tf.identity(data)
        return index, data

    def probe(index, data):
        # The model decodes its whole batch in one call, so one bad image would fail the batch: drop it here,
        # decoding each image once, cheaply (a JPEG at 1/8 scale), in parallel with the model. The shape goes
        # through ignore_errors() and is dropped only after it: tf.data's graph rewrites prune an unused decode.
        is_jpeg = tf.equal(tf.strings.substr(data, 0, 3), b"\xff\xd8\xff")
        shape = tf.cond(is_jpeg, lambda: tf.shape(tf.io.decode_jpeg(data, channels=3, ratio=8)),
                        lambda: tf.shape(tf.io.decode_image(data, channels=3, expand_animations=False)))
        return index, data, shape

    ds = ds.map(read, num_parallel_calls=read_threads)
    ds = ds.map(probe, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors()
    return ds.map(lambda index, data, shape: (index, data)).batch(batch_size).prefetch(2)


def _error(path, errors):
    import tensorflow as tf

    if path in errors:
        return errors[path]
    if not path.startswith(("http://", "https://")):
        try:
            if not files.exists(path):
                return f"not found: {path}"
        except tf.errors.OpError as e:
            return f"cannot read {path}: {e.message}"
    return f"cannot decode {path} as an image (JPEG, PNG, GIF or BMP)"


def predict_batch(model, encoded):
    """One record per image of the batch; None for an image the model cannot decode (the others still get theirs).

    PAI's `probs` list is left out: it repeats class_probs' values, in the same (class id) order.
    """
    import tensorflow as tf

    try:
        records = inference.pai_records(model.serve_bytes(image_bytes=encoded), model.class_names)
        return [{key: value for key, value in record.items() if key != "probs"} for record in records]
    except tf.errors.InvalidArgumentError:  # an image the probe let through: find it, image by image
        if len(encoded) == 1:
            return [None]
        return [record for i in range(len(encoded)) for record in predict_batch(model, encoded[i:i + 1])]


def predict_into(out, model, locations, paths, output_format, batch_size, read_threads, url_timeout_s,
                 float_precision=None, progress=None, max_image_pixels=image_limit.MAX_IMAGE_PIXELS, sink=None,
                 gallery=None, top_k=5):
    """Appends one line per location to the open file `out`, flushing per batch; returns the failures.

    progress: a Progress told the lines written after each batch. sink: what writes the lines
    (output_file.Lines by default; embeddings.Shards for --output_format=npy). gallery: (locations,
    embeddings) of an embedding model's gallery: each record becomes the top_k nearest gallery images.
    """
    sink = sink or output_file.Lines(out, output_format, float_precision)
    errors = {}  # path -> why it has no prediction, where the reading steps know better than "cannot decode"
    batches = encoded_batches(paths, batch_size, read_threads, _fetcher(url_timeout_s, errors),
                              _pixel_check(max_image_pixels, errors))
    done, failures = 0, 0

    def add_error(i):
        nonlocal failures
        failures += 1
        sink.add(locations[i], {"error": _error(paths[i], errors)})

    for indices, encoded in batches:
        records = predict_batch(model, encoded)
        if gallery is not None:
            records = _with_neighbours(records, gallery, top_k)
        for index, record in zip(indices.numpy().tolist(), records):
            for i in range(done, index):
                add_error(i)
            if record is None:
                add_error(index)
            else:
                sink.add(locations[index], record)
            done = index + 1
        sink.end_batch()
        if progress:
            progress.update(done, failures)
    for i in range(done, len(locations)):
        add_error(i)
    sink.close()
    if progress:
        progress.update(len(locations), failures)
    return failures


def _with_neighbours(records, gallery, top_k):
    """Each embedding record replaced by its top_k nearest gallery images (None records stay None)."""
    import numpy as np

    found = [i for i, record in enumerate(records) if record is not None]
    if not found:
        return records
    queries = np.asarray([records[i]["embedding"] for i in found], np.float32)
    answers = dict(zip(found, embeddings.neighbours(queries, gallery, top_k)))
    return [None if record is None else {"neighbours": answers[i]} for i, record in enumerate(records)]


LOG_EVERY_S = 30.0  # seconds between progress lines in a log (a terminal's bar redraws up to 5 times a second)


class Progress:
    """How far a job is, shown on stdout from its first batch.

    On a terminal, one bar redrawn in place; otherwise (a log file, a pipe) a
    line after the first batch and then every LOG_EVERY_S seconds. Images per
    second count this process's images only, so a resumed job's ETA is fair.
    """

    def __init__(self, total, already_done=0):
        self.total, self.already_done = total, already_done
        self.bar = sys.stdout.isatty()
        self.started, self.shown, self.closed = time.monotonic(), None, False

    def update(self, done, failures):
        """done: lines this process has written; failures: error lines among them."""
        if self.closed:
            return
        now = time.monotonic()
        position = self.already_done + done
        finished = position >= self.total
        due = self.shown is None or now - self.shown >= (0.2 if self.bar else LOG_EVERY_S)
        if not (due or (self.bar and finished)):  # a bar ends at 100%; a log ends with the job's summary line
            return
        self.shown = now
        rate = done / max(now - self.started, 1e-9)
        eta = _duration((self.total - position) / rate) if rate else "?"
        text = f"{position}/{self.total} images, {failures} failed, {rate:,.1f} img/s, eta {eta}"
        if not self.bar:
            cli.say(f"predicted {text}")
            return
        filled = 30 * position // max(self.total, 1)
        self.closed = finished
        sys.stdout.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {text}\x1b[K" + ("\n" if finished else ""))
        sys.stdout.flush()


def _duration(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def merge(input_path, output_path, output_format, num_workers, overwrite):
    """Concatenates the finished parts of all workers into output_path, in input order."""
    if files.exists(output_path) and not overwrite:
        raise UserError(f"{output_path} exists; pass --overwrite to replace it")
    all_locations = read_locations(input_path)
    line_format = "jsonl" if output_format == "npy" else output_format  # npy's lines (the .npy files stay apart)
    failures = output_file.merge_parts(all_locations, output_path, line_format, num_workers)
    cli.say(f"{len(all_locations)} images, {failures} failed: merged {num_workers} parts into {output_path}")


def run_worker(model_dir, input_path, output_path, *, output_format="text", num_workers=1, index=0, overwrite=False,
               batch_size=64, read_threads=16, url_timeout_s=30.0, float_precision=6,
               max_image_pixels=image_limit.MAX_IMAGE_PIXELS, gallery="", top_k=5, shard_size=65536):
    """Predicts worker `index`'s share of the list into its part file (the whole output for one worker)."""
    all_locations = read_locations(input_path)
    start, stop = output_file.shard_bounds(len(all_locations), num_workers, index)
    locations = all_locations[start:stop]
    path = output_file.part_path(output_path, index, num_workers)
    if overwrite:
        files.remove(path)
    line_format = "jsonl" if output_format == "npy" else output_format  # npy's lines are jsonl
    done, failures = output_file.scan_output(path, locations, line_format)
    if done == len(locations) and files.exists(path):
        raise UserError(f"{path} is already complete ({done} lines); pass --overwrite to predict again")
    resumed = f" (resumed after {done})" if done else ""
    cli.say(f"predicting {len(locations) - done} images into {path}{resumed}")
    model = inference.load(model_dir)
    if (output_format == "npy" or gallery) and not embeddings.is_embedding_model(model):
        flag = "--output_format=npy" if output_format == "npy" else "--gallery"
        raise UserError(f"{flag} needs an embedding model (--task=metric_learning); {model_dir} is a {model.task} model")
    neighbours_of = embeddings.read_gallery(gallery) if gallery else None
    if os.path.dirname(path):
        files.makedirs(os.path.dirname(path))
    list_dir = os.path.dirname(input_path)
    todo = locations[done:]
    with files.open_file(path, "a") as out:
        sink = embeddings.Shards(out, path, shard_size, done) if output_format == "npy" else None
        failures += predict_into(out, model, todo, [resolve(loc, list_dir) for loc in todo], output_format,
                                 batch_size, read_threads, url_timeout_s, float_precision,
                                 Progress(len(locations), already_done=done), max_image_pixels, sink=sink,
                                 gallery=neighbours_of, top_k=top_k)
    cli.say(f"{len(locations)} images{resumed}, {failures} failed: {path}")
    if num_workers > 1:
        cli.say(f"once all {num_workers} workers are done, run the same command with --merge")


def workers(num_workers, worker_index, merging, environ):
    """(number of workers, this one's index): from the flags, else from the cluster the environment names."""
    if num_workers is None:
        if worker_index is not None:
            raise UserError("--worker_index needs --num_workers")
        try:
            cluster = cluster_from_env(environ)
        except UserError as e:
            raise UserError(f"{e}; or give --num_workers and --worker_index") from None
        num_workers, worker_index = cluster.size, cluster.index
    elif num_workers < 1:
        raise UserError(f"--num_workers={num_workers} must be at least 1")
    elif worker_index is None and num_workers > 1 and not merging:
        raise UserError("--num_workers > 1 needs --worker_index (in [0, num_workers))")
    worker_index = worker_index or 0
    if not 0 <= worker_index < num_workers:
        raise UserError(f"--worker_index={worker_index} must lie in [0, {num_workers})")
    if merging and num_workers == 1:
        raise UserError("--merge needs --num_workers > 1 (the number of part files)")
    return num_workers, worker_index


def _check(values):
    """Raises UserError for the first bad value, every missing required flag named together."""
    missing = cli.missing_flags(values, FLAGS_TABLE)
    cli.require([name for name in missing if not (name == "model_dir" and values["merge"].value)])
    cli.check_choices(values, FLAGS_TABLE)
    for name in ("batch_size", "read_threads", "max_image_pixels", "top_k", "shard_size"):
        if values[name].value < 1:
            raise UserError(f"--{name}={values[name].value} must be at least 1")
    if not 1 <= values["float_precision"].value <= 17:
        raise UserError(f"--float_precision={values['float_precision'].value} must lie in [1, 17] (significant digits)")
    if values["url_timeout_s"].value <= 0:
        raise UserError(f"--url_timeout_s={values['url_timeout_s'].value} must be positive")


def main(argv=None):
    cli.parse_command_line(FLAGS, argv, help_of=(PROGRAM, FLAGS_TABLE))
    v = FLAGS
    try:
        _check(v)
        num_workers, index = workers(v.num_workers, v.worker_index, v.merge, os.environ)
        cli.import_tensorflow_quietly()
        if v.merge:
            merge(v.input_path, v.output_path, v.output_format, num_workers, v.overwrite)
        else:
            run_worker(v.model_dir, v.input_path, v.output_path, output_format=v.output_format, num_workers=num_workers,
                       index=index, overwrite=v.overwrite, batch_size=v.batch_size, read_threads=v.read_threads,
                       url_timeout_s=v.url_timeout_s, float_precision=v.float_precision,
                       max_image_pixels=v.max_image_pixels, gallery=v.gallery, top_k=v.top_k, shard_size=v.shard_size)
    except UserError as e:
        cli.fail(str(e))
    except KeyboardInterrupt:
        cli.fail("interrupted; every line written is complete: rerun the same command to resume")
