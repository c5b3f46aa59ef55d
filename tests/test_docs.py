"""What the documents promise comes from one place: docs/BENCHMARKS.md speaks only of this
repository (its scripts, its commands), every table in it is a bench script's JSON output
(bench/results/, rendered by bench/results.py), and the README and sample configs quote no
measured figure of their own (they say "about" and point to docs/BENCHMARKS.md)."""

import glob
import os
import re
import shlex

import pytest

from bench import results
from tests.conftest import ROOT


def _read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def test_benchmarks_speak_only_of_this_repository():
    text = _read("docs/BENCHMARKS.md")
    for outside in ("../shared", ".whl", ".gpu/", "issue ", "lent "):
        assert outside not in text.lower(), outside
    for script in set(re.findall(r"bench/[\w/]+\.py", text)):
        assert os.path.exists(os.path.join(ROOT, script)), script


@pytest.mark.parametrize("path", ["README.md", *[os.path.relpath(p, ROOT) for p in
                                                  glob.glob(os.path.join(ROOT, "sample_configs", "**", "*"), recursive=True)
                                                  if os.path.isfile(p)]])
def test_readme_and_sample_configs_quote_no_measured_accuracy(path):
    # A figure like 0.9944 drifts from run to run and machine to machine: it belongs in BENCHMARKS.md.
    figures = [f for f in re.findall(r"\b0\.9\d{2,}", _read(path)) if f not in ("0.999",)]  # 0.999: a decay, not a result
    assert not figures, path


def _blocks():
    """(document, JSON path, content) of every results block in the documents bench/results.py rewrites."""
    return [(doc, path, content) for doc in results.DOCS for path, content in results.blocks(_read(doc))]


def test_every_results_block_shows_its_json():
    missing = [f"{doc}: {path}" for doc, path, _ in _blocks() if not os.path.exists(os.path.join(ROOT, path))]
    assert not missing, "results blocks name JSON files that do not exist:\n" + "\n".join(missing)
    stale = [f"{doc}: {path}" for doc, path, content in _blocks() if content != results.render(results.load(path)) + "\n"]
    assert not stale, "these blocks differ from their JSON; run python bench/results.py:\n" + "\n".join(stale)


def test_every_table_in_benchmarks_is_a_results_block():
    # A table typed by hand drifts from what the scripts measure: each comes from bench/results/.
    text = _read("docs/BENCHMARKS.md")
    blocks = [m.span() for m in results.BLOCK.finditer(text)]
    typed, offset = [], 0
    for number, line in enumerate(text.split("\n"), 1):
        if line.lstrip().startswith("|") and not any(start <= offset < end for start, end in blocks):
            typed.append(f"line {number}: {line}")
        offset += len(line) + 1
    assert not typed, "tables in docs/BENCHMARKS.md outside a results block:\n" + "\n".join(typed)


def test_every_result_is_shown_and_names_an_existing_bench_script():
    shown = {path for _, path, _ in _blocks()}
    unshown, scriptless = [], []
    for path in sorted(glob.glob(os.path.join(ROOT, "bench", "results", "*.json"))):
        relative = os.path.relpath(path, ROOT)
        if relative not in shown:
            unshown.append(relative)
        words = shlex.split(results.load(relative)["command"])
        if not any(re.fullmatch(r"bench/\w+\.py", w) and os.path.exists(os.path.join(ROOT, w)) for w in words):
            scriptless.append(relative)
    assert not unshown, f"in no results block of {', '.join(results.DOCS)}:\n" + "\n".join(unshown)
    assert not scriptless, "their command names no bench script of this repository:\n" + "\n".join(scriptless)
