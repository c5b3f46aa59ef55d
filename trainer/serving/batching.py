"""The server's batching queue: encoded images of concurrent requests run through serve_bytes in shared calls.

Images of requests arriving within the batch timeout are run as one call of
the serving_default signature, at most max_batch_size images and at most
max_batch_pixels decoded pixels (what bounds the memory a call decodes
into). A request's images go in one chunk at a time, so a request of many
large images takes turns with the others instead of holding the queue. A
chunk that fails to decode is retried alone, so the other requests of its
call still get their answers.
"""

import queue
import threading
import time

import numpy as np

from trainer.serving.rest import BadRequest


class _Item:
    """Some encoded images of one request, waiting for their outputs."""

    def __init__(self, images, pixels, start):
        self.images, self.pixels, self.start = images, pixels, start  # start: the request's index of images[0]
        self.outputs, self.error = None, None
        self.done = threading.Event()


class Batcher:
    """Runs the encoded images of concurrent requests through serve_bytes in shared calls."""

    def __init__(self, serve_bytes, max_batch_size, timeout_s, max_batch_pixels=None):
        self._serve, self._max, self._timeout = serve_bytes, max_batch_size, timeout_s
        self._max_pixels = max_batch_pixels or float("inf")
        self._queue, self._held = queue.Queue(), None
        threading.Thread(target=self._loop, daemon=True, name="batcher").start()

    def predict(self, images, pixels=None):
        """Outputs {name: array [len(images), ...]}; raises BadRequest for an undecodable image.

        pixels: per image, what it decodes to (None or 0 where unknown), to keep each call within max_batch_pixels.
        """
        results = []
        for item in self._chunks(images, pixels or [0] * len(images)):
            self._queue.put(item)
            item.done.wait()
            if item.error:
                raise item.error
            results.append(item.outputs)
        return {key: np.concatenate([outputs[key] for outputs in results]) for key in results[0]}

    def _chunks(self, images, pixels):
        """The request's images in chunks of at most max_batch_size images and max_batch_pixels pixels."""
        chunk, chunk_pixels, start = [], 0, 0
        for index, (image, count) in enumerate(zip(images, pixels)):
            count = count or 0
            if chunk and (len(chunk) == self._max or chunk_pixels + count > self._max_pixels):
                yield _Item(chunk, chunk_pixels, start)
                chunk, chunk_pixels, start = [], 0, index
            chunk.append(image)
            chunk_pixels += count
        yield _Item(chunk, chunk_pixels, start)

    def _next_batch(self):
        batch = [self._held or self._queue.get()]
        self._held, size, pixels = None, len(batch[0].images), batch[0].pixels
        deadline = time.monotonic() + self._timeout
        while size < self._max:
            try:
                item = self._queue.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                break
            if size + len(item.images) > self._max or pixels + item.pixels > self._max_pixels:
                self._held = item  # first of the next batch: a batch never exceeds the limits
                break
            batch.append(item)
            size, pixels = size + len(item.images), pixels + item.pixels
        return batch

    def _loop(self):
        while True:
            self._run(self._next_batch())

    def _run(self, batch):
        import tensorflow as tf

        try:
            outputs = self._serve(image_bytes=tf.constant([b for item in batch for b in item.images]))
            outputs = {key: value.numpy() for key, value in outputs.items()}
            start = 0
            for item in batch:
                item.outputs = {key: value[start:start + len(item.images)] for key, value in outputs.items()}
                start += len(item.images)
        except tf.errors.InvalidArgumentError:
            if len(batch) > 1:  # find the request at fault; the others still get answers
                for item in batch:
                    self._run([item])
                return
            batch[0].error = BadRequest(f"{_undecodable(batch[0])} is not a JPEG, PNG, GIF or BMP image")
        except Exception as e:  # noqa: BLE001 - a model failure answers 500 instead of killing the batcher
            for item in batch:
                item.error = BadRequest(f"prediction failed: {e}", status=500)
        for item in batch:
            item.done.set()


def _undecodable(item):
    """Names the first instance of a failed chunk that does not decode (only failed requests pay for this)."""
    import tensorflow as tf

    for index, image in enumerate(item.images):
        try:
            tf.io.decode_image(image, channels=3, expand_animations=False)
        except tf.errors.InvalidArgumentError:
            return f"instance {item.start + index}"
    return "an instance"
