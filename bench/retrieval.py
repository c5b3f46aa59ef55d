"""Time and peak memory of the exact retrieval evaluation, and of nearest() against faiss.

retrieval_metrics on N random unit vectors of --dim with --classes labels, for
each N in --sizes; then nearest() of --queries against a --gallery, and the
same search with faiss.IndexFlatIP when faiss is installed (exact too; "same"
is the share of queries for which it returns NumPy's k neighbours in NumPy's
order). Each case runs in a fresh process; "peak MiB" is that process's
peak resident memory above what it held once the data was made, so it counts
faiss's own allocations as well as NumPy's. On a shared machine, --repeat
keeps each case's fastest run. Records the table as bench/results/retrieval.json.

    python bench/retrieval.py [--sizes 10000 50000 100000] [--dim 512] [--gallery 100000] [--queries 10000] [--repeat 1]
"""

import argparse
import importlib.util
import multiprocessing
import os
import resource
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import results
from trainer import retrieval


def unit_rows(rng, n, dim):
    rows = rng.standard_normal((n, dim), dtype=np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return rows


def resident_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_case(case):
    """One measurement, in its own process: (seconds, peak MiB above the data, result)."""
    kind, n, args = case
    rng = np.random.default_rng(0)
    if kind == "metrics":
        embeddings, labels = unit_rows(rng, n, args.dim), rng.integers(0, args.classes, n)
        call = lambda: retrieval.retrieval_metrics(embeddings, labels, memory_bytes=args.memory_bytes)
    else:
        queries, gallery = unit_rows(rng, args.queries, args.dim), unit_rows(rng, n, args.dim)
        call = lambda: retrieval.nearest(queries, gallery, args.k, memory_bytes=args.memory_bytes)
        if kind == "faiss":
            call = lambda: faiss_search(queries, gallery, args.k)
    before = resident_mib()
    started = time.perf_counter()
    result = call()
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    return seconds, peak, result


def faiss_search(queries, gallery, k):
    import faiss

    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(gallery)
    similarities, indices = index.search(queries, k)
    return indices, similarities


def measure(case, repeat):
    """The fastest of repeat runs, each in a fresh process, with the highest peak."""
    runs = []
    for _ in range(repeat):
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            runs.append(pool.apply(run_case, (case,)))
    seconds, _, result = min(runs, key=lambda run: run[0])
    return seconds, max(run[1] for run in runs), result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000, 100_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--gallery", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--memory_bytes", type=int, default=retrieval.MEMORY_BYTES)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    rows = []
    for n in args.sizes:
        seconds, peak, got = measure(("metrics", n, args), args.repeat)
        summary = f"recall@1 {got['recall_at_1']:.4f}, MAP@R {got['map_at_r']:.5f}, {got['queries']:,} queries"
        rows.append(("retrieval_metrics", n, args.dim, round(seconds, 1), round(peak), summary))
        print(rows[-1], flush=True)
    what = f"{args.queries:,} queries, k {args.k}"
    seconds, peak, (indices, _) = measure(("nearest", args.gallery, args), args.repeat)
    rows.append(("nearest, NumPy", args.gallery, args.dim, round(seconds, 1), round(peak), what))
    print(rows[-1], flush=True)
    if importlib.util.find_spec("faiss"):  # optional: installed apart, for the comparison
        import faiss

        seconds, peak, (faiss_indices, _) = measure(("faiss", args.gallery, args), args.repeat)
        same = np.mean((faiss_indices == indices).all(axis=1))
        rows.append((f"nearest, faiss {faiss.__version__} IndexFlatIP", args.gallery, args.dim, round(seconds, 1),
                     round(peak), f"{what}; same {same:.4f}"))
    results.record("retrieval", ("what", "N (gallery)", "D", "seconds", "peak MiB", "result"), rows)


if __name__ == "__main__":
    main()
