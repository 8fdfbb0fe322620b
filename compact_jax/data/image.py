"""Image decoding and SigLIP preprocessing.

Every input mode (grayscale, palette, RGBA, CMYK, 16-bit) becomes RGB; images
are padded to a square with a neutral fill (as LLaVA-1.5's ``--image_aspect_ratio
pad``), resized, and mapped to SigLIP's [-1, 1] range (big_vision's
``value_range(-1, 1)``, HF's mean = std = 0.5).

With dynamic resolution (``config.model.dynamic_res``, models/anyres.py) an image
becomes a global view plus tiles instead (:func:`tile_views`);
:class:`ImagePreprocessor` picks the right path for every caller.
"""

from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
from PIL import Image

from compact_jax.models import anyres

# Mid-grey is zero after normalisation, so padding carries no signal.
PAD_FILL = (127, 127, 127)


def check_fill(fill, *, key: str = "pad_fill") -> tuple[int, int, int]:
  """``fill`` as an (r, g, b) tuple of ints in 0..255, or a ValueError naming ``key``."""
  try:
    rgb = tuple(fill)
  except TypeError:
    rgb = ()
  ok = len(rgb) == 3 and all(
    isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 0 <= v <= 255 for v in rgb
  )
  if not ok:
    raise ValueError(f"{key} must be three integers in 0..255 (an RGB colour), got {fill!r}")
  return tuple(int(v) for v in rgb)


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
  canvas = Image.new("RGB", (side, side), tuple(fill))
  canvas.paste(img, ((side - w) // 2, (side - h) // 2))
  return canvas


def preprocess_image(
  data: bytes, size: int, *, where: str = "image", fill: tuple[int, int, int] = PAD_FILL
) -> np.ndarray:
  """Encoded bytes -> float32[size, size, 3] in [-1, 1], padded to a square with ``fill``."""
  img = pad_to_square(decode_rgb(data, where=where), fill)
  if img.size != (size, size):
    img = img.resize((size, size), Image.Resampling.BICUBIC)
  return np.asarray(img, dtype=np.float32) / 127.5 - 1.0


def _to_model_range(img: Image.Image) -> np.ndarray:
  return np.asarray(img, dtype=np.float32) / 127.5 - 1.0


def resize_and_pad(
  img: Image.Image, size: tuple[int, int], fill: tuple[int, int, int] = PAD_FILL
) -> Image.Image:
  """LLaVA-NeXT's ``resize_and_pad_image``: scales ``img`` (aspect kept) to fit ``size``
  (h, w), rounding the shorter side up, and centres it on a ``fill`` canvas."""
  th, tw = size
  w, h = img.size
  if tw / w < th / h:
    nw, nh = tw, min(math.ceil(h * tw / w), th)
  else:
    nw, nh = min(math.ceil(w * th / h), tw), th
  canvas = Image.new("RGB", (tw, th), tuple(fill))
  canvas.paste(img.resize((nw, nh), Image.Resampling.BICUBIC), ((tw - nw) // 2, (th - nh) // 2))
  return canvas


def tile_views(
  img: Image.Image, tiling: anyres.Tiling, fill: tuple[int, int, int] = PAD_FILL
) -> tuple[np.ndarray, np.ndarray]:
  """An RGB image -> its views for dynamic resolution, as the model expects them.

  Returns:
    (views float32[num_slots, S, S, 3] in [-1, 1], tile_layout int32[4]). Slot 0 is
    the global view (if ``tiling.thumbnail``): the whole image squashed to S x S, as
    LLaVA-NeXT's base image and InternVL's thumbnail. Then the ``rows * cols`` tiles,
    row-major: AnyRes letterboxes the image into its best pinpoint
    (:func:`resize_and_pad`), InternVL resizes it to the closest-aspect grid; unused
    slots are zeros. ``tile_layout`` is (rows, cols, image height, image width).
  """
  s = tiling.tile_size
  w, h = img.size
  rows, cols = tiling.layout((h, w))
  if tiling.mode == "anyres":
    canvas = resize_and_pad(img, (rows * s, cols * s), fill)
  else:
    canvas = img.resize((cols * s, rows * s), Image.Resampling.BICUBIC)
  views = np.zeros((tiling.num_slots, s, s, 3), np.float32)
  start = int(tiling.thumbnail)
  if tiling.thumbnail:
    views[0] = _to_model_range(img.resize((s, s), Image.Resampling.BICUBIC))
  views[start : start + rows * cols] = anyres.split_tiles(_to_model_range(canvas), rows, cols)
  return views, np.asarray([rows, cols, h, w], np.int32)


@dataclasses.dataclass(frozen=True)
class ImagePreprocessor:
  """Encoded bytes (or None: no image) -> the model's image input; one object for the
  train pipeline, evaluation and benchmarks, so all three feed a model alike.

  Without tiling: (float32[S, S, 3], None), pad-to-square as :func:`preprocess_image`.
  With tiling: (float32[num_slots, S, S, 3], tile_layout int32[4]) from :func:`tile_views`.
  A missing image gives zeros (and ``Tiling.blank_layout``).
  """

  image_size: int
  tiling: anyres.Tiling | None = None
  # The pad-to-square / letterbox colour (``config.data.pad_fill``).
  pad_fill: tuple[int, int, int] = PAD_FILL

  def __call__(
    self, data: bytes | None, *, where: str = "image"
  ) -> tuple[np.ndarray, np.ndarray | None]:
    if self.tiling is None:
      if data is None:
        return np.zeros((self.image_size, self.image_size, 3), np.float32), None
      return preprocess_image(data, self.image_size, where=where, fill=self.pad_fill), None
    if data is None:
      return np.zeros(self.image_shape, np.float32), self.tiling.blank_layout()
    return tile_views(decode_rgb(data, where=where), self.tiling, self.pad_fill)

  @property
  def image_shape(self) -> tuple[int, ...]:
    """One example's image array shape."""
    side = (self.image_size, self.image_size, 3)
    return side if self.tiling is None else (self.tiling.num_slots, *side)
