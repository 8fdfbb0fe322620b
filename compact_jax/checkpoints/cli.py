r"""Checkpoint converter command line.

  # Hugging Face -> big_vision npz (the layout our models load by name)
  python -m compact_jax.checkpoints.cli hf-to-npz --kind=causal_lm \
      --src=/ckpt/gemma-2b --dst=/ckpt/gemma_2b.npz
  python -m compact_jax.checkpoints.cli hf-to-npz --kind=siglip \
      --src=/ckpt/siglip-so400m-patch14-384 --dst=/ckpt/so400m14_384.npz
  python -m compact_jax.checkpoints.cli hf-to-npz --kind=llava \
      --src=/ckpt/llava-siglip --dst=/ckpt/llava.npz

  # our decoder npz -> Hugging Face (safetensors + config.json)
  python -m compact_jax.checkpoints.cli npz-to-hf --family=gemma --variant=gemma_2b \
      --vocab=256000 --src=/ckpt/gemma_2b.npz --dst=/out/gemma-2b

The npz keys are ``params/img/...``, ``params/connector/...`` and
``params/llm/...`` (PaliGemma's layout); ``checkpoints.init_from_npz`` loads them.
Each run prints the variant it found so a config can name it.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from flax import nnx

from compact_jax.checkpoints import big_vision, hf
from compact_jax.models import llm, vlm

KINDS = ("causal_lm", "siglip", "llava")


def _flat(model: nnx.Module) -> dict[str, np.ndarray]:
  return {k: np.asarray(v) for k, v in vlm.flat_params(nnx.state(model)).items()}


def hf_to_npz(kind: str, src: str, dst: str) -> str:
  """Converts an HF checkpoint directory to a big_vision npz; returns a summary line."""
  if kind == "causal_lm":
    model = hf.load_causal_lm(src)
    big_vision.export_npz(_flat(model), dst, {"": "params/llm/"})
    return f"llm variant: {model.variant} vocab: {model.vocab_size}"
  if kind == "siglip":
    vit = hf.load_siglip_vision(src)
    big_vision.export_npz(_flat(vit), dst, {"": "params/img/"})
    return f"vit variant: {vit.variant} image_size: {vit.image_size}"
  if kind == "llava":
    model, info = hf.load_llava(src)
    parts = {"img/": "params/img/", "connector/": "params/connector/", "llm/": "params/llm/"}
    big_vision.export_npz(_flat(model), dst, parts)
    return f"llava: vit {model.img.variant} llm {model.llm.variant} {info}"
  raise ValueError(f"Unknown kind {kind!r}; known: {KINDS}")


def npz_to_hf(family: str, variant: str, vocab: int, src: str, dst: str) -> str:
  """Exports ``params/llm/`` of a big_vision npz as an HF ``*ForCausalLM`` directory."""
  from compact_jax import checkpoints

  model = nnx.eval_shape(lambda: llm.Decoder(variant, vocab, rngs=nnx.Rngs(0)))
  checkpoints.init_from_npz(model, src, {"params/llm/": ""}, ignore=(r"^params/(?!llm/)",))
  hf.export_causal_lm(model, family, dst)
  return f"wrote {dst} ({family}, {variant})"


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawTextHelpFormatter
  )
  sub = parser.add_subparsers(dest="command", required=True)
  a = sub.add_parser("hf-to-npz")
  a.add_argument("--kind", choices=KINDS, required=True)
  a.add_argument("--src", required=True)
  a.add_argument("--dst", required=True)
  b = sub.add_parser("npz-to-hf")
  b.add_argument("--family", choices=sorted(hf.FAMILY_ARCH), required=True)
  b.add_argument("--variant", required=True, help=f"one of {list(llm.VARIANTS)}")
  b.add_argument("--vocab", type=int, required=True)
  b.add_argument("--src", required=True)
  b.add_argument("--dst", required=True)
  args = parser.parse_args(argv)
  if args.command == "hf-to-npz":
    print(hf_to_npz(args.kind, args.src, args.dst))
  else:
    print(npz_to_hf(args.family, args.variant, args.vocab, args.src, args.dst))


if __name__ == "__main__":
  main(sys.argv[1:])
