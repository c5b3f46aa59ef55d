"""trainer.predict on an embedding model (--task=metric_learning): .npy shards, and nearest gallery images.

Such a model's export returns `embeddings` [B, D], L2-normalised; by default
each output line holds its image's "embedding". Two flags change that:

  --output_format=npy  Large sets: the embeddings go to .npy files beside the
      output, `OUTPUT.embeddings-00000.npy` (float32 [rows, D]), one per
      --shard_size lines, and each line names its file and row
      ({"embeddings": FILE, "row": R}; failed images get their error line and
      no row). A shard's file is written whole before its lines, so a killed
      job resumes at the first shard whose lines are missing.
  --gallery=FILE  FILE is an earlier prediction output of the gallery images
      (either format). Each query's line holds its --top_k nearest gallery
      images by cosine similarity, most similar first, instead of its embedding:
      {"neighbours": [{"location": ..., "similarity": ...}, ...]}. The search is
      exact (retrieval.nearest), the whole gallery held in memory.
"""

import io
import json
import os

import numpy as np

from trainer import files, retrieval
from trainer.cli import UserError
from trainer.serving import output_file


def is_embedding_model(model):
    return "embeddings" in model.serve_bytes.structured_outputs


class Shards(output_file.Lines):
    """--output_format=npy: embeddings into .npy shards of shard_size lines, each line naming its row."""

    def __init__(self, out, path, shard_size, lines_done):
        super().__init__(out, "jsonl", None)
        self.path, self.shard_size = path, shard_size
        self.shard = lines_done // shard_size  # a resumed job's lines always end at a shard's end
        self.lines, self.rows = [], []

    def add(self, location, record):
        if "embedding" in record:
            self.rows.append(record["embedding"])
            record = {"embeddings": self._name(), "row": len(self.rows) - 1}
        self.lines.append(output_file.format_line(location, record, "jsonl"))
        if len(self.lines) == self.shard_size:
            self._write()

    def end_batch(self):
        pass

    def close(self):
        if self.lines:
            self._write()

    def _name(self):
        return f"{os.path.basename(self.path)}.embeddings-{self.shard:05d}.npy"

    def _write(self):
        buffer = io.BytesIO()
        rows = np.asarray(self.rows, np.float32).reshape(len(self.rows), -1)
        np.save(buffer, rows)
        with files.atomic_writer(os.path.join(os.path.dirname(self.path), self._name()), "wb") as f:
            f.write(buffer.getvalue())
        self.out.write("".join(self.lines))
        self.out.flush()
        self.shard, self.lines, self.rows = self.shard + 1, [], []


def read_gallery(path):
    """(locations, embeddings float32 [G, D]) of an earlier prediction output, in either format."""
    if not files.exists(path):
        raise UserError(f"--gallery={path} does not exist")
    locations, vectors, shards = [], [], {}
    with files.open_file(path) as f:
        for number, line in enumerate(f, 1):
            location, record = _parse(line, path, number)
            if "error" in record:
                continue
            if "embedding" in record:
                vectors.append(np.asarray(record["embedding"], np.float32))
            elif "embeddings" in record:
                name = record["embeddings"]
                if name not in shards:
                    shard_path = os.path.join(os.path.dirname(path), name)
                    if not files.exists(shard_path):
                        raise UserError(f"--gallery={path} line {number} names {shard_path}, which does not exist")
                    with files.open_file(shard_path, "rb") as s:
                        shards[name] = np.load(io.BytesIO(s.read()))
                vectors.append(shards[name][record["row"]])
            else:
                raise UserError(f"--gallery={path} line {number} has no embedding: give the output of trainer.predict "
                                "on the gallery images with the same embedding model")
            locations.append(location)
    if not vectors:
        raise UserError(f"--gallery={path} holds no embeddings")
    sizes = {len(v) for v in vectors}
    if len(sizes) > 1:
        raise UserError(f"--gallery={path} mixes embeddings of sizes {sorted(sizes)}")
    return locations, np.stack(vectors)


def _parse(line, path, number):
    """(location, record) of a prediction output line, jsonl or text ("location, {json}")."""
    line = line.strip()
    try:
        if line.startswith("{"):
            record = json.loads(line)
            return record.pop("location"), record
        location, _, rest = line.partition(", {")
        return location, json.loads("{" + rest)
    except (ValueError, KeyError):
        raise UserError(f"--gallery={path} line {number} is not a trainer.predict output line") from None


def neighbours(embeddings, gallery, top_k):
    """For each embedding [B, D], the top_k nearest gallery images: [{"location", "similarity"}, ...]."""
    locations, vectors = gallery
    if embeddings.shape[1] != vectors.shape[1]:
        raise UserError(f"--gallery holds embeddings of size {vectors.shape[1]} but the model gives "
                        f"{embeddings.shape[1]}: predict the gallery with the same model")
    indices, similarities = retrieval.nearest(embeddings, vectors, top_k)
    return [[{"location": locations[j], "similarity": float(s)} for j, s in zip(row, sims)]
            for row, sims in zip(indices.tolist(), similarities.tolist())]
