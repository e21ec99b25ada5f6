"""Image bytes <-> uint8 arrays. Tiny images are stored raw (decode is a reshape); larger ones as PNG/JPEG."""
from __future__ import annotations

import io

import numpy as np

ENCODINGS = ("raw", "png", "jpeg")


def encode_image(pixels: np.ndarray, encoding: str, quality: int = 90) -> bytes:
    """pixels: uint8 (H, W, C) with C in {1, 3}."""
    if encoding == "raw":
        return np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()
    from PIL import Image

    img = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    buf = io.BytesIO()
    if encoding == "png":
        img.save(buf, format="PNG", compress_level=1)
    elif encoding == "jpeg":
        img.save(buf, format="JPEG", quality=quality)
    else:
        raise ValueError(f"unknown image encoding '{encoding}' (expected one of {', '.join(ENCODINGS)})")
    return buf.getvalue()


def decode_images(blobs: list[bytes] | np.ndarray, encoding: str, shape: tuple[int, int, int]) -> np.ndarray:
    """Decode a batch into one uint8 array (N, H, W, C); every image must have `shape`."""
    h, w, c = shape
    if encoding == "raw":
        flat = np.frombuffer(b"".join(bytes(b) for b in blobs), dtype=np.uint8)
        return flat.reshape(len(blobs), h, w, c)
    from PIL import Image

    out = np.empty((len(blobs), h, w, c), dtype=np.uint8)
    mode = "L" if c == 1 else "RGB"
    for i, blob in enumerate(blobs):
        with Image.open(io.BytesIO(bytes(blob))) as img:
            arr = np.asarray(img.convert(mode))
        if arr.shape[:2] != (h, w):
            raise ValueError(f"image {i} of the batch is {arr.shape[1]}x{arr.shape[0]}, expected {w}x{h}")
        out[i] = arr.reshape(h, w, c)
    return out
