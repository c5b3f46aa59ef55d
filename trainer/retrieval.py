"""Retrieval evaluation for metric learning, and exact nearest-neighbour search, in NumPy.

An embedding model maps each image to a vector; retrieval asks whether an
image's nearest vectors belong to images of its own label.

- Similarity is cosine: the dot product of the rows after L2 normalisation
  (done here whatever the caller did; a zero row stays zero, similarity 0 to
  everything). Neighbours are ranked by similarity, highest first; equal
  similarities rank the lower index first, so a ranking never depends on how
  a sort happened to break a tie.
- Every image of the set is a query against all the OTHER images of the set.
  R is the number of other images with the query's label.
- recall@k (Song et al. 2016, "Deep Metric Learning via Lifted Structured
  Feature Embedding"): the fraction of queries with at least one image of
  their label among their k nearest (k above N - 1 counts all N - 1).
- MAP@R (Musgrave, Belongie, Lim 2020, "A Metric Learning Reality Check"):
  the mean over queries of (1/R) * sum_{i=1..R} P(i) * rel(i), where rel(i)
  is 1 when the i-th nearest has the query's label and P(i) is the fraction
  of the i nearest that do.
- A query with R = 0 (the only image of its label) has nothing to find: it is
  left out of every metric, still counts as a neighbour of the others, and
  `queries` reports how many queries were scored.

Exact: every pair is scored, nothing is approximated. The similarity matrix
is never whole in memory: queries go in ascending order of R, in tiles of
_TILE rows; a tile's similarities to all N images are one float32 matmul, and
its rows are then ranked in blocks sized from memory_bytes (at least one row,
so the floor is one tile's similarities, _TILE * N * 4 bytes). A row keeps its
top max(max k, largest R in its tile) neighbours, so a large class (R in the
tens of thousands) widens only the tiles of its own queries.

Deterministic: BLAS rounds a float32 dot product differently depending on
where the row sits in the matmul, so the matmul shapes are fixed (tiles of
_TILE queries against the whole gallery, whatever memory_bytes is) and the
result does not depend on the block size. Rounding still differs between
machines, BLAS libraries and thread counts by about 1e-7, which can swap two
neighbours that close.
"""

import numpy as np

MEMORY_BYTES = 256 << 20
# Queries per matmul call: fixed so rounding cannot depend on memory_bytes. Fewer rows make
# float32 BLAS slower: against 256 rows or more, 128 take about 10% longer, 64 about 30%
# (N = 50k, D = 512, 2 cores).
_TILE = 128
# Working bytes per kept neighbour of one row (indices, similarities, sort order, relevance).
_BYTES_PER_NEIGHBOUR = 40


def retrieval_metrics(embeddings, labels, ks=(1, 5, 10), memory_bytes=MEMORY_BYTES):
    """recall_at_K for each K in ks, map_at_r and queries (how many were scored) of embeddings [N, D].

    labels [N] are any integers (an open set: they need not be 0..C-1).
    Working memory is about memory_bytes, plus a copy of the embeddings.
    """
    vectors = _normalised(embeddings, "embeddings")
    labels = np.asarray(labels)
    if labels.shape != (len(vectors),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be {len(vectors)} integers, one per embedding row; got {labels.dtype} {labels.shape}")
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    _, group, sizes = np.unique(labels, return_inverse=True, return_counts=True)
    others = sizes[group] - 1  # R of each image
    queries = np.flatnonzero(others)
    if not len(queries):
        raise ValueError("no label has two images, so no image has anything to retrieve")
    queries = queries[np.argsort(others[queries], kind="stable")]  # ascending R: a tile is as wide as its own queries need
    widths = np.minimum(np.maximum(others[queries], ks[-1]), len(vectors) - 1)

    hits = np.zeros((len(ks), len(queries)), bool)
    precision = np.zeros(len(queries))
    for start, stop, _, ranked in _ranked_blocks(vectors, queries, vectors, widths, memory_bytes, exclude_own=True):
        rows = queries[start:stop]
        relevant = group[ranked] == group[rows, None]
        for i, k in enumerate(ks):
            hits[i, start:stop] = relevant[:, :k].any(axis=1)
        precision[start:stop] = _average_precision_at_r(relevant, others[rows])
    result = {f"recall_at_{k}": float(hits[i].mean()) for i, k in enumerate(ks)}
    result.update(map_at_r=float(precision.mean()), queries=len(queries))
    return result


def nearest(queries, gallery, k, memory_bytes=MEMORY_BYTES):
    """Exact top-k cosine search: (indices [Q, k] int64, similarities [Q, k] float32), best first.

    k is capped at the gallery's size; ties rank the lower gallery index first.
    """
    queries, gallery = _normalised(queries, "queries"), _normalised(gallery, "gallery")
    if queries.shape[1] != gallery.shape[1] or not len(gallery):
        raise ValueError(f"queries {queries.shape} and gallery {gallery.shape} need the same width and a gallery row")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    k = min(int(k), len(gallery))
    indices = np.empty((len(queries), k), np.int64)
    similarities = np.empty((len(queries), k), np.float32)
    everyone = np.arange(len(queries))
    for start, stop, similarity, ranked in _ranked_blocks(queries, everyone, gallery, np.full(len(queries), k), memory_bytes):
        indices[start:stop] = ranked
        similarities[start:stop] = np.take_along_axis(similarity, ranked, axis=1)
    return indices, similarities


def _normalised(rows, name):
    """rows [N, D] as float32 unit vectors; a zero row stays zero."""
    vectors = np.asarray(rows, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [N, D], got shape {vectors.shape}")
    if not np.isfinite(vectors).all():
        raise ValueError(f"{name} hold NaN or infinite values: the model diverged or the rows were not filled")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1)


def _ranked_blocks(queries, query_rows, gallery, widths, memory_bytes, exclude_own=False):
    """Yields (start, stop, similarity, ranked) for consecutive blocks of queries[query_rows].

    similarity [stop - start, len(gallery)]; ranked [stop - start, w]: each row's w most
    similar gallery indices, best first, w being the widest width of its tile (widths
    ascend). exclude_own: queries is the gallery, and a row is never its own neighbour.
    """
    for tile in range(0, len(query_rows), _TILE):
        rows = query_rows[tile:tile + _TILE]
        similarity = queries[rows] @ gallery.T
        if exclude_own:
            similarity[np.arange(len(rows)), rows] = -np.inf
        width = widths[tile + len(similarity) - 1]
        # Each ranked row needs a partitioned copy (4 bytes per gallery image), a mask (1) and its neighbours.
        row_bytes = 5 * len(gallery) + _BYTES_PER_NEIGHBOUR * width
        block_rows = max(1, (memory_bytes - similarity.nbytes) // row_bytes)
        for start in range(0, len(similarity), block_rows):
            block = similarity[start:start + block_rows]
            yield tile + start, tile + start + len(block), block, _top(block, width)


def _top(similarity, width):
    """Indices of each row's width highest similarities, best first; equal ones lower index first.

    np.partition finds the width-th highest value; the row keeps everything above
    it and, of the values equal to it, the lowest indices (argpartition would keep
    an arbitrary subset of those ties).
    """
    n = similarity.shape[1]
    threshold = np.partition(similarity, n - width, axis=1)[:, [n - width]]  # a copy: frees the partition
    keep = similarity >= threshold
    if np.count_nonzero(keep) > len(keep) * width:  # rare: more ties at the threshold than places
        surplus = np.count_nonzero(keep, axis=1) - width
        for row in np.flatnonzero(surplus):
            tied = np.flatnonzero(similarity[row] == threshold[row])
            keep[row, tied[len(tied) - surplus[row]:]] = False
    columns = np.flatnonzero(keep).reshape(len(similarity), width)  # ascending index within each row
    columns %= n
    order = np.argsort(-np.take_along_axis(similarity, columns, axis=1), axis=1, kind="stable")
    return np.take_along_axis(columns, order, axis=1)


def _average_precision_at_r(relevant, r):
    """AP@R of each row: relevant [Q, W] bool, best first, with W >= r [Q] >= 1."""
    rank = np.arange(1, relevant.shape[1] + 1)
    precision = np.cumsum(relevant, axis=1) / rank
    return (precision * (relevant & (rank <= r[:, None]))).sum(axis=1) / r
