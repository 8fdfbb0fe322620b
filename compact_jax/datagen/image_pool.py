"""The image pool: listing, sharding, and preparing one image for upload.

Image paths in records are relative to the image root (``config.image_root``, by
default the listed directory itself), so that records mix directly with
LLaVA-665K's ``coco/train2017/...`` paths.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pathlib
import warnings

from PIL import Image

# What the APIs accept as is (OpenAI: png, jpeg, webp, non-animated gif; Gemini: png, jpeg,
# webp, heic, heif). GIF and BMP are re-encoded as PNG.
SEND_AS_IS = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
CONVERTIBLE = {"GIF", "BMP"}
# Files with these suffixes are listed; a suffix or decoded format outside the supported
# set makes the image fail with "unsupported format" rather than vanish from the run.
IMAGE_SUFFIXES = frozenset(
  {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".heic", ".heif", ".avif",
   ".svg", ".ico", ".jp2", ".jxl"}
)  # fmt: skip
SUPPORTED_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"})


class ImageError(ValueError):
  """An image that cannot be used; the message is the failure reason recorded for it."""


@dataclasses.dataclass(frozen=True)
class PreparedImage:
  """An image ready to send: encoded bytes plus what provenance and the cache need."""

  data: bytes
  mime: str
  sha256: str  # of the file as stored, so the cache key survives re-encoding changes
  width: int  # as sent
  height: int
  downscaled: bool


def resolve_roots(images: str, image_root: str) -> tuple[pathlib.Path, pathlib.Path]:
  """(images dir, image root), checked: the dir exists and lies inside the root."""
  if not images:
    raise ValueError("config.images is empty: name a directory of images")
  img_dir = pathlib.Path(images).expanduser().resolve()
  root = pathlib.Path(image_root).expanduser().resolve() if image_root else img_dir
  if not img_dir.is_dir():
    raise ValueError(f"config.images: {str(img_dir)!r} is not a directory")
  if not img_dir.is_relative_to(root):
    raise ValueError(
      f"config.images {str(img_dir)!r} is not inside config.image_root {str(root)!r}"
    )
  return img_dir, root


def list_images(img_dir: pathlib.Path, root: pathlib.Path) -> list[str]:
  """Image paths under ``img_dir`` (recursively), relative to ``root``, sorted.

  Raises:
    ValueError: when the directory holds no image files, before any work starts.
  """
  out = []
  for dirpath, dirnames, filenames in os.walk(img_dir):
    dirnames.sort()
    for name in filenames:
      if name.startswith(".") or pathlib.Path(name).suffix.lower() not in IMAGE_SUFFIXES:
        continue
      out.append(pathlib.Path(dirpath, name).relative_to(root).as_posix())
  if not out:
    raise ValueError(
      f"config.images: {str(img_dir)!r} holds no image files (suffixes {sorted(IMAGE_SUFFIXES)})"
    )
  return sorted(out)


def shard_of(image_rel: str, num_shards: int) -> int:
  """The shard an image belongs to: a hash of its path, so adding images to the pool never
  moves an existing image to another shard."""
  digest = hashlib.sha256(image_rel.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "little") % num_shards


def prepare_image(path: pathlib.Path, *, max_side: int, max_pixels: int) -> PreparedImage:
  """Reads, checks and (if larger than ``max_side``) downscales one image.

  Raises:
    ImageError: unreadable, corrupt, unsupported or larger than ``max_pixels``.
  """
  if path.suffix.lower() not in SUPPORTED_SUFFIXES:
    raise ImageError(f"unsupported format: suffix {path.suffix!r}")
  try:
    raw = path.read_bytes()
  except OSError as e:
    raise ImageError(f"unreadable: {e.strerror or e}") from None
  return prepare_image_bytes(raw, max_side=max_side, max_pixels=max_pixels)


def prepare_image_bytes(raw: bytes, *, max_side: int, max_pixels: int) -> PreparedImage:
  """``prepare_image`` for encoded bytes already in memory (benchmark images in TSV or
  parquet files, which have no path): the same checks, downscaling and re-encoding.

  Raises:
    ImageError: corrupt, unsupported or larger than ``max_pixels``.
  """
  digest = hashlib.sha256(raw).hexdigest()
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("error", Image.DecompressionBombWarning)
      im = Image.open(io.BytesIO(raw))
      fmt = im.format
      w, h = im.size
      if w * h > max_pixels:
        raise ImageError(f"too large: {w}x{h} pixels exceeds max_image_pixels={max_pixels}")
      if fmt not in SEND_AS_IS and fmt not in CONVERTIBLE:
        raise ImageError(f"unsupported format: {fmt}")
      im.load()  # decode now: a truncated file fails here, not at the API
  except ImageError:
    raise
  except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
    raise ImageError(f"too large: {e}") from None
  except Exception as e:  # PIL raises many types for corrupt data
    raise ImageError(f"corrupt or unreadable image: {type(e).__name__}: {e}") from None
  if w < 1 or h < 1:
    raise ImageError(f"corrupt image: size {w}x{h}")
  scale = min(1.0, max_side / max(w, h))
  if scale == 1.0 and fmt in SEND_AS_IS:
    return PreparedImage(raw, SEND_AS_IS[fmt], digest, w, h, downscaled=False)
  if getattr(im, "n_frames", 1) > 1:
    im.seek(0)  # an animated GIF is sent as its first frame
  im = im.convert("RGBA" if im.mode in ("RGBA", "LA", "P") else "RGB")
  if scale < 1.0:
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    im = im.resize(size, Image.Resampling.LANCZOS)
  buf = io.BytesIO()
  if fmt == "JPEG" and im.mode == "RGB":
    im.save(buf, format="JPEG", quality=90)
    mime = "image/jpeg"
  else:
    im.save(buf, format="PNG")
    mime = "image/png"
  return PreparedImage(buf.getvalue(), mime, digest, im.width, im.height, downscaled=scale < 1.0)
