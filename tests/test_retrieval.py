"""Retrieval metrics and nearest-neighbour search against hand-worked cases and a brute-force reference."""

import math

import numpy as np
import pytest

from trainer import retrieval


def on_circle(degrees):
    angles = np.radians(degrees)
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)


def signs(rng, n, dims=16):
    """Rows of +-1/4 in 16 dims: unit length, and every dot product (a multiple of 1/8) is exact in
    float32, so a brute force computed any other way ranks them identically, ties included."""
    return rng.choice([-0.25, 0.25], size=(n, dims)).astype(np.float32)


def brute_force(embeddings, labels, ks):
    """The definitions, spelled out one query at a time over the full similarity matrix."""
    x = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    similarity = x.astype(np.float64) @ x.T.astype(np.float64)
    recalls, precisions = {k: [] for k in ks}, []
    for i in range(len(x)):
        others = np.delete(np.arange(len(x)), i)
        r = int((labels[others] == labels[i]).sum())
        if r == 0:
            continue
        ranked = others[np.lexsort((others, -similarity[i, others]))]  # similarity desc, then index
        relevant = labels[ranked] == labels[i]
        for k in ks:
            recalls[k].append(relevant[:k].any())
        precision_at = np.cumsum(relevant[:r]) / np.arange(1, r + 1)
        precisions.append((precision_at * relevant[:r]).sum() / r)
    return {**{f"recall_at_{k}": np.mean(v) for k, v in recalls.items()}, "map_at_r": np.mean(precisions),
            "queries": len(precisions)}


def test_six_points_on_a_circle():
    # Angles 0, 30, 70, 150, 200, 310 degrees; labels 7 7 3 3 3 9. Nearest first (angular distance):
    #   p0 (7, R=1): p1 30, p5 50, p2 70 ...     hit at 1; AP@R = 1
    #   p1 (7, R=1): p0 30, p2 40, p5 80 ...     hit at 1; AP@R = 1
    #   p2 (3, R=2): p1 40, p0 70, p3 80, p5, p4 miss at 1 and 2, hit at 3; top 2 hold none: AP@R = 0
    #   p3 (3, R=2): p4 50, p2 80, ...           hit at 1; AP@R = (1/1 + 2/2) / 2 = 1
    #   p4 (3, R=2): p3 50, p5 110, p2 130 ...   hit at 1; AP@R = (1/1 + 0) / 2 = 0.5
    #   p5 (9, R=0): the only 9, not a query (but it is p0's, p1's and p4's neighbour)
    # recall@1 = recall@2 = 4/5, recall@3 = 5/5, MAP@R = (1 + 1 + 0 + 1 + 0.5) / 5 = 0.7
    got = retrieval.retrieval_metrics(on_circle([0, 30, 70, 150, 200, 310]), [7, 7, 3, 3, 3, 9], ks=(1, 2, 3))
    assert got == pytest.approx({"recall_at_1": 0.8, "recall_at_2": 0.8, "recall_at_3": 1.0, "map_at_r": 0.7, "queries": 5})


def test_the_lower_index_wins_a_tie():
    # Three identical embeddings: every neighbour ties, so the lower index ranks first.
    same = np.ones((3, 4))
    # labels 1 1 2: image 0's nearest is image 1 (not 2), image 1's is image 0: both hit.
    assert retrieval.retrieval_metrics(same, [1, 1, 2], ks=(1,))["recall_at_1"] == 1.0
    # labels 2 1 1: images 1 and 2 both find image 0 (label 2) first: both miss.
    assert retrieval.retrieval_metrics(same, [2, 1, 1], ks=(1,))["recall_at_1"] == 0.0
    gallery = np.array([[1, 0], [0, 1], [1, 0], [1, 0], [0, 1]])
    indices, similarities = retrieval.nearest(np.array([[1.0, 0.0]]), gallery, k=4)
    assert indices.tolist() == [[0, 2, 3, 1]]
    assert similarities.tolist() == [[1, 1, 1, 0]]


def test_every_label_alone_is_refused():
    with pytest.raises(ValueError, match="no label has two images"):
        retrieval.retrieval_metrics(np.eye(3), [4, 5, 6])


@pytest.mark.parametrize("embeddings, labels, ks, message", [
    (np.eye(3), [1, 1], (1,), "labels must be 3 integers"),
    (np.eye(3), [0.5, 1.0, 1.0], (1,), "labels must be 3 integers"),
    (np.full((3, 2), np.nan), [1, 1, 2], (1,), "NaN"),
    (np.ones(3), [1, 1, 2], (1,), "2-D"),
    (np.eye(3), [1, 1, 2], (0, 5), "ks must be positive"),
])
def test_bad_input_is_refused_with_the_reason(embeddings, labels, ks, message):
    with pytest.raises(ValueError, match=message):
        retrieval.retrieval_metrics(embeddings, labels, ks=ks)


def test_blocks_and_ties_give_the_brute_force_answer():
    rng = np.random.default_rng(0)
    # A class of 300 (R = 299, far wider than max k), small classes, and 5 labels of one image each.
    labels = np.concatenate([np.full(300, 10**6), rng.integers(0, 40, 395), np.arange(5) + 10**9])
    rng.shuffle(labels)
    embeddings = signs(rng, len(labels))
    expected = brute_force(embeddings, labels, ks=(1, 5, 10))
    for memory_bytes in (1, 400_000, retrieval.MEMORY_BYTES):  # blocks of one row, of a few, whole tiles
        got = retrieval.retrieval_metrics(embeddings, labels, memory_bytes=memory_bytes)
        assert got == pytest.approx(expected, rel=1e-12)
    assert expected["queries"] == 695


def test_the_memory_budget_does_not_change_a_single_bit():
    rng = np.random.default_rng(1)
    embeddings, labels = rng.standard_normal((600, 64)), rng.integers(0, 30, 600)
    assert (retrieval.retrieval_metrics(embeddings, labels, memory_bytes=1)
            == retrieval.retrieval_metrics(embeddings, labels))
    queries, gallery = rng.standard_normal((300, 64)), rng.standard_normal((900, 64))
    small, large = retrieval.nearest(queries, gallery, 20, memory_bytes=1), retrieval.nearest(queries, gallery, 20)
    assert np.array_equal(small[0], large[0]) and np.array_equal(small[1], large[1])


def test_nearest_is_the_brute_force_top_k():
    rng = np.random.default_rng(2)
    queries, gallery = rng.standard_normal((150, 24)), rng.standard_normal((2000, 24)) * 3
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
    similarity = unit(queries) @ unit(gallery).T
    order = np.argsort(-similarity, axis=1, kind="stable")
    indices, similarities = retrieval.nearest(queries, gallery, k=7, memory_bytes=50_000)
    assert indices.dtype == np.int64 and similarities.dtype == np.float32
    assert np.array_equal(indices, order[:, :7])
    np.testing.assert_allclose(similarities, np.take_along_axis(similarity, order[:, :7], axis=1), atol=1e-6)
    # k past the gallery's size: every gallery row, in order
    indices, _ = retrieval.nearest(queries[:3], gallery[:50], k=1000)
    assert np.array_equal(indices, np.argsort(-similarity[:3, :50], axis=1, kind="stable"))


def test_nearest_with_ties_across_blocks_matches_brute_force():
    rng = np.random.default_rng(3)
    queries, gallery = signs(rng, 200), signs(rng, 1000)
    expected = np.lexsort((np.broadcast_to(np.arange(1000), (200, 1000)), -(queries @ gallery.T)), axis=1)[:, :30]
    assert np.array_equal(retrieval.nearest(queries, gallery, k=30, memory_bytes=1)[0], expected)


def test_perfectly_separated_embeddings_score_one():
    rng = np.random.default_rng(4)
    labels = rng.choice([3, 17, 40, 41, 99], size=300)
    embeddings = np.eye(5)[np.searchsorted([3, 17, 40, 41, 99], labels)] + rng.normal(0, 0.01, (300, 5))
    got = retrieval.retrieval_metrics(embeddings, labels)
    assert got == {"recall_at_1": 1.0, "recall_at_5": 1.0, "recall_at_10": 1.0, "map_at_r": 1.0, "queries": 300}


def test_random_embeddings_score_chance():
    rng = np.random.default_rng(5)
    labels = np.repeat(np.arange(10), 200)  # R = 199 of N - 1 = 1999 others
    got = retrieval.retrieval_metrics(rng.standard_normal((2000, 32)), labels)
    assert got["recall_at_1"] == pytest.approx(199 / 1999, abs=0.03)
    assert got["recall_at_10"] == pytest.approx(1 - math.comb(1800, 10) / math.comb(1999, 10), abs=0.05)
    assert got["map_at_r"] < 0.03  # chance is about (199/1999)**2 plus a little
