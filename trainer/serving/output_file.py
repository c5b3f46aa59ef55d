"""The batch prediction job's output file: its lines, resuming it, and the part files of several workers.

One line per input location, in input order: `location, {json}` (PAI style)
or, for jsonl, one JSON object with a "location" key; floats carry the
significant digits asked for (--float_precision), not float64's 17. A
rerun checks that an existing output is this job's (same locations, same
format) and continues after its last whole line. Worker i of N writes the
contiguous block [n*i/N, n*(i+1)/N) of the list into
`OUTPUT-0000i-of-0000N`; merge_parts() concatenates the finished parts into
OUTPUT, renamed into place only when whole.
"""

import json
import os
import shutil

from trainer import files
from trainer.cli import UserError


def shard_bounds(num_locations, num_workers, index):
    """Worker `index` predicts locations[start:stop]; blocks are contiguous so parts concatenate in order."""
    return num_locations * index // num_workers, num_locations * (index + 1) // num_workers


def part_path(output_path, index, num_workers):
    return output_path if num_workers == 1 else f"{output_path}-{index:05d}-of-{num_workers:05d}"


def format_line(location, record, output_format, float_precision=None):
    """One output line; every float rounded to float_precision significant digits (None: as given)."""
    if float_precision is not None:
        record = _rounded(record, float_precision)
    if output_format == "jsonl":
        return json.dumps({"location": location, **record}) + "\n"
    return f"{location}, {json.dumps(record)}\n"


class Lines:
    """Writes each batch's lines at once (the default: every line holds its whole record)."""

    def __init__(self, out, output_format, float_precision):
        self.out, self.output_format, self.float_precision = out, output_format, float_precision

    def add(self, location, record):
        self.out.write(format_line(location, record, self.output_format, self.float_precision))

    def end_batch(self):
        self.out.flush()

    def close(self):
        self.out.flush()


def _rounded(value, digits):
    """value with each float cut to `digits` significant digits; JSON then writes the shortest form of each."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {key: _rounded(item, digits) for key, item in value.items()}
    if isinstance(value, list):
        return [_rounded(item, digits) for item in value]
    return value


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
    if not files.exists(path):
        return 0, 0
    done, failures, good_bytes = 0, 0, 0
    with files.open_file(path, "rb") as f:
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
    if not files.is_remote(path):
        os.truncate(path, size)
        return
    # Object stores cannot truncate: write the good prefix beside it and rename it over.
    with files.open_file(path, "rb") as f, files.atomic_writer(path, "wb") as out:
        while size > 0:
            chunk = f.read(min(size, 1 << 24))
            out.write(chunk)
            size -= len(chunk)


def merge_parts(all_locations, output_path, output_format, num_workers):
    """Concatenates the finished parts of all workers into output_path, in input order; returns the failures."""
    parts, failures = [], 0
    for i in range(num_workers):
        start, stop = shard_bounds(len(all_locations), num_workers, i)
        path = part_path(output_path, i, num_workers)
        done, failed = scan_output(path, all_locations[start:stop], output_format)
        if done != stop - start:
            raise UserError(f"{path} has {done} of {stop - start} lines; run (or rerun) worker {i} to finish it")
        parts.append(path)
        failures += failed
    with files.atomic_writer(output_path, "wb") as out:
        for path in parts:
            with files.open_file(path, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 24)
    return failures
