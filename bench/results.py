"""Benchmark results: one JSON file per table, and the documents' tables rewritten from them.

A bench script calls record(name, columns, rows) for each table it measures:
bench/results/NAME.json keeps the cells with the command that produced them,
the date, the machine, the software versions and the load average, so a
figure in the documents always says where it came from. The documents hold
each table inside a results block,

    <!-- results: bench/results/NAME.json -->
    (what render() gives for that file)
    <!-- end results -->

and `python bench/results.py` rewrites every block from its JSON;
`--check` only lists the stale ones and exits 1 (tests/test_docs.py checks the same).

Cells: a str is shown as it is, an int with thousands separators, a float as
str() gives it (the script rounds it as it wants it shown), None as "-".
BENCH_RESULTS_DIR writes the JSON elsewhere (a machine whose results are copied back).
"""

import argparse
import collections
import importlib.metadata
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ("docs/BENCHMARKS.md", "docs/RELIABILITY.md")  # the documents that hold results blocks
PACKAGES = ("tensorflow", "keras", "keras-hub", "jax", "torch", "timm", "numpy", "faiss-cpu")  # shown when installed
BLOCK = re.compile(r"<!-- results: (?P<path>\S+) -->\n(?P<content>.*?)<!-- end results -->", re.DOTALL)


def record(name, columns, rows):
    """Writes NAME.json (atomically) for one table this process measured, prints the table; returns the path."""
    result = {
        "name": name,
        "command": command(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "software": software(),
        "load": round(os.getloadavg()[0], 1),
        "columns": list(columns),
        "rows": [list(row) for row in rows],
    }
    folder = os.environ.get("BENCH_RESULTS_DIR", os.path.join(ROOT, "bench", "results"))
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{name}.json")
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    print(f"\n{render(result)}\n\n(written to {path})", flush=True)
    return path


def command():
    """This process's command as a reader would type it from the repository root."""
    script = os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)
    return "python " + shlex.join([script, *sys.argv[1:]])


def machine():
    """CPU model and core count, and the GPUs nvidia-smi lists (none when it is absent)."""
    cpu = platform.processor() or platform.machine()
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    parts = [f"{cpu}, {len(os.sched_getaffinity(0))} cores"]
    try:
        listed = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        listed = ""
    for gpu, count in collections.Counter(line.strip() for line in listed.splitlines() if line.strip()).items():
        parts.append(f"{count} x {gpu}")
    return ", ".join(parts)


def software():
    """Python and the versions of the installed packages that set the figures, read without importing them."""
    versions = [f"Python {platform.python_version()}"]
    for package in PACKAGES:
        try:
            versions.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return ", ".join(versions)


def cell(value):
    if value is None:
        return "-"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value).replace("|", "\\|")  # a bar would end the cell


def render(result):
    """The markdown a results block holds: the provenance line in italics, a blank line, the table."""
    lines = [f"*{result['date']} · {result['machine']} · {result['software']} · load {result['load']} · "
             f"`{result['command']}`*", "", "| " + " | ".join(cell(c) for c in result["columns"]) + " |",
             "|" + "---|" * len(result["columns"])]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in result["rows"]]
    return "\n".join(lines)


def blocks(text):
    """(JSON path relative to the repository, content) of every results block in a document's text."""
    return [(m["path"], m["content"]) for m in BLOCK.finditer(text)]


def load(path):
    """The result a block names (path relative to the repository root)."""
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return json.load(f)


def rewritten(text):
    """The document's text with every results block rendered again from its JSON."""
    return BLOCK.sub(lambda m: f"<!-- results: {m['path']} -->\n{render(load(m['path']))}\n<!-- end results -->", text)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="list the stale blocks and exit 1 if any, writing nothing")
    args = parser.parse_args()
    stale = []
    for doc in DOCS:
        with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
            text = f.read()
        missing = [path for path, _ in blocks(text) if not os.path.exists(os.path.join(ROOT, path))]
        if missing:
            sys.exit(f"error: {doc} names {', '.join(missing)}, which does not exist: run the bench script that writes it")
        stale += [f"{doc}: {path}" for path, content in blocks(text) if content != render(load(path)) + "\n"]
        if not args.check and rewritten(text) != text:
            with open(os.path.join(ROOT, doc), "w", encoding="utf-8") as f:
                f.write(rewritten(text))
    if args.check and stale:
        print("stale results blocks (run python bench/results.py):\n" + "\n".join(stale))
        sys.exit(1)
    print("\n".join(f"rewrote {line}" for line in stale) or "every results block is current")


if __name__ == "__main__":
    main()
