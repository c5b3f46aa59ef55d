"""The run report: report/ in a job-dir, the page a person opens to see how a run went.

write() puts, in one folder written whole (atomically, local or gs://):

    report.html           everything below on one page, with the best evaluation, every evaluation and the config
    curves.png            training and validation loss, the tuned metric and the learning rate, against the step
    confusion_matrix.png  classification: rows are true classes, each normalised to sum to 1
    per_class_ap.png      multi-label: average precision and threshold per class
    per_class.csv         per class: precision, recall, F1, support (multi-label: AP and threshold too)
    worst.png             the worst-classified validation images, with true and predicted labels
                          (metric learning: the images whose nearest neighbour has another label)

The per-class files and worst.png need the validation arrays; a multi-label
run without them still gets per_class_ap.png from the evaluation's
per_category (--eval_each_category). Precision, recall and F1 are 0 where
undefined (metrics.py's rule). Plots use matplotlib's Figure objects (the Agg
renderer, no pyplot: no window, and no change to a caller's backend), imported
only when a report is written. Rendering stays cheap whatever the data: at
most WORST_IMAGES images, and one picture per plot (about a second for 10
classes and 500 validation images).
"""

import csv
import html
import io
import json
import math
import os
import textwrap

import numpy as np

from trainer import files, metrics

WORST_IMAGES = 16
NAMED_CLASSES = 50  # up to this many, the confusion matrix and the AP chart name every class
_CELL_VALUES = 20  # up to this many classes, confusion matrix cells show their rate
_CONFUSED_PAIRS = 10


def write(report_dir, *, config, evaluations, training_log, best, metric, task_name, class_names, validation=None):
    """Writes the report folder; returns the names of the files in it.

    config: the run's resolved flags (dict); evaluations: every evaluation
    ({"step", metric values...}, as in metrics.json); training_log: rows of
    {"step", "loss", "learning_rate"} (and "data_loss", the loss without weight decay, plotted when
    present); best: the best evaluation; metric: the
    tuned metric's name; validation: None, or (images uint8 [N, H, W, 3] (any
    sequence; only the worst few are read; None for no grid), targets [N, C]
    one-hot or multi-hot, probabilities [N, C]) of the best evaluation.
    """
    from matplotlib import rc_context

    class_names = [str(name) for name in class_names]
    if task_name != "metric_learning":  # its validation arrays are label ids and embeddings
        validation = _checked(validation, len(class_names))
    pngs, extra, sections = {}, {}, []
    with rc_context({"font.size": 9}):
        pngs["curves.png"] = _curves_png(training_log, evaluations, metric, best)
        per_task = {"classification": _classification, "multi_label": _multi_label,
                    "metric_learning": _metric_learning}.get(task_name)
        if per_task:
            sections = per_task(class_names, validation, best or {}, pngs, extra)
    page = _page(config, evaluations, best, metric, task_name, sections, pngs)
    outputs = {"report.html": page.encode("utf-8"), **{k: v.encode("utf-8") for k, v in extra.items()}, **pngs}
    files.write_folder_atomic(str(report_dir), lambda folder: _save(folder, outputs))
    return sorted(outputs)


def _checked(validation, num_classes):
    if validation is None:
        return None
    images, targets, probabilities = validation
    targets, probabilities = np.asarray(targets, np.float64), np.asarray(probabilities, np.float64)
    if not len(targets):
        return None
    if targets.shape != probabilities.shape or targets.shape[1] != num_classes:
        raise ValueError(f"validation targets {targets.shape} and probabilities {probabilities.shape} must both be "
                         f"[N, {num_classes}]")
    if images is not None and len(images) != len(targets):
        raise ValueError(f"{len(images)} validation images for {len(targets)} targets")
    return images, targets, probabilities


def _save(folder, outputs):
    files.makedirs(folder)
    for name, data in outputs.items():
        with files.open_file(os.path.join(folder, name), "wb") as f:
            f.write(data)


# What each task shows. Each adds its pictures to pngs and other files to extra, and returns [(title, html)].

def _classification(names, validation, best, pngs, extra):
    if validation is None:
        return [("Per class", "<p>No validation predictions were given: no confusion matrix or per-class table.</p>")]
    images, targets, probabilities = validation
    true, predicted = targets.argmax(axis=1), probabilities.argmax(axis=1)
    n = len(names)
    counts = np.bincount(true * n + predicted, minlength=n * n).reshape(n, n)
    support = counts.sum(axis=1)
    rates = counts / np.maximum(support, 1)[:, None]
    precision, recall, f1 = metrics._prf(np.diag(counts), counts.sum(axis=0) - np.diag(counts), support - np.diag(counts))
    rows = [[name, precision[c], recall[c], f1[c], int(support[c])] for c, name in enumerate(names)]
    header = ["class", "precision", "recall", "f1", "support"]
    extra["per_class.csv"] = _csv(header, rows)
    pngs["confusion_matrix.png"] = _confusion_png(rates, names)
    pairs = sorted(((counts[t, p], t, p) for t in range(n) for p in range(n) if t != p and counts[t, p]), reverse=True)
    confused = [[names[t], names[p], int(k), rates[t, p]] for k, t, p in pairs[:_CONFUSED_PAIRS]]
    ids = " The axes show class ids: the row order of the per-class table." if n > NAMED_CLASSES else ""
    sections = [
        ("Confusion matrix", _img("confusion_matrix.png", "confusion matrix")
         + f"<p>Rows are the true classes, each normalised to sum to 1; columns the predicted class.{ids}</p>"),
        ("Most confused", _table(["true", "predicted", "images", "share of the true class"], confused)
         if confused else "<p>No validation image was misclassified.</p>"),
        ("Per class", '<p><a href="per_class.csv">per_class.csv</a></p>' + _table(header, rows)),
    ]
    caption = lambda i: (f"{_short(names[true[i]])} {probabilities[i, true[i]]:.2f}",
                         f"{_short(names[predicted[i]])} {probabilities[i, predicted[i]]:.2f}")
    worst = np.argsort(probabilities[np.arange(len(true)), true], kind="stable")  # least probability on the truth
    return sections + _worst(images, worst[true[worst] != predicted[worst]], caption, pngs)


def _multi_label(names, validation, best, pngs, extra):
    thresholds = np.asarray(best.get("thresholds") or [0.5] * len(names), np.float64)
    if validation is not None:
        images, targets, probabilities = validation
        per_category = metrics.multi_label(probabilities, targets, thresholds, names)["per_category"]
        support = targets.sum(axis=0).astype(int).tolist()
    elif best.get("per_category"):
        per_category, support = best["per_category"], [None] * len(names)
    else:
        return [("Per class", "<p>No validation predictions were given and the evaluation has no per-class "
                              "figures (--eval_each_category): no per-class table.</p>")]
    header = ["class", "ap", "precision", "recall", "f1", "threshold", "support"]
    rows = [[name] + [per_category[name][k] for k in header[1:-1]] + [support[c]] for c, name in enumerate(names)]
    extra["per_class.csv"] = _csv(header, rows)
    pngs["per_class_ap.png"] = _ap_png(names, [row[1] for row in rows], thresholds)
    sections = [("Per class", _img("per_class_ap.png", "average precision per class")
                 + '<p>AP: average precision over the validation images (empty: the class has none). Precision, '
                   'recall and F1 at the threshold. <a href="per_class.csv">per_class.csv</a></p>'
                 + _table(header, rows))]
    if validation is None:
        return sections
    predicted = probabilities >= thresholds[None, :]
    p = np.clip(probabilities, 1e-7, 1 - 1e-7)
    loss = -np.mean(targets * np.log(p) + (1 - targets) * np.log(1 - p), axis=1)
    listed = lambda row: _names(names, np.flatnonzero(row))
    caption = lambda i: (listed(targets[i] > 0.5), listed(predicted[i]))
    worst = np.argsort(-loss, kind="stable")
    wrong = (predicted != (targets > 0.5)).any(axis=1)
    return sections + _worst(images, worst[wrong[worst]], caption, pngs)


def _metric_learning(names, validation, best, pngs, extra):
    """The validation images whose nearest other image (what recall@1 looks at) has another label, the
    most similar such pairs first. validation: (images, label ids [N, 1], embeddings [N, D])."""
    from trainer import retrieval

    if validation is None or not len(validation[1]):
        return [("Nearest neighbours", "<p>No validation embeddings were given.</p>")]
    images, targets, embeddings = validation
    labels = np.asarray(targets).reshape(-1)
    if len(labels) < 2:
        return [("Nearest neighbours", "<p>One validation image: nothing to retrieve.</p>")]
    indices, similarities = retrieval.nearest(np.asarray(embeddings, np.float32), np.asarray(embeddings, np.float32), 2)
    own = indices[:, 0] == np.arange(len(labels))  # itself first, unless a duplicate ties with it
    nearest = np.where(own, indices[:, 1], indices[:, 0])
    similarity = np.where(own, similarities[:, 1], similarities[:, 0])
    wrong = np.flatnonzero(labels[nearest] != labels)
    order = wrong[np.argsort(-similarity[wrong], kind="stable")]
    text = (f"<p>{len(wrong)} of {len(labels)} validation images have a nearest neighbour (by cosine similarity, "
            "among the other validation images) with another label.</p>")
    chosen = [int(i) for i in order[:WORST_IMAGES]]
    if images is None or not chosen:
        return [("Nearest neighbours", text)]
    captions = [(f"id {labels[i]}", f"nearest id {labels[nearest[i]]} ({similarity[i]:.2f})") for i in chosen]
    pngs["worst.png"] = _grid_png([np.asarray(images[i]) for i in chosen], captions)
    return [("Nearest neighbours", _img("worst.png", "validation images nearest another label") + text
             + "<p>Shown: those images, the most similar wrong pairs first.</p>")]


def _worst(images, order, caption, pngs):
    """The first WORST_IMAGES of order (the wrong ones, worst first) as worst.png, and its section."""
    chosen = [int(i) for i in order[:WORST_IMAGES]]
    if images is None or not chosen:
        text = "No validation image was misclassified." if chosen == [] else "No validation images were given."
        return [("Worst classified", f"<p>{text}</p>")]
    pngs["worst.png"] = _grid_png([np.asarray(images[i]) for i in chosen], [caption(i) for i in chosen])
    return [("Worst classified", _img("worst.png", "worst-classified validation images")
             + f"<p>The {len(chosen)} misclassified validation images with the highest loss, worst first.</p>")]


def _names(names, ids, most=3):
    shown = [_short(names[i]) for i in ids[:most]]
    return ", ".join(shown) + (f" +{len(ids) - most}" if len(ids) > most else "") if shown else "(none)"


def _short(name, width=22):
    """A class name as a plot shows it: cut to width, a "$" kept as text (matplotlib would start TeX at it)."""
    return (name if len(name) <= width else name[:width - 1] + "…").replace("$", r"\$")


# Pictures.

def _figure(width, height):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _png(figure):
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _curves_png(training_log, evaluations, metric, best):
    figure = _figure(13, 3.6)
    loss, score, lr = figure.subplots(1, 3)
    if any("data_loss" in row for row in training_log):  # the data's part: comparable with validation's
        _line(loss, training_log, "data_loss", "-", label="training (without weight decay)", linewidth=1)
    else:
        _line(loss, training_log, "loss", "-", label="training", linewidth=1)
    _line(loss, evaluations, "loss", "o-", label="validation", markersize=3)
    _line(score, evaluations, metric, "o-", color="tab:green", markersize=3)
    if best and best.get(metric) is not None:
        score.plot([best["step"]], [best[metric]], "*", color="tab:red", markersize=12, label=f"best, step {best['step']}")
        score.legend(loc="lower right")
    _line(lr, training_log, "learning_rate", "-", color="tab:purple", linewidth=1)
    for axes, title in ((loss, "loss"), (score, f"validation {metric}"), (lr, "learning rate")):
        axes.set_title(title)
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
        if not axes.lines:
            axes.text(0.5, 0.5, "no data", ha="center", va="center", transform=axes.transAxes, color="gray")
    if loss.lines:
        loss.legend(loc="upper right")
        values = np.concatenate([line.get_ydata() for line in loss.lines]).astype(np.float64)
        if values.min() > 0 and values.max() > 20 * values.min():  # an early spike would flatten the rest
            loss.set_yscale("log")
    return _png(figure)


def _line(axes, rows, key, style, **options):
    """Plots rows' key against their step; nothing when no row has it."""
    points = [(row["step"], row[key]) for row in rows if row.get(key) is not None]
    if points:
        axes.plot(*zip(*points), style, **options)


def _confusion_png(rates, names):
    n = len(names)
    # Inches: room for a rate in each cell up to _CELL_VALUES classes, then for a 7-point name per row.
    side = max(4.5, 0.35 * n + 2.5) if n <= _CELL_VALUES else 0.22 * n + 3 if n <= NAMED_CLASSES else 10.0
    figure = _figure(side + 1.2, side)
    axes = figure.add_subplot()
    # Above a few hundred classes a cell is smaller than a pixel: average cells rather than drop some.
    image = axes.imshow(rates, cmap="Blues", vmin=0, vmax=1, interpolation="nearest" if n <= 300 else "antialiased")
    figure.colorbar(image, ax=axes, shrink=0.8, label="share of the true class")
    if n <= NAMED_CLASSES:
        size = 9 if n <= _CELL_VALUES else 7
        shown = [_short(name) for name in names]
        axes.set_xticks(range(n), shown, rotation=90, fontsize=size)
        axes.set_yticks(range(n), shown, fontsize=size)
        axes.set(xlabel="predicted class", ylabel="true class")
    else:  # too many to name: ids on the axes, the most confused pairs by name in the page
        axes.set(xlabel="predicted class id", ylabel="true class id")
    if n <= _CELL_VALUES:
        for (t, p), rate in np.ndenumerate(rates):
            if rate >= 0.005:
                axes.text(p, t, f"{rate:.2f}", ha="center", va="center", fontsize=7,
                          color="white" if rate > 0.5 else "black")
    axes.set_title("confusion matrix (rows sum to 1)")
    return _png(figure)


def _ap_png(names, ap, thresholds):
    """AP and threshold per class, lowest AP first; above NAMED_CLASSES, only the lowest ones."""
    known = [c for c in range(len(names)) if ap[c] is not None]
    shown = sorted(known, key=lambda c: ap[c])[:NAMED_CLASSES][::-1]  # barh draws bottom-up: lowest at the top
    figure = _figure(9, max(2.5, 0.25 * len(shown) + 1.2))
    ap_axes, threshold_axes = figure.subplots(1, 2, sharey=True, width_ratios=(3, 1))
    labels = [_short(names[c]) for c in shown]
    ap_axes.barh(range(len(shown)), [ap[c] for c in shown], color="tab:blue")
    ap_axes.set_yticks(range(len(shown)), labels)
    threshold_axes.barh(range(len(shown)), [thresholds[c] for c in shown], color="tab:orange")
    more = f", the {len(shown)} lowest of {len(known)}" if len(shown) < len(known) else ""
    ap_axes.set(xlim=(0, 1), ylim=(-0.6, len(shown) - 0.4), title=f"average precision{more}")
    threshold_axes.set(xlim=(0, 1), title="threshold")
    for axes in (ap_axes, threshold_axes):
        axes.grid(axis="x", alpha=0.3)
    return _png(figure)


def _grid_png(images, captions):
    columns = min(4, len(images))
    rows = math.ceil(len(images) / columns)
    figure = _figure(2.6 * columns, 2.9 * rows)
    for i, (image, (truth, predicted)) in enumerate(zip(images, captions)):
        axes = figure.add_subplot(rows, columns, i + 1)
        axes.imshow(image, interpolation="nearest" if max(image.shape[:2]) < 64 else "antialiased")
        lines = [line for text in (f"true: {truth}", f"predicted: {predicted}")
                 for line in textwrap.wrap(text, 36, max_lines=2, placeholder=" …", subsequent_indent="  ")]
        axes.set_title("\n".join(lines), fontsize=8)
        axes.axis("off")
        for axis in (axes.xaxis, axes.yaxis):  # hidden: the layout then skips their ticks (a third of the time)
            axis.set_visible(False)
    return _png(figure)


# The page and the table file.

def _page(config, evaluations, best, metric, task_name, sections, pngs):
    scalar = lambda evaluation: {k: v for k, v in evaluation.items() if isinstance(v, (int, float)) and k != "step"}
    if best:
        summary = (f"<p>Best {_e(metric)}: <b>{_cell(best.get(metric))}</b> at step {_e(best.get('step'))} "
                   f"of {len(evaluations)} evaluations.</p>" + _table(list(scalar(best)), [list(scalar(best).values())]))
    else:
        summary = "<p>No evaluation ran.</p>"
    columns = list(dict.fromkeys(k for evaluation in evaluations for k in scalar(evaluation)))
    history = _table(["step"] + columns, [[e.get("step")] + [e.get(k) for k in columns] for e in evaluations])
    body = [("Best evaluation", summary), ("Curves", _img("curves.png", "training curves")), *sections,
            ("Every evaluation", history),
            ("Config", _table(["flag", "value"], [[k, _value(v)] for k, v in sorted(config.items())]))]
    title = f"Run report: {config.get('job_dir') or task_name}"
    parts = "\n".join(f"<h2>{_e(heading)}</h2>\n{content}" for heading, content in body)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1300px; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }}
th {{ background: #f3f3f3; }} td:first-child, th:first-child {{ text-align: left; }}
img {{ max-width: 100%; }} h2 {{ margin-top: 1.6em; border-bottom: 1px solid #ddd; }}
</style></head>
<body>
<h1>{_e(title)}</h1>
<p>Task {_e(task_name)}. Pictures: {", ".join(f'<a href="{name}">{name}</a>' for name in sorted(pngs))}.</p>
{parts}
</body></html>
"""


def _img(name, alt):
    return f'<p><img src="{name}" alt="{_e(alt)}"></p>'


def _table(header, rows):
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>\n" for row in rows)
    return f"<table><tr>{head}</tr>\n{body}</table>"


def _cell(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}"
    return _e(value)


def _value(value):
    return value if isinstance(value, str) else json.dumps(value)


def _e(text):
    return html.escape(str(text), quote=True)


def _csv(header, rows):
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([["" if v is None else f"{v:.6g}" if isinstance(v, float) else v for v in row] for row in rows])
    return buffer.getvalue()
