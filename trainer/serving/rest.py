"""The REST request formats: what a predict body may hold, and the status answer.

Owns parsing a predict request body into per-image inputs: TensorFlow
Serving's JSON (row `instances` or columnar `inputs`, `{"b64": ...}` encoded
images for serving_default, [height][width][3] uint8 lists for
serving_images), or, as SageMaker's /invocations sends it, one encoded image
as the whole body (Content-Type application/x-image or image/*). Also
BadRequest, the 4xx the server answers for any request it cannot take:
whatever the body holds (nesting deeper than Python can parse included),
parsing it ends in inputs or a BadRequest.
Standard library and NumPy only.
"""

import base64
import binascii
import json

import numpy as np

SIGNATURES = ("serving_default", "serving_images")
IMAGE_CONTENT_TYPE = "application/x-image"  # SageMaker's name for "the body is one encoded image"; also image/*


class BadRequest(Exception):
    """Becomes an HTTP 4xx with {"error": message}."""

    def __init__(self, message, status=400):
        super().__init__(message)
        self.status = status


def _b64(instance, where):
    if isinstance(instance, dict) and set(instance) == {"image_bytes"}:
        instance = instance["image_bytes"]
    if not (isinstance(instance, dict) and isinstance(instance.get("b64"), str)):
        raise BadRequest(f'{where} must be {{"b64": "<base64 of an encoded image>"}}')
    try:
        return base64.b64decode(instance["b64"], validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{where}: b64 is not valid base64") from None


def _image_array(instance, where):
    if isinstance(instance, dict) and set(instance) == {"images"}:
        instance = instance["images"]
    try:
        array = np.asarray(instance)
    except (ValueError, TypeError, RecursionError, OverflowError):
        array = np.asarray(0)  # ragged or too deeply nested lists
    if array.ndim != 3 or array.shape[-1] != 3 or array.dtype.kind not in "iu" or array.min() < 0 or array.max() > 255:
        raise BadRequest(f"{where} must be an image: [height][width][3] integers in [0, 255]")
    return array.astype(np.uint8)


def parse_request(body, content_type):
    """(signature name, per-image inputs, columnar?) of a predict request: the body as one encoded image when
    content_type says it is one, else TF Serving's JSON (whatever else it says: curl -d sends form types)."""
    media = (content_type or "").split(";")[0].strip().lower()
    if media == IMAGE_CONTENT_TYPE or media.startswith("image/"):
        return "serving_default", [body], False
    return parse_body(body)


def parse_body(body):
    """(signature name, per-image inputs, columnar?) of a predict request body."""
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"malformed JSON: {e}") from None
    except RecursionError:
        raise BadRequest("malformed JSON: nested too deeply") from None
    if not isinstance(request, dict) or ("instances" in request) == ("inputs" in request):
        raise BadRequest('the body must be a JSON object with one of "instances" or "inputs"')
    signature = request.get("signature_name", "serving_default")
    if signature not in SIGNATURES:
        raise BadRequest(f"unknown signature_name {signature!r}; this model has {', '.join(SIGNATURES)}")
    columnar = "inputs" in request
    values = request["inputs"] if columnar else request["instances"]
    if isinstance(values, dict) and len(values) == 1 and next(iter(values)) in ("image_bytes", "images"):
        values = next(iter(values.values()))  # {"inputs": {"image_bytes": [...]}}
    if isinstance(values, dict) and signature == "serving_default":
        values = [values]  # a single {"b64": ...}
    if not isinstance(values, list) or not values:
        raise BadRequest('"instances" / "inputs" must be a non-empty list')
    convert = _b64 if signature == "serving_default" else _image_array
    return signature, [convert(v, f"instance {i}") for i, v in enumerate(values)], columnar


def model_status(version="1"):
    return {"model_version_status": [{"version": version, "state": "AVAILABLE",
                                      "status": {"error_code": "OK", "error_message": ""}}]}
