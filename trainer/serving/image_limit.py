"""The pixel limit on encoded images, read from their headers before anything decodes them.

Decoding allocates width x height x 3 bytes whatever the file's size: a
514 KB PNG of 23000x23000 pixels decodes to 1.6 GB, and TensorFlow decodes
every frame of a GIF even where only the first is kept. PIL's Image.open
reads only the header (and, for a GIF, walks its frames without
decompressing them), so an image above the limit is refused in microseconds.
Pure Python and PIL: no TensorFlow, no training or serving modules, so the
training scan can call it too.
"""

import io
import re
import warnings

MAX_IMAGE_PIXELS = 40_000_000  # the default limit: a 40-megapixel photo decodes to 120 MB
FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP")  # what tf.io.decode_image reads


def decoded_pixels(encoded):
    """(pixels, size text) the image decodes to, from its header: width x height, times the frames of a GIF;
    None when PIL does not read its header (TensorFlow then refuses it or decodes it, as it would anyway)."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(encoded), formats=FORMATS) as image:
                (width, height), frames = image.size, image.n_frames if image.format == "GIF" else 1
    except Image.DecompressionBombError as e:  # above PIL's own ceiling (179 megapixels), far above ours
        (width, height), frames = _size_past_ceiling(encoded, e), 1
    except Exception:  # noqa: BLE001 - not an image PIL knows, or a broken header: not this check's to judge
        return None
    text = f"{width}x{height} pixels" + (f" x {frames} frames" if frames > 1 else "")
    return width * height * frames, text


def _size_past_ceiling(encoded, error):
    """(width, height) of an image Image.open refuses as a bomb: read by its format's own class, which does not
    check; else (pixels, 1) from PIL's message."""
    from PIL import Image

    for name in FORMATS:
        factory, accept = Image.OPEN.get(name, (None, None))
        if factory is None or (accept is not None and not accept(encoded[:16])):
            continue
        try:
            return factory(io.BytesIO(encoded), "").size
        except Exception:  # noqa: BLE001 - not this format: try the next
            continue
    found = re.search(r"\((\d+) pixels\)", str(error))
    return (int(found.group(1)) if found else 2 * (Image.MAX_IMAGE_PIXELS or 0) + 1), 1


def refusal(encoded, max_pixels):
    """Why an encoded image is refused ('its header says 23000x23000 pixels, more than ...'), or None."""
    found = decoded_pixels(encoded)
    if found is None or found[0] <= max_pixels:
        return None
    return f"its header says {found[1]}, more than the limit of {max_pixels:,} pixels"
