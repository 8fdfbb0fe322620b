"""Image decoding and SigLIP preprocessing.

Every input mode (grayscale, palette, RGBA, CMYK, 16-bit) becomes RGB; images
are padded to a square with a neutral fill (as LLaVA-1.5's ``--image_aspect_ratio
pad``), resized, and mapped to SigLIP's [-1, 1] range (big_vision's
``value_range(-1, 1)``, HF's mean = std = 0.5).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# Mid-grey is zero after normalisation, so padding carries no signal.
PAD_FILL = (127, 127, 127)


def decode_rgb(data: bytes, *, where: str = "image") -> Image.Image:
  """Decodes encoded image bytes into an RGB PIL image.

  Transparent pixels are composited onto PAD_FILL rather than dropped to black.
  """
  try:
    img = Image.open(io.BytesIO(data))
    img.load()
  except Exception as e:  # PIL raises many types for corrupt data
    raise ValueError(f"{where}: cannot decode image ({type(e).__name__}: {e})") from e
  if img.mode == "P" and "transparency" in img.info:
    img = img.convert("RGBA")
  if img.mode in ("RGBA", "LA", "PA"):
    img = img.convert("RGBA")
    background = Image.new("RGBA", img.size, (*PAD_FILL, 255))
    img = Image.alpha_composite(background, img)
  if img.mode == "I;16" or img.mode == "I":
    # 16-bit grayscale: scale to 8 bits instead of clipping.
    arr = np.asarray(img, dtype=np.float64)
    peak = max(float(arr.max()), 1.0)
    img = Image.fromarray((arr * (255.0 / (65535.0 if peak > 255 else 255.0))).astype(np.uint8))
  return img.convert("RGB")


def pad_to_square(img: Image.Image, fill: tuple[int, int, int] = PAD_FILL) -> Image.Image:
  """Centres ``img`` on a square canvas of its longer side."""
  w, h = img.size
  if w == h:
    return img
  side = max(w, h)
  canvas = Image.new("RGB", (side, side), fill)
  canvas.paste(img, ((side - w) // 2, (side - h) // 2))
  return canvas


def preprocess_image(data: bytes, size: int, *, where: str = "image") -> np.ndarray:
  """Encoded bytes -> float32[size, size, 3] in [-1, 1]."""
  img = pad_to_square(decode_rgb(data, where=where))
  if img.size != (size, size):
    img = img.resize((size, size), Image.Resampling.BICUBIC)
  return np.asarray(img, dtype=np.float32) / 127.5 - 1.0
