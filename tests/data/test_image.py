"""Image decoding for every input mode, padding and the SigLIP value range."""

import io

import numpy as np
import pytest
from PIL import Image

from compact_jax.data import image as image_lib


def _encode(img: Image.Image, fmt: str = "PNG") -> bytes:
  buf = io.BytesIO()
  img.save(buf, format=fmt)
  return buf.getvalue()


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "RGBA", "LA", "CMYK", "I;16"])
def test_every_mode_becomes_rgb(mode):
  base = Image.new("RGB", (6, 4), (200, 10, 10))
  img = base.convert(mode)
  out = image_lib.preprocess_image(_encode(img, "TIFF" if mode == "CMYK" else "PNG"), 8)
  assert out.shape == (8, 8, 3) and out.dtype == np.float32
  assert out.min() >= -1.0 and out.max() <= 1.0


def test_pad_to_square_centres_and_fills_grey():
  img = Image.new("RGB", (4, 2), (255, 255, 255))
  out = np.asarray(image_lib.pad_to_square(img))
  assert out.shape == (4, 4, 3)
  np.testing.assert_array_equal(out[0, 0], image_lib.PAD_FILL)  # a padded row
  np.testing.assert_array_equal(out[1:3], 255)  # the image rows, centred


def test_value_range_is_siglip():
  white = image_lib.preprocess_image(_encode(Image.new("RGB", (4, 4), (255, 255, 255))), 4)
  black = image_lib.preprocess_image(_encode(Image.new("RGB", (4, 4), (0, 0, 0))), 4)
  np.testing.assert_allclose(white, 1.0)
  np.testing.assert_allclose(black, -1.0)


def test_transparent_pixels_become_pad_fill_not_black():
  img = Image.new("RGBA", (2, 2), (255, 0, 0, 0))
  out = np.asarray(image_lib.decode_rgb(_encode(img)))
  np.testing.assert_array_equal(out[0, 0], image_lib.PAD_FILL)


def test_corrupt_bytes_name_the_record():
  with pytest.raises(ValueError, match="record 'x1'"):
    image_lib.preprocess_image(b"not an image", 4, where="record 'x1'")
