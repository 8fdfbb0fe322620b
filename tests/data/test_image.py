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


def test_pad_fill_from_the_config_reaches_training_eval_and_llava():
  import configs.llava15_7b as llava
  import configs.tiny_world as tiny_world
  from compact_jax.eval import run as eval_run

  # A wide white image: rows 0 and 3 of the 4x4 square are padding.
  wide = _encode(Image.new("RGB", (4, 2), (255, 255, 255)))
  c = tiny_world.get_config("smoke")
  c.data.image_size = 4
  c.data.pad_fill = (122, 116, 104)
  img, layout = eval_run.image_preprocessor(c)(wide)
  assert layout is None
  np.testing.assert_allclose(img[0, 0], np.array([122, 116, 104]) / 127.5 - 1.0, rtol=1e-6)
  np.testing.assert_allclose(img[1:3], 1.0)
  # LLaVA-1.5 pads with its processor's mean colour, int(x * 255) per channel.
  clip_mean = (0.48145466, 0.4578275, 0.40821073)
  assert llava.get_config().data.pad_fill == tuple(int(x * 255) for x in clip_mean)
  assert llava.get_config("tower=siglip").data.pad_fill == (127, 127, 127)
  assert tiny_world.get_config("smoke").data.pad_fill == image_lib.PAD_FILL


@pytest.mark.parametrize("fill", [(1, 2), (0, 0, 256), (1.5, 2, 3), "abc", None, (True, 0, 0)])
def test_a_bad_pad_fill_names_the_key(fill):
  with pytest.raises(ValueError, match=r"data\.pad_fill must be three integers"):
    image_lib.check_fill(fill, key="data.pad_fill")
