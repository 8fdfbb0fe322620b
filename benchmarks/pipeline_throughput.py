"""Input pipeline examples/s (grain over TFDS) vs the train step's examples/s.

  taskset -c 0,1 python benchmarks/pipeline_throughput.py [--quick] [--threads 2]

Two datasets, each built with the real build code (``tfds_io.build_dataset``,
array_record) and read with the real pipeline (``data.pipeline.make_train_dataset``:
JPEG/PNG decode, pad to square, resize, tokenize with the chat template, mask,
bucket-pad, batch):

- "tiny_world": the launcher's generate + build stages at the smoke size
  (``configs/tiny_world.py:smoke``), 64 px PNG renders;
- "photos_336": scikit-image's bundled sample photos (no download) saved as JPEG
  with the longer side 336 px, one LLaVA record per (photo, question), read at the
  model resolution 336 px (LLaVA-1.5's).

Each is iterated in batches of the "tiny" spec's batch size after a warm-up, and
compared with the "tiny" spec's compact_jax train step (measured here in a pinned
subprocess, ``compare_train.py --worker jax``, or given with ``--train_ex_per_s``):
the fastest step we benchmark, so the ratio is the strictest. Issue 7 asks >= 3x.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

import numpy as np
from PIL import Image

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import compare_train  # noqa: E402
import specs  # noqa: E402

from compact_jax.data import pipeline as pipeline_lib  # noqa: E402
from compact_jax.data import template as template_lib  # noqa: E402
from compact_jax.data import tfds_io  # noqa: E402
from compact_jax.data import tokenizer as tokenizer_lib  # noqa: E402

PHOTO_SIZE = 336
# scikit-image sample images shipped inside the package (RGB ones).
PHOTO_NAMES = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
               "immunohistochemistry", "motorcycle_left", "motorcycle_right")  # fmt: skip
QUESTIONS = (
  ("What is the main object in the picture?", "a photo"),
  ("What color dominates the image?", "it varies"),
  ("Is this picture taken indoors or outdoors?", "hard to tell"),
  ("How many people are visible?", "zero or one"),
)


def sample_photos() -> list[np.ndarray]:
  """uint8[H, W, 3] sample photos that scikit-image has locally."""
  from skimage import data

  out = []
  for name in PHOTO_NAMES:
    try:
      img = np.asarray(getattr(data, name)())
    except Exception:  # a sample that needs a download is skipped
      continue
    if img.ndim == 3 and img.shape[-1] == 3:
      out.append(img.astype(np.uint8))
  if not out:
    raise RuntimeError("no scikit-image sample photo is available locally")
  return out


def make_photo_dataset(root: pathlib.Path, repeats: int):
  """JPEGs + records + tokenizer + TFDS build; returns (source, tokenizer, template)."""
  images = root / "images"
  images.mkdir(parents=True)
  names = []
  for i, arr in enumerate(sample_photos()):
    img = Image.fromarray(arr)
    img.thumbnail((PHOTO_SIZE, PHOTO_SIZE), Image.Resampling.BICUBIC)
    names.append(f"photo_{i}.jpg")
    img.save(images / names[-1], quality=90)
  records = []
  for r in range(repeats):
    for i, name in enumerate(names):
      q, a = QUESTIONS[(r + i) % len(QUESTIONS)]
      records.append({
        "id": f"photo{i}_{r}",
        "image": name,
        "conversations": [
          {"from": "human", "value": f"<image>\n{q}{base_suffix()}"},
          {"from": "gpt", "value": a},
        ],
      })  # fmt: skip
  rec_path = root / "records.json"
  rec_path.write_text(json.dumps(records))
  template = template_lib.TEMPLATES["gemma"]
  texts = [template_lib.rendered_text(r["conversations"], template) for r in records]
  tok = tokenizer_lib.train_tokenizer(
    texts, root / "tok.model", vocab_size=256, control_symbols=template.control_symbols
  )
  tfds_io.build_dataset({"train": [rec_path]}, [images], root / "tfds", name="photos")
  return tfds_io.load_split(root / "tfds", "train", name="photos"), tok, template


def base_suffix() -> str:
  from configs import base

  return base.SHORT_ANSWER


def make_tiny_world_dataset(root: pathlib.Path):
  """The launcher's generate + build stages (smoke size); returns (source, tokenizer, template)."""
  from compact_jax import main as main_lib
  from compact_jax.data import build as build_lib
  from configs import tiny_world

  c = tiny_world.get_config("smoke")
  c.stages = ("generate", "build")
  c.compilation_cache_dir = ""
  main_lib.run(c, str(root))
  source = build_lib.load_split(c, str(root), "train")
  return source, build_lib.load_tokenizer(str(root)), template_lib.TEMPLATES[c.data.template]


def examples_per_s(source, tok, template, *, image_size: int, batch: int, batches: int,
                   threads: int) -> float:  # fmt: skip
  """Examples/s of the real train pipeline after a 2-batch warm-up."""
  buckets = (64, 80, 96, 128, 144)
  _, indices = pipeline_lib.analyze(source, tok, template, buckets)
  ds = pipeline_lib.make_train_dataset(
    source, indices, tok, template, image_size=image_size, batch_size=batch,
    seq_buckets=buckets, seed=0,
  )  # fmt: skip
  it = pipeline_lib.make_iterator(ds, num_threads=threads)
  for _ in range(2):
    next(it)
  t0 = time.perf_counter()
  for _ in range(batches):
    b = next(it)
  dt = time.perf_counter() - t0
  assert b["image"].shape == (batch, image_size, image_size, 3), b["image"].shape
  return batches * batch / dt


def main(argv: list[str] | None = None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--batches", type=int, default=40)
  ap.add_argument("--threads", type=int, default=len(compare_train.cores_arg(None).split(",")))
  ap.add_argument("--train_ex_per_s", type=float, default=0.0, help="0 = measure")
  ap.add_argument("--quick", action="store_true", help="10 batches")
  args = ap.parse_args(argv)
  batches = 10 if args.quick else args.batches
  spec = specs.get_spec("tiny")
  train = args.train_ex_per_s
  if not train:
    worker = [str(HERE / "compare_train.py"), "--worker", "jax", "--size", "tiny",
              "--steps", "3" if args.quick else "10", "--warmup", "1"]  # fmt: skip
    out = compare_train.run_pinned(worker, compare_train.cores_arg(None), 1800)
    train = spec.batch_size / (out["step_ms"] * 1e-3)
  print(f"# train step ('tiny' spec, compact_jax): {train:.1f} examples/s; "
        f"pipeline: {args.threads} grain threads, batch {spec.batch_size}")  # fmt: skip
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    runs = {
      "tiny_world": (lambda: make_tiny_world_dataset(tmp / "tw"), 64),
      "photos_336": (lambda: make_photo_dataset(tmp / "photos", repeats=16), PHOTO_SIZE),
    }
    for name, (make, size) in runs.items():
      source, tok, template = make()
      rate = examples_per_s(source, tok, template, image_size=size, batch=spec.batch_size,
                            batches=batches, threads=args.threads)  # fmt: skip
      verdict = "meets" if rate >= 3 * train else "MISSES"
      print(f"pipeline {name}: {rate:.1f} examples/s = {rate / train:.1f}x the train step "
            f"({verdict} the 3x goal)", flush=True)  # fmt: skip


if __name__ == "__main__":
  main()
