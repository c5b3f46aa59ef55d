"""Evaluation metrics from scores and labels, in NumPy (exact, not streamed estimates).

Single-label: top_1_accuracy, top_5_accuracy (more than 5 classes), loss.
Multi-label: mAP (mean over classes with a positive of the average precision),
micro/macro precision, recall and F1 at the thresholds, exact_match, loss; and
per-class figures when asked. Thresholds are one global value, or per class
the one that maximises that class's F1 on the data given ("auto").
"""

import numpy as np

_EPS = 1e-7


def classification(probabilities, labels):
    """probabilities [N, C] summing to 1; labels int [N]."""
    labels = np.asarray(labels)
    ranked = np.argsort(-probabilities, axis=1)
    result = {
        "top_1_accuracy": float(np.mean(ranked[:, 0] == labels)),
        "loss": float(-np.mean(np.log(np.clip(probabilities[np.arange(len(labels)), labels], _EPS, 1.0)))),
    }
    if probabilities.shape[1] > 5:
        result["top_5_accuracy"] = float(np.mean((ranked[:, :5] == labels[:, None]).any(axis=1)))
    return result


def average_precision(scores, positives):
    """AP of one class: the mean, over its positives, of the precision at each one's rank.

    Ties are broken pessimistically (negatives first), so a constant score earns no credit.
    """
    positives = np.asarray(positives, bool)
    if not positives.any():
        return float("nan")
    order = np.lexsort((positives, -np.asarray(scores)))  # by score desc; among ties, negatives first
    hits = positives[order]
    precision_at_rank = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision_at_rank[hits].mean())


def best_f1_thresholds(probabilities, labels, default=0.5):
    """Per class, the threshold with the highest F1 on these scores; default where a class has no positive.

    The threshold sits halfway between the lowest score it accepts and the next
    score below, so it does not hinge on float equality with one example.
    O(N log N) per class: one sort, then F1 at every cut between distinct scores.
    """
    thresholds = np.full(probabilities.shape[1], default, dtype=np.float64)
    for c in range(probabilities.shape[1]):
        positives = labels[:, c].astype(bool)
        if not positives.any():
            continue
        order = np.argsort(-probabilities[:, c], kind="stable")
        scores, hits = probabilities[order, c], positives[order]
        last_of_tie = np.append(scores[1:] != scores[:-1], True)  # a cut may only fall after a whole tie
        accepted = np.arange(1, len(scores) + 1)[last_of_tie]
        tp = np.cumsum(hits)[last_of_tie]
        best = int(np.argmax(2 * tp / (accepted + positives.sum())))
        cut = accepted[best]
        below = scores[cut] if cut < len(scores) else 0.0
        thresholds[c] = (scores[cut - 1] + below) / 2
    return thresholds


def multi_label(probabilities, labels, thresholds, class_names=None):
    """probabilities and labels [N, C] (labels 0/1); thresholds [C]. Adds per_category when class_names is given."""
    labels = np.asarray(labels).astype(bool)
    predicted = probabilities >= np.asarray(thresholds)[None, :]
    tp = (predicted & labels).sum(axis=0)
    fp = (predicted & ~labels).sum(axis=0)
    fn = (~predicted & labels).sum(axis=0)
    precision, recall, f1 = _prf(tp, fp, fn)
    ap = np.array([average_precision(probabilities[:, c], labels[:, c]) for c in range(labels.shape[1])])
    micro_p, micro_r, micro_f1 = _prf(tp.sum(), fp.sum(), fn.sum())
    p = np.clip(probabilities, _EPS, 1 - _EPS)
    result = {
        "mAP": float(np.nanmean(ap)) if np.isfinite(ap).any() else 0.0,
        "macro_precision": float(precision.mean()), "macro_recall": float(recall.mean()), "macro_f1": float(f1.mean()),
        "micro_precision": float(micro_p), "micro_recall": float(micro_r), "micro_f1": float(micro_f1),
        "exact_match": float((predicted == labels).all(axis=1).mean()),
        "loss": float(-np.mean(labels * np.log(p) + (~labels) * np.log(1 - p))),
    }
    if class_names is not None:
        result["per_category"] = {
            name: {"ap": _nan_to_none(ap[c]), "precision": float(precision[c]), "recall": float(recall[c]),
                   "f1": float(f1[c]), "threshold": float(thresholds[c])}
            for c, name in enumerate(class_names)
        }
    return result


def _prf(tp, fp, fn):
    """Precision, recall, F1; 0 where undefined (nothing predicted, or nothing to find)."""
    tp, fp, fn = (np.asarray(x, dtype=np.float64) for x in (tp, fp, fn))
    precision = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=(tp + fp) > 0)
    recall = np.divide(tp, tp + fn, out=np.zeros_like(tp), where=(tp + fn) > 0)
    f1 = np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros_like(tp), where=(2 * tp + fp + fn) > 0)
    return precision, recall, f1


def _nan_to_none(value):
    return None if np.isnan(value) else float(value)
