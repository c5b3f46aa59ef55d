"""Offline batch prediction: `python -m trainer.predict --model_dir=... --input_path=... --output_path=...`.

Owns the prediction job: the input list (one image location a line: local
path, gs:// or http(s):// URL; blank lines ignored; relative paths are relative
to the list file), the tf.data pipeline that reads, decodes and crops in
parallel, batched calls of the SavedModel's serving_images signature, and the
output file: one line per input, in input order, `location, {json}` (PAI
style) or, with --output_format=jsonl, one JSON object with a "location" key.

A location that cannot be read or decoded gets {"error": ...}; the job goes on.
Lines are written whole and flushed after every batch, so a killed job leaves
a valid prefix and the same command resumes after it. Sharding: worker i of N
(flags, else TF_CONFIG or Vertex AI's CLUSTER_SPEC) predicts a contiguous
block of the list into `OUTPUT-0000i-of-0000N`; the same command with
--merge concatenates the finished parts into OUTPUT.
"""

import json
import os
import shutil
import sys
import urllib.request

from absl import flags

from trainer import inference, report
from trainer.config import UserError, fail, parse_command_line

FLAGS = flags.FlagValues()
flags.DEFINE_string("model_dir", None, "Exported SavedModel (the model/ folder of a job-dir), local or gs://.", flag_values=FLAGS)
flags.DEFINE_string("input_path", None, "Text file of image locations, one a line (local, gs:// or http(s)://).", flag_values=FLAGS)
flags.DEFINE_string("output_path", None, "Output file (local or gs://); with several workers, the merged file.", flag_values=FLAGS)
flags.DEFINE_string("output_format", "text", "text: `location, {json}` lines (PAI style) | jsonl: one JSON object a line.", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 64, "Images per model call.", flag_values=FLAGS)
flags.DEFINE_integer("num_workers", None, "Processes sharing the list (default: from TF_CONFIG / CLUSTER_SPEC, else 1).", flag_values=FLAGS)
flags.DEFINE_integer("worker_index", None, "This process's share, in [0, num_workers).", flag_values=FLAGS)
flags.DEFINE_boolean("merge", False, "Concatenate the finished part files of all workers into --output_path.", flag_values=FLAGS)
flags.DEFINE_boolean("overwrite", False, "Replace an existing output instead of resuming it.", flag_values=FLAGS)
flags.DEFINE_float("url_timeout_s", 30.0, "Seconds to wait for an http(s) image.", flag_values=FLAGS)
flags.DEFINE_integer("read_threads", 16, "Images read at once (http(s) fetches and file reads).", flag_values=FLAGS)


def read_locations(input_path):
    import tensorflow as tf

    if not tf.io.gfile.exists(input_path):
        raise UserError(f"--input_path={input_path} does not exist")
    with tf.io.gfile.GFile(input_path) as f:
        return [line.strip() for line in f if line.strip()]


def resolve(location, list_dir):
    if "://" in location or os.path.isabs(location):
        return location
    return os.path.join(list_dir, location)


def cluster_from_env(environ):
    """(num_workers, worker_index) from Vertex AI's CLUSTER_SPEC or TF_CONFIG; (1, 0) without either."""
    for var, roles in (("CLUSTER_SPEC", ("workerpool0", "workerpool1")), ("TF_CONFIG", ("chief", "master", "worker"))):
        if not environ.get(var):
            continue
        try:
            spec = json.loads(environ[var])
            cluster, task = spec.get("cluster", {}), spec.get("task", {})
            role = task.get("type")
            if role not in roles:
                raise UserError(f"${var} makes this process a {role!r}; trainer.predict runs on {' and '.join(roles)}"
                                " replicas, or give --num_workers and --worker_index")
            before = sum(len(cluster.get(r, [])) for r in roles[: roles.index(role)])
            return sum(len(cluster.get(r, [])) for r in roles), before + int(task.get("index", 0))
        except (ValueError, AttributeError, TypeError) as e:
            raise UserError(f"${var} is not a cluster spec ({e}); unset it or give --num_workers and --worker_index")
    return 1, 0


def shard_bounds(num_locations, num_workers, index):
    """Worker `index` predicts locations[start:stop]; blocks are contiguous so parts concatenate in order."""
    return num_locations * index // num_workers, num_locations * (index + 1) // num_workers


def part_path(output_path, index, num_workers):
    return output_path if num_workers == 1 else f"{output_path}-{index:05d}-of-{num_workers:05d}"


def format_line(location, record, output_format):
    if output_format == "jsonl":
        return json.dumps({"location": location, **record}) + "\n"
    return f"{location}, {json.dumps(record)}\n"


def _line_prefix(location, output_format):
    """How format_line begins a line for `location` (a resumed output is checked against it)."""
    if output_format == "jsonl":
        return '{"location": ' + json.dumps(location) + ", "
    return f"{location}, {{"


def scan_output(path, locations, output_format):
    """(lines done, failures among them) of an earlier run's output; cuts off a torn last line.

    Streams the file: outputs of large models run to tens of KB a line. Raises
    UserError for an output this job would not have written.
    """
    import tensorflow as tf

    if not tf.io.gfile.exists(path):
        return 0, 0
    done, failures, good_bytes = 0, 0, 0
    with tf.io.gfile.GFile(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):  # killed mid-write: that image is predicted again
                _truncate(path, good_bytes)
                break
            line = raw.decode("utf-8", "replace")
            prefix = _line_prefix(locations[done], output_format) if done < len(locations) else None
            if prefix is None or not line.startswith(prefix):
                raise UserError(f"{path} line {done + 1} is not this job's output (another list or --output_format?);"
                                " pass --overwrite to replace it")
            failures += line[len(prefix):].startswith('"error"')
            done, good_bytes = done + 1, good_bytes + len(raw)
    return done, failures


def _truncate(path, size):
    import tensorflow as tf

    if "://" not in path:
        os.truncate(path, size)
        return
    tmp = f"{path}.resume-{os.getpid()}"  # object stores cannot truncate: copy the good prefix
    with tf.io.gfile.GFile(path, "rb") as f, tf.io.gfile.GFile(tmp, "wb") as out:
        while size > 0:
            chunk = f.read(min(size, 1 << 24))
            out.write(chunk)
            size -= len(chunk)
    tf.io.gfile.rename(tmp, path, overwrite=True)


def _fetcher(timeout_s, url_errors):
    def fetch(url):
        url = url.numpy().decode("utf-8")
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                return response.read()
        except Exception as e:  # any failure becomes this image's error line
            url_errors[url] = f"cannot fetch {url}: {e}"
            raise
    return fetch


def image_batches(paths, image_size, batch_size, read_threads, fetch):
    """(indices, uint8 images) batches in input order; unreadable images are left out (their index skipped)."""
    import tensorflow as tf

    from trainer import images

    is_url = [p.startswith(("http://", "https://")) for p in paths]
    ds = tf.data.Dataset.from_tensor_slices(
        (tf.range(len(paths), dtype=tf.int64), tf.constant(paths, tf.string), tf.constant(is_url, tf.bool)))

    def read(index, path, url):
        data = tf.cond(url, lambda: tf.py_function(fetch, [path], tf.string), lambda: tf.io.read_file(path))
        return index, tf.ensure_shape(data, [])

    ds = ds.map(read, num_parallel_calls=read_threads)
    ds = ds.map(lambda i, data: (i, images.eval_image(data, image_size)), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.ignore_errors().batch(batch_size).prefetch(2)


def _error(path, url_errors):
    import tensorflow as tf

    if path in url_errors:
        return url_errors[path]
    if not path.startswith(("http://", "https://")):
        try:
            if not tf.io.gfile.exists(path):
                return f"not found: {path}"
        except tf.errors.OpError as e:
            return f"cannot read {path}: {e.message}"
    return f"cannot decode {path} as an image (JPEG, PNG, GIF or BMP)"


def predict_into(out, model, locations, paths, output_format, batch_size, read_threads, url_timeout_s):
    """Appends one line per location to the open file `out`, flushing per batch; returns the failures."""
    url_errors = {}
    batches = image_batches(paths, model.image_size, batch_size, read_threads, _fetcher(url_timeout_s, url_errors))
    done, failures, batch_count = 0, 0, 0

    def errors_until(stop):
        nonlocal failures
        failures += stop - done
        return [format_line(locations[i], {"error": _error(paths[i], url_errors)}, output_format) for i in range(done, stop)]

    for indices, images in batches:
        records = inference.pai_records(model.serve_images(images=images), model.class_names)
        lines = []
        for index, record in zip(indices.numpy().tolist(), records):
            lines += errors_until(index)
            lines.append(format_line(locations[index], record, output_format))
            done = index + 1
        out.write("".join(lines))
        out.flush()
        batch_count += 1
        if batch_count % 20 == 0:
            print(f"predicted {done}/{len(locations)}", file=sys.stderr, flush=True)
    out.write("".join(errors_until(len(locations))))
    out.flush()
    return failures


def run_worker(model_dir, input_path, output_path, output_format, num_workers, index, overwrite, batch_size,
               read_threads, url_timeout_s):
    import tensorflow as tf

    all_locations = read_locations(input_path)
    start, stop = shard_bounds(len(all_locations), num_workers, index)
    locations = all_locations[start:stop]
    path = part_path(output_path, index, num_workers)
    if overwrite and tf.io.gfile.exists(path):
        tf.io.gfile.remove(path)
    done, failures = scan_output(path, locations, output_format)
    if done == len(locations) and tf.io.gfile.exists(path):
        raise UserError(f"{path} is already complete ({done} lines); pass --overwrite to predict again")
    try:
        model = inference.load(model_dir)
    except inference.ModelError as e:
        raise UserError(str(e))
    if os.path.dirname(path):
        tf.io.gfile.makedirs(os.path.dirname(path))
    list_dir = os.path.dirname(input_path)
    todo = locations[done:]
    with tf.io.gfile.GFile(path, "a") as out:
        failures += predict_into(out, model, todo, [resolve(loc, list_dir) for loc in todo], output_format,
                                 batch_size, read_threads, url_timeout_s)
    resumed = f" (resumed after {done})" if done else ""
    print(f"{len(locations)} images{resumed}, {failures} failed: {path}", flush=True)
    if num_workers > 1:
        print(f"once all {num_workers} workers are done, run the same command with --merge", flush=True)


def merge(input_path, output_path, output_format, num_workers, overwrite):
    """Concatenates the finished parts of all workers into output_path, in input order."""
    import tensorflow as tf

    if tf.io.gfile.exists(output_path) and not overwrite:
        raise UserError(f"{output_path} exists; pass --overwrite to replace it")
    all_locations = read_locations(input_path)
    parts, failures = [], 0
    for i in range(num_workers):
        start, stop = shard_bounds(len(all_locations), num_workers, i)
        path = part_path(output_path, i, num_workers)
        done, failed = scan_output(path, all_locations[start:stop], output_format)
        if done != stop - start:
            raise UserError(f"{path} has {done} of {stop - start} lines; run (or rerun) worker {i} to finish it")
        parts.append(path)
        failures += failed
    tmp = f"{output_path}.merging-{os.getpid()}"
    with tf.io.gfile.GFile(tmp, "wb") as out:
        for path in parts:
            with tf.io.gfile.GFile(path, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 24)
    tf.io.gfile.rename(tmp, output_path, overwrite=True)
    print(f"{len(all_locations)} images, {failures} failed: merged {num_workers} parts into {output_path}", flush=True)


def _workers(values, environ):
    if values["num_workers"].value is None:
        if values["worker_index"].value is not None:
            raise UserError("--worker_index needs --num_workers")
        num, index = cluster_from_env(environ)
    else:
        num, index = _workers_from_flags(values)
    if values["merge"].value and num == 1:
        raise UserError("--merge needs --num_workers > 1 (the number of part files)")
    return num, index


def _workers_from_flags(values):
    num, index = values["num_workers"].value, values["worker_index"].value
    if num < 1:
        raise UserError(f"--num_workers={num} must be at least 1")
    if index is None and num > 1 and not values["merge"].value:
        raise UserError("--num_workers > 1 needs --worker_index (in [0, num_workers))")
    index = index or 0
    if not 0 <= index < num:
        raise UserError(f"--worker_index={index} must lie in [0, {num})")
    return num, index


def _check(values):
    for name in ("input_path", "output_path") + (() if values["merge"].value else ("model_dir",)):
        if not values[name].value:
            raise UserError(f"--{name} is required")
    if values["output_format"].value not in ("text", "jsonl"):
        raise UserError(f"--output_format={values['output_format'].value} is not one of: text, jsonl")
    for name in ("batch_size", "read_threads"):
        if values[name].value < 1:
            raise UserError(f"--{name}={values[name].value} must be at least 1")
    if values["url_timeout_s"].value <= 0:
        raise UserError(f"--url_timeout_s={values['url_timeout_s'].value} must be positive")


def main(argv=None):
    parse_command_line(FLAGS, argv)
    v = FLAGS
    try:
        _check(v)
        num_workers, index = _workers(v, os.environ)
        report.import_tensorflow_quietly()
        if v.merge:
            merge(v.input_path, v.output_path, v.output_format, num_workers, v.overwrite)
        else:
            run_worker(v.model_dir, v.input_path, v.output_path, v.output_format, num_workers, index, v.overwrite,
                       v.batch_size, v.read_threads, v.url_timeout_s)
    except UserError as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted; every line written is complete: rerun the same command to resume")


if __name__ == "__main__":
    main()
