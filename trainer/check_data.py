"""Data check: `python -m trainer.check_data --training_data_path=... [--validation_data_path=...] --num_classes=N`.

Reads the data as the trainer's pre-training scan does, with the same sources, label check and decode
probe (data.label_check, data.record_details: a folder's or list's images once, TFRecords once for the
labels and once for the images), and reports:
  * images per class, training and validation (usable images, labels inside the range);
  * unreadable images, with their location and why: the file cannot be read, it is empty, not an
    image format TensorFlow decodes, truncated (it ends before its format's end marker), or the
    decoder's message;
  * labels outside [0, num_classes) after --label_offset, which the trainer refuses;
  * image sizes: min / median / max width and height, the shorter side in buckets, the commonest sizes;
  * exact duplicates: images with the same bytes (sha256 of the encoded image) within the training
    set, within the validation set, and validation images that are also training images (leakage:
    the validation accuracy of a memorised image says nothing about new ones).
Only identical bytes count as duplicates. Comparing decoded pixels would need a full decode of every
JPEG (several times the probe's 1/8-size decode) and would add only copies whose metadata alone
differ; a re-encoded or resized copy needs a perceptual hash, which this check does not compute.
Per record only a hash, a size and the labels are kept: the images are streamed.

The text report (stdout, and report.txt in --output_dir) gives the counts first, then at most EXAMPLES
examples per problem; report.json has every problem. Exit status 0 when the trainer would accept the
data (duplicates, leakage, empty classes and skipped images are warnings); 2 with the trainer's own
`error:` line when it would refuse it (a label out of range, too many unreadable images, none usable),
after the report. A source the trainer cannot open (no files, a malformed list, records without the
keys) ends the check at once with the trainer's error.
"""

import dataclasses
import hashlib
import os
import re
import sys
import time

import numpy as np
from absl import flags

from trainer import cli, config as config_lib, files, schema
from trainer.cli import Flag, UserError
from trainer.tasks import TASKS

EXAMPLES = 10  # per problem in the text report
NAMED_CLASSES = 20  # up to this many classes, the text report lists every one
SHORTER_SIDE_EDGES = (32, 64, 128, 224, 512, 1024)  # pixels: the buckets of the image size distribution
PROGRESS_EVERY_S = 30
DATA_FLAGS = ("training_data_path", "validation_data_path", "num_classes", "task", "image_key", "label_key",
              "label_offset", "label_map_path", "max_corrupt_fraction", "max_image_pixels", "tfds_data_dir")

_OPTIONAL_HERE = {"validation_data_path": "Same forms as --training_data_path; also checked for copies of training "
                                          "images (leakage). Optional."}
FLAGS_TABLE = (
    *(dataclasses.replace(schema.BY_NAME[name], required=False, help=_OPTIONAL_HERE[name]) if name in _OPTIONAL_HERE
      else schema.BY_NAME[name] for name in DATA_FLAGS),
    Flag("output_dir", "string", "", "Folder (local or gs://) for report.txt and report.json; without it the text "
         "report is only printed.", "outputs"),
)
PROGRAM = cli.Program(
    usage="python -m trainer.check_data --training_data_path=... [--validation_data_path=...] --num_classes=N "
          "[--output_dir=DIR]",
    summary="Reads every image once, as the trainer does before training, and reports images per class, unreadable "
            "images, labels out of range, image sizes, and exact duplicates within and across the training and "
            "validation sets (leakage).",
    example="python -m trainer.check_data --training_data_path=gs://b/train-* --validation_data_path=gs://b/val-* "
            "--num_classes=5 --output_dir=reports/data",
    groups=("data", "outputs"),
    notes="Exit status 0: the trainer would accept the data (duplicates, leakage and unreadable images within "
          "--max_corrupt_fraction are printed as warnings); 2: it would refuse it, with the trainer's error line, "
          "after the report is written. Duplicates are images with the same bytes (sha256).",
)
FLAGS = flags.FlagValues()
cli.define(FLAGS_TABLE, FLAGS)


@dataclasses.dataclass(frozen=True)
class Records:
    """What one pass found in a source, per record (index i = source order)."""

    path: str  # as the flag gave it
    source: object  # sources.Source
    keys: np.ndarray
    labels: np.ndarray  # label ids (offset subtracted), flat
    splits: np.ndarray  # record i has labels[splits[i]:splits[i + 1]]
    bad_labels: np.ndarray  # indices of records with a label out of range
    label_error: str  # the scan's error for them, or ""
    usable: np.ndarray  # bool: the scan's probe decodes it
    heights: np.ndarray  # pixels; 0 where not usable
    widths: np.ndarray
    digests: np.ndarray  # sha256 of the encoded image, dtype S32 (b"" where not usable)

    def labels_of(self, i):
        return self.labels[self.splits[i]:self.splits[i + 1]]


def main(argv=None):
    cli.parse_command_line(FLAGS, argv, help_of=(PROGRAM, FLAGS_TABLE))
    try:
        settings = _checked_settings(FLAGS)
    except UserError as e:
        cli.fail(str(e))
    cli.import_tensorflow_quietly()
    try:
        report = check(**settings)
        text = render_text(report)
        print(text, end="", flush=True)
        if FLAGS.output_dir:
            write_report(FLAGS.output_dir, report, text)
    except UserError as e:
        cli.fail(str(e))
    if report["error"]:
        cli.fail(report["error"])


def _checked_settings(values):
    """The data flags, checked by the trainer's own rules (config.py); the training flags it also needs keep
    their defaults. The validation path is optional here."""
    cli.require(cli.missing_flags(values, FLAGS_TABLE))
    given = {name: values[name].value for name in DATA_FLAGS}
    config_lib.from_values({**given, "validation_data_path": given["validation_data_path"] or "unused", "max_steps": 1})
    return {**given, "validation_data_path": given["validation_data_path"] or ""}


def check(training_data_path, validation_data_path, num_classes, task, *, image_key, label_key, label_offset,
          label_map_path, max_corrupt_fraction, max_image_pixels=40_000_000, tfds_data_dir=""):
    """The report, a JSON-able dict: per set what it holds and its problems, leakage, warnings, and the
    trainer's verdict ("error": its message when it would refuse the data, else None)."""
    from trainer.sources import RecordFormat, class_names, open_source

    fmt = RecordFormat(image_key, label_key, label_offset, TASKS[task].several_labels, max_image_pixels)
    train_source = open_source(training_data_path, "training_data_path", fmt, tfds_data_dir)
    eval_source = (open_source(validation_data_path, "validation_data_path", fmt, tfds_data_dir)
                   if validation_data_path else None)
    open_set = TASKS[task].open_set  # metric learning: validation ids of classes unseen in training are data
    names = class_names(train_source, eval_source or train_source, num_classes, label_map_path, open_set)
    train = read_records(training_data_path, train_source, num_classes, fmt)
    sets = {"training": train}
    if eval_source is not None:
        sets["validation"] = read_records(validation_data_path, eval_source, None if open_set else num_classes, fmt)
    report = {
        "settings": {"num_classes": num_classes, "task": task, "image_key": image_key, "label_key": label_key,
                     "label_offset": label_offset, "label_map_path": label_map_path,
                     "max_corrupt_fraction": max_corrupt_fraction,
                     "duplicates": "same bytes: sha256 of the encoded image"},
        "class_names": list(names),
        "sets": {name: describe_set(records, num_classes, fmt, names) for name, records in sets.items()},
        "leakage": leakage(train, sets["validation"]) if "validation" in sets else None,
    }
    report["error"] = _trainer_error(sets, max_corrupt_fraction)
    report["accepted"] = report["error"] is None
    report["warnings"] = warnings(report)
    return report


def read_records(path, source, num_classes, fmt):
    """One pass over a source: its labels, then its images (hashed and measured, never kept)."""
    from trainer import data

    cli.say(f"checking --{source.flag} ...")
    keys, labels, splits, bad, message = data.label_check(source, num_classes, fmt)
    count = len(keys)
    order = np.argsort(keys)  # record_details() yields in no particular order
    sorted_keys = keys[order]
    usable = np.zeros(count, bool)
    heights, widths = np.zeros(count, np.int32), np.zeros(count, np.int32)
    digests = np.zeros(count, "S32")
    done, shown = 0, time.monotonic()
    for batch_keys, encoded, batch_heights, batch_widths in data.record_details(source, fmt):
        rows = order[np.searchsorted(sorted_keys, batch_keys)]
        usable[rows], heights[rows], widths[rows] = True, batch_heights, batch_widths
        digests[rows] = [hashlib.sha256(image).digest() for image in encoded]
        done += len(rows)
        if time.monotonic() - shown > PROGRESS_EVERY_S:
            cli.say(f"  {done} of {count} images read")
            shown = time.monotonic()
    return Records(path, source, keys, labels, splits, bad, message, usable, heights, widths, digests)


def _trainer_error(sets, max_corrupt_fraction):
    """The scan's error for the first set it would refuse, in the trainer's order (training first, labels
    before images); None when it would accept both."""
    from trainer import data

    for records in sets.values():
        if records.label_error:
            return records.label_error
        usable_keys = records.keys[records.usable]
        corrupt_keys = records.keys[~records.usable]
        # The scan's own check of what it found (it reads keys, total and corrupt only).
        scan = data.Scan(usable_keys, len(records.keys), tuple(records.source.locate(k) for k in corrupt_keys),
                         corrupt_keys, np.zeros([0], np.int64), np.zeros([1], np.int64))
        try:
            data._check_usable(records.source, scan, max_corrupt_fraction)
        except UserError as e:
            return str(e)
    return None


def describe_set(records, num_classes, fmt, names):
    """One set's part of the report: what it holds, and every problem found in it."""
    source, usable = records.source, records.usable
    record_of_label = np.repeat(np.arange(len(records.keys)), np.diff(records.splits))
    inside = (records.labels >= 0) & (records.labels < num_classes)
    per_class = np.bincount(records.labels[inside & usable[record_of_label]], minlength=num_classes)
    offset = 0 if source.kind == "folder" else fmt.label_offset  # labels as the data writes them

    def label_names(i):
        return [names[label] if 0 <= label < num_classes else str(label + offset) for label in records.labels_of(i)]

    groups = duplicate_groups(records.digests, usable)
    return {
        "path": records.path, "source": source.kind, "records": len(records.keys), "usable": int(usable.sum()),
        "images_per_class": [{"label": i, "name": names[i], "images": int(n)} for i, n in enumerate(per_class)],
        "images_without_labels": int(np.sum(usable & (np.diff(records.splits) == 0))),
        "unreadable": unreadable(source, fmt, records.keys[~usable]),
        "label_problems": [{"location": source.locate(records.keys[i]),
                            "labels": [int(label) + offset for label in records.labels_of(i)]}
                           for i in records.bad_labels],
        "image_sizes": image_sizes(records.heights[usable], records.widths[usable]),
        "duplicates": [{"sha256": _hex(records.digests[group[0]]),
                        "locations": [source.locate(records.keys[i]) for i in group],
                        "labels": [label_names(i) for i in group]} for group in groups],
        "duplicate_copies": int(sum(len(group) - 1 for group in groups)),
    }


def unreadable(source, fmt, keys):
    """[{location, bytes, reason}] of the records the probe could not decode, in the order of keys."""
    found = {key: {"location": source.locate(key), "bytes": None if encoded is None else len(encoded),
                   "reason": read_error or unreadable_reason(encoded, fmt.max_pixels)}
             for key, encoded, read_error in _read(source, fmt, keys)}
    return [found[int(key)] for key in keys]


def _read(source, fmt, keys):
    """(key, encoded image, None) for each record of keys, or (key, None, why it cannot be read); one at a time."""
    from trainer import data

    if source.kind == "tfrecord":
        records = data._encoded(source, keys, fmt).as_numpy_iterator() if len(keys) else ()
        yield from ((int(key), encoded, None) for key, encoded, _ in records)
        return
    for key in keys:
        try:
            with files.open_file(source.files[key], "rb") as f:
                encoded, error = f.read(), None
        except Exception as e:  # noqa: BLE001 - whatever stops the read is the reason
            encoded, error = None, f"cannot read the file: {getattr(e, 'strerror', None) or getattr(e, 'message', e)}"
        yield int(key), encoded, error


_TRUNCATED = {"JPEG": "it ends before its end-of-image marker", "PNG": "it ends before its IEND chunk",
              "GIF": "it ends before its trailer", "BMP": "it is shorter than its header says",
              "WebP": "it is shorter than its header says"}


def image_format(encoded):
    """JPEG, PNG, GIF, BMP or WebP by the first bytes; None for anything else."""
    for magic, kind in ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF8", "GIF"), (b"BM", "BMP")):
        if encoded.startswith(magic):
            return kind
    return "WebP" if encoded[:4] == b"RIFF" and encoded[8:12] == b"WEBP" else None


def unreadable_reason(encoded, max_pixels=0):
    """Why the scan's probe cannot decode these bytes, in words, with the decoder's own message."""
    if not encoded:
        return "empty (0 bytes)"
    declared = _declared_pixels(encoded)
    if max_pixels and declared > max_pixels:
        return f"its header declares {declared:,} pixels, more than --max_image_pixels={max_pixels:,} (left out undecoded)"
    message = _decoder_message(encoded)
    kind = image_format(encoded)
    if message is None:
        return "decodes when read again (it could not be read during the check)"
    if kind is None:
        return f"not an image format TensorFlow decodes (JPEG, PNG, GIF, BMP, WebP); it starts with {encoded[:12]!r}"
    if _is_truncated(kind, encoded):
        return f"truncated {kind}: {_TRUNCATED[kind]} ({message})"
    return f"{kind} that does not decode: {message}"


def _declared_pixels(encoded):
    import tensorflow as tf

    from trainer import images

    try:
        return int(images.header_pixels(tf.constant(encoded)))
    except tf.errors.OpError:  # a JPEG whose header cannot be read: the decoder's message says more
        return 0


def _is_truncated(kind, encoded):
    end = encoded.rstrip(b"\0")  # some writers pad files
    if kind == "JPEG":
        return not end.endswith(b"\xff\xd9")
    if kind == "PNG":
        return b"IEND" not in encoded[-12:]
    if kind == "GIF":
        return not end.endswith(b";")
    if kind == "BMP":
        return int.from_bytes(encoded[2:6], "little") > len(encoded)
    return int.from_bytes(encoded[4:8], "little") + 8 > len(encoded)  # WebP: RIFF size + its 8-byte header


def _decoder_message(encoded):
    """The probe's error for these bytes (its first line, without TensorFlow's op names), None if it decodes."""
    import tensorflow as tf

    from trainer import images

    try:
        if encoded.startswith(b"\xff\xd8\xff"):
            tf.io.decode_jpeg(encoded, channels=3, ratio=8)
        else:
            images.decode_rgb(tf.constant(encoded))
    except tf.errors.OpError as e:
        line = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", e.message.splitlines()[0])
        return re.sub(r"\s*\[Op:\w+\].*$", "", line).strip()
    return None


def duplicate_groups(digests, usable):
    """The usable records that share their bytes with another, as groups of indices (each in source order,
    the groups by their first record)."""
    rows = np.flatnonzero(usable)
    order = rows[np.argsort(digests[rows], kind="stable")]
    ordered = digests[order]
    starts = np.flatnonzero(np.concatenate([[True], ordered[1:] != ordered[:-1]]))
    sizes = np.diff(np.append(starts, len(order)))
    return sorted((order[s:s + n] for s, n in zip(starts[sizes > 1], sizes[sizes > 1])), key=lambda g: g[0])


def leakage(train, val):
    """Usable validation images whose bytes are also a usable training image's, each with its training copies."""
    train_rows, val_rows = np.flatnonzero(train.usable), np.flatnonzero(val.usable)
    leaked = val_rows[np.isin(val.digests[val_rows], train.digests[train_rows])]
    copies = {}
    for i in train_rows[np.isin(train.digests[train_rows], val.digests[leaked])]:
        copies.setdefault(train.digests[i], []).append(train.source.locate(train.keys[i]))
    return {
        "validation_images_in_training": len(leaked), "validation_images": len(val_rows),
        "images": [{"validation": val.source.locate(val.keys[i]), "training": copies[val.digests[i]],
                    "sha256": _hex(val.digests[i])} for i in leaked],
    }


def image_sizes(heights, widths):
    """Width and height min / median / max, the shorter side in buckets, and the three commonest sizes."""
    if not len(heights):
        return None
    edges = SHORTER_SIDE_EDGES
    names = [f"<{edges[0]}"] + [f"{a}-{b - 1}" for a, b in zip(edges, edges[1:])] + [f">={edges[-1]}"]
    buckets = np.bincount(np.searchsorted(edges, np.minimum(heights, widths), side="right"), minlength=len(names))
    sizes, counts = np.unique(np.stack([widths, heights], axis=1), axis=0, return_counts=True)
    commonest = np.argsort(-counts, kind="stable")[:3]
    return {
        "width": _spread(widths), "height": _spread(heights),
        "shorter_side": [{"pixels": name, "images": int(n)} for name, n in zip(names, buckets)],
        "commonest": [{"size": f"{sizes[i][0]}x{sizes[i][1]}", "images": int(counts[i])} for i in commonest],
    }


def _spread(values):
    median = float(np.median(values))
    return {"min": int(values.min()), "median": int(median) if median.is_integer() else median,
            "max": int(values.max())}


def _hex(digest):
    return bytes(digest).ljust(32, b"\0").hex()  # numpy's S32 drops a digest's trailing zero bytes


def warnings(report):
    """What the trainer would accept but a user should know, one sentence each."""
    lines = []
    for name, part in report["sets"].items():
        if part["unreadable"]:
            lines.append(f"{name}: {len(part['unreadable'])} of {part['records']} images cannot be read or decoded; "
                         "the trainer leaves them out")
        empty = [row["name"] for row in part["images_per_class"] if not row["images"]]
        if empty:
            lines.append(f"{name}: no usable images of {_n(len(empty), 'class', 'classes')}: "
                         + ", ".join(empty[:EXAMPLES]) + (" ..." if len(empty) > EXAMPLES else ""))
        if part["duplicates"]:
            lines.append(f"{name}: {_duplicates(part)}")
        conflicting = sum(1 for group in part["duplicates"] if len({tuple(ids) for ids in group["labels"]}) > 1)
        if conflicting:
            lines.append(f"{name}: {_n(conflicting, 'group')} of identical images with different labels")
    leak = report["leakage"]
    if leak and leak["validation_images_in_training"]:
        lines.append(f"leakage: {leak['validation_images_in_training']} of {leak['validation_images']} validation "
                     "images are also training images (same bytes); the validation metrics overstate how the model "
                     "does on new images")
    return lines


def render_text(report):
    """The terminal report: counts first, then at most EXAMPLES examples per problem, warnings, the verdict."""
    sets, leak = report["sets"], report["leakage"]
    heading = "; ".join(f"{name} {part['path']} ({part['source']})" for name, part in sets.items())
    lines = [f"data check: {heading}; {report['settings']['num_classes']} classes", ""]
    lines += _table("counts", sets, [
        ("records", [part["records"] for part in sets.values()]),
        ("usable images", [part["usable"] for part in sets.values()]),
        ("unreadable images", [len(part["unreadable"]) for part in sets.values()]),
        ("labels out of range", [len(part["label_problems"]) for part in sets.values()]),
        ("copies of another image", [part["duplicate_copies"] for part in sets.values()]),
        *([("also in training (leakage)", ["", leak["validation_images_in_training"]])] if leak else []),
    ])
    lines += _class_table(report) + _size_table(sets) + _problems(report)
    lines += [f"warning: {line}" for line in report["warnings"]]
    if report["error"]:
        lines.append(f"result: the trainer would refuse this data: {report['error']}")
    else:
        count = len(report["warnings"])
        lines.append("result: the trainer would accept this data" + (f" ({_n(count, 'warning')})" if count else ""))
    return "\n".join(lines) + "\n"


def _table(title, sets, rows):
    columns = "".join(f"{name:>18}" for name in sets)
    lines = [f"{title:<30}{columns}"] if len(title) < 30 else [title, " " * 30 + columns]
    lines += [f"  {_short(str(label), 28):<28}" + "".join(f"{str(value):>18}" for value in values)
              for label, values in rows]
    return lines + [""]


def _short(text, width):
    return text if len(text) <= width else text[:width - 3] + "..."


def _class_table(report):
    sets, names = report["sets"], report["class_names"]
    counts = [[row["images"] for row in part["images_per_class"]] for part in sets.values()]
    if len(names) <= NAMED_CLASSES:
        title, shown, extra = "images per class", range(len(names)), []
    else:
        title = f"images per class: the {EXAMPLES} fewest of {len(names)} (all: report.json)"
        shown = np.argsort(counts[0], kind="stable")[:EXAMPLES]
        extra = [("min / median / max", ["/".join(str(_spread(np.array(c))[k]) for k in ("min", "median", "max"))
                                         for c in counts])]
    rows = [(names[i], [c[i] for c in counts]) for i in shown] + extra
    if report["settings"]["task"] == "multi_label":
        rows.append(("(no label)", [part["images_without_labels"] for part in sets.values()]))
    return _table(title, sets, rows)


def _size_table(sets):
    sizes = [part["image_sizes"] for part in sets.values()]

    def row(label, cell):
        return label, [cell(s) if s else "-" for s in sizes]

    def spread(key):
        return lambda s: "/".join(str(s[key][k]) for k in ("min", "median", "max"))

    rows = [row("width min/median/max", spread("width")), row("height min/median/max", spread("height"))]
    known = next((s for s in sizes if s), None)
    for i, bucket in enumerate(known["shorter_side"] if known else ()):
        if any(s and s["shorter_side"][i]["images"] for s in sizes):
            rows.append(row(f"shorter side {bucket['pixels']}", lambda s, i=i: s["shorter_side"][i]["images"]))
    rows.append(row("commonest size", lambda s: f"{s['commonest'][0]['size']} ({s['commonest'][0]['images']})"))
    return _table("image sizes (pixels)", sets, rows)


def _problems(report):
    """A section per problem: its count, then at most EXAMPLES examples."""
    sets, settings, leak = report["sets"], report["settings"], report["leakage"]
    unreadable_lines = [f"{name}: {u['location']}: {u['reason']}" for name, part in sets.items()
                        for u in part["unreadable"]]
    lines = _examples(f"unreadable images: {len(unreadable_lines)} (the trainer leaves them out, and stops when they "
                      f"are more than --max_corrupt_fraction={settings['max_corrupt_fraction']:g} of a set)",
                      unreadable_lines)
    label_lines = [f"{name}: {p['location']}: label {','.join(map(str, p['labels']))}" for name, part in sets.items()
                   for p in part["label_problems"]]
    lines += _examples(f"labels outside [0, {settings['num_classes']}) after --label_offset="
                       f"{settings['label_offset']}: {_n(len(label_lines), 'record')} (the trainer refuses them)",
                       label_lines)
    for name, part in sets.items():
        groups = [_group_line(group["locations"], group["labels"]) for group in part["duplicates"]]
        lines += _examples(f"{name}: {_duplicates(part)}", groups)
    if leak:
        lines += _examples(f"leakage: {leak['validation_images_in_training']} of {leak['validation_images']} "
                           "validation images are also training images (same bytes)",
                           [_group_line([item["validation"], *item["training"]]) for item in leak["images"]])
    return lines


def _group_line(locations, labels=None):
    line = " = ".join(locations[:3]) + (f" (+{len(locations) - 3} more)" if len(locations) > 3 else "")
    if labels and len({tuple(ids) for ids in labels}) > 1:
        line += "  [labels differ: " + " / ".join(",".join(map(str, ids)) or "none" for ids in labels[:3]) + "]"
    return line


def _duplicates(part):
    groups, copies = len(part["duplicates"]), part["duplicate_copies"]
    return f"{_n(groups, 'group')} of identical images (same bytes), {_n(copies, 'extra copy', 'extra copies')}"


def _n(count, word, words=None):
    return f"{count} {word if count == 1 else words or word + 's'}"


def _examples(title, items):
    if not items:
        return []
    lines = [title] + [f"  {item}" for item in items[:EXAMPLES]]
    if len(items) > EXAMPLES:
        lines.append(f"  ... and {len(items) - EXAMPLES} more (report.json lists every one)")
    return lines + [""]


def write_report(output_dir, report, text):
    files.makedirs(output_dir)
    files.write_atomic(os.path.join(output_dir, "report.txt"), text)
    files.write_json(os.path.join(output_dir, "report.json"), report)
    cli.say(f"report: {os.path.join(output_dir, 'report.txt')} and report.json")


if __name__ == "__main__":
    main()
    # The report is written and flushed: skip the interpreter's teardown of TensorFlow (seconds).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
