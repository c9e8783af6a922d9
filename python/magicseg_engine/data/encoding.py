"""The sample format's image encodings: RGB images as JPEG, label maps as 8-bit grey PNG."""

from __future__ import annotations

from io import BytesIO

import numpy as np
from PIL import Image


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    """[H, W, 3] uint8 RGB -> JPEG bytes."""
    buf = BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode_png(label_map: np.ndarray) -> bytes:
    """[H, W] uint8 labels -> PNG bytes (mode "L": the values are stored as they are)."""
    buf = BytesIO()
    Image.fromarray(label_map, mode="L").save(buf, format="PNG")
    return buf.getvalue()
