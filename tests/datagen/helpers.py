"""Shared pieces of the datagen tests: a pool of real photographs and a test config."""

from __future__ import annotations

import importlib.util
import pathlib
import shutil

from configs import datagen as datagen_config

KEY_ENV = "COMPACT_JAX_TEST_API_KEY"
SECRET = "sk-test-SECRET-7f3a9c1e5b"
# Real photographs shipped inside scikit-image (no download).
PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "hubble_deep_field.jpg")


def skimage_data_dir() -> pathlib.Path:
  spec = importlib.util.find_spec("skimage.data")
  return pathlib.Path(next(iter(spec.submodule_search_locations)))


def photo_pool(root: pathlib.Path, names=PHOTOS) -> pathlib.Path:
  """Copies photographs into ``root/photos/``; records then say ``photos/<name>``."""
  d = root / "photos"
  d.mkdir(parents=True, exist_ok=True)
  for name in names:
    shutil.copy(skimage_data_dir() / name, d / name)
  return d


def make_config(backend: str, *, images: str = "", image_root: str = "", base_url: str = ""):
  c = datagen_config.get_config(f"backend={backend},smoke")
  c.images = images
  c.image_root = image_root
  c.backend.base_url = base_url
  if backend != "world":
    c.backend.api_key_env = KEY_ENV
    c.backend.request_timeout_s = 1.0
  c.datagen.backoff_initial_s = 0.01
  c.datagen.backoff_max_s = 0.05
  c.datagen.max_image_side = 96
  c.datagen.progress = False
  c.datagen.requests_per_minute = 0.0
  c.stages = ("datagen",)
  return c
