r"""Checkpoint converter command line.

  # Hugging Face -> big_vision npz (the layout our models load by name)
  python -m compact_jax.checkpoints.cli hf-to-npz --kind=causal_lm \
      --src=/ckpt/gemma-2b --dst=/ckpt/gemma_2b.npz
  python -m compact_jax.checkpoints.cli hf-to-npz --kind=siglip \
      --src=/ckpt/siglip-so400m-patch14-384 --dst=/ckpt/so400m14_384.npz
  python -m compact_jax.checkpoints.cli hf-to-npz --kind=clip \
      --src=/ckpt/clip-vit-large-patch14-336 --dst=/ckpt/clip_l14_336.npz
  python -m compact_jax.checkpoints.cli hf-to-npz --kind=llava \
      --src=/ckpt/llava-1.5-7b-hf --dst=/ckpt/llava.npz

  # our decoder npz -> Hugging Face (safetensors + config.json)
  python -m compact_jax.checkpoints.cli npz-to-hf --family=gemma --variant=gemma_2b \
      --vocab=256000 --src=/ckpt/gemma_2b.npz --dst=/out/gemma-2b

  # our VLM npz (LoRA merged) -> Hugging Face LlavaForConditionalGeneration
  python -m compact_jax.checkpoints.cli npz-to-llava --vit=clip-L/14 --image_size=336 \
      --vit_output_layer=-2 --llm=vicuna_7b --family=llama --vocab=32064 \
      --image_token_index=32000 --src=/ckpt/llava.npz --dst=/out/llava-hf

The npz keys are ``params/img/...``, ``params/connector/...`` and
``params/llm/...`` (PaliGemma's layout); ``checkpoints.init_from_npz`` loads them.
Each run prints the variant it found so a config can name it. ``npz-to-llava``
builds the model with LLaVA's causal attention over image tokens (as HF runs
it), so export models trained that way; HF LLaVA's prompt puts
``image_token_index`` once per image token (``model.num_image_tokens``) first.
"""

from __future__ import annotations

import argparse
import sys

import ml_dtypes
import numpy as np
from flax import nnx

from compact_jax.checkpoints import big_vision, hf
from compact_jax.models import llm, vlm

KINDS = ("causal_lm", "siglip", "clip", "llava")


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
  if kind == "clip":
    vit = hf.load_clip_vision(src)
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


DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
VLM_PARTS = {"params/img/": "img/", "params/connector/": "connector/", "params/llm/": "llm/"}


def npz_to_llava(
  *,
  vit: str,
  image_size: int,
  vit_output_layer: int,
  llm_variant: str,
  family: str,
  vocab: int,
  image_token_index: int,
  src: str,
  dst: str,
  dtype: str = "float32",
) -> str:
  """Exports a VLM npz (``params/{img,connector,llm}/``, mlp2x_gelu connector,
  adapters merged) as an HF ``LlavaForConditionalGeneration`` directory."""
  from compact_jax import checkpoints

  model = nnx.eval_shape(
    lambda: vlm.VLM(
      vit,
      "mlp2x_gelu",
      llm_variant,
      vocab,
      vit_output_layer=vit_output_layer,
      image_size=image_size,
      causal_image=True,
      rngs=nnx.Rngs(0),
    )
  )
  checkpoints.init_from_npz(model, src, VLM_PARTS)
  hf.export_llava(model, family, dst, image_token_index=image_token_index, dtype=DTYPES[dtype])
  return f"wrote {dst} (llava: {vit}@{image_size} layer {vit_output_layer}, {family} {llm_variant})"


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
  c = sub.add_parser("npz-to-llava")
  c.add_argument("--vit", required=True, help="a models/siglip.py variant, e.g. clip-L/14")
  c.add_argument("--image_size", type=int, required=True)
  c.add_argument("--vit_output_layer", type=int, default=-2, help="LLaVA's feature layer (<= -2)")
  c.add_argument("--llm", required=True, help=f"one of {list(llm.VARIANTS)}")
  c.add_argument("--family", choices=sorted(hf.FAMILY_ARCH), required=True)
  c.add_argument("--vocab", type=int, required=True)
  c.add_argument("--image_token_index", type=int, required=True)
  c.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
  c.add_argument("--src", required=True)
  c.add_argument("--dst", required=True)
  args = parser.parse_args(argv)
  if args.command == "hf-to-npz":
    print(hf_to_npz(args.kind, args.src, args.dst))
  elif args.command == "npz-to-hf":
    print(npz_to_hf(args.family, args.variant, args.vocab, args.src, args.dst))
  else:
    print(
      npz_to_llava(
        vit=args.vit,
        image_size=args.image_size,
        vit_output_layer=args.vit_output_layer,
        llm_variant=args.llm,
        family=args.family,
        vocab=args.vocab,
        image_token_index=args.image_token_index,
        src=args.src,
        dst=args.dst,
        dtype=args.dtype,
      )
    )


if __name__ == "__main__":
  main(sys.argv[1:])
