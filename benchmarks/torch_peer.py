"""The PyTorch peer: Hugging Face ``LlavaForConditionalGeneration`` + peft LoRA, on CPU.

Run by ``compare_train.py`` / ``compare_decode.py`` in its own process (pinned with
taskset by the caller); prints one JSON line of timings. Benchmark-only
dependencies: ``benchmarks/requirements.txt``.

  python benchmarks/torch_peer.py train --size tiny --mode eager --steps 10
  python benchmarks/torch_peer.py decode --size tiny --batch 1 --new_tokens 64
  python benchmarks/torch_peer.py count --size tiny      # parameter counts only

The model is what LLaVA-style fine-tuning scripts build: random init from a
``LlavaConfig`` (``specs.hf_config_kwargs``), ``peft.get_peft_model`` with LoRA on
the language model's linears, ``torch.optim.AdamW`` on the trainable parameters,
global-norm clipping, ``labels`` = -100 outside the answer. ``--mode compile``
wraps the model in ``torch.compile`` (inductor), as users do for speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import specs

# peft's target_modules as a regex (fullmatched on module names): the language
# model's linears only. A plain name list would also adapt SigLIP's q/k/v_proj.
PEFT_TARGET_REGEX = r".*language_model.*\.(" + "|".join(specs.PEFT_TARGETS) + ")"


def build_model(spec: specs.Spec, *, lora: bool):
  """The spec's LLaVA model (random init, seed 0), with peft LoRA when ``lora``."""
  from transformers import (
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    SiglipVisionConfig,
  )

  kw = specs.hf_config_kwargs(spec)
  config = LlavaConfig(
    vision_config=SiglipVisionConfig(**kw["vision"]),
    text_config=LlamaConfig(**kw["text"]),
    **kw["llava"],
  )
  torch.manual_seed(0)
  model = LlavaForConditionalGeneration(config)
  if not lora:
    return model.eval()
  from peft import LoraConfig, get_peft_model

  lora_cfg = LoraConfig(
    r=specs.LORA_RANK,
    lora_alpha=specs.LORA_ALPHA,
    lora_dropout=0.0,
    target_modules=PEFT_TARGET_REGEX,
    bias="none",
  )
  return get_peft_model(model, lora_cfg).train()


def counts(model) -> dict[str, int]:
  total = sum(p.numel() for p in model.parameters())
  trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
  lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
  return {"params": total, "trainable": trainable, "lora_params": lora}


def base_param_count(spec: specs.Spec) -> int:
  """Parameters of the model without adapters."""
  return sum(p.numel() for p in build_model(spec, lora=False).parameters())


def hf_inputs(spec: specs.Spec, raw: dict) -> dict[str, torch.Tensor]:
  """``specs.make_batch`` output -> LLaVA's inputs: image placeholders, then the text."""
  b = raw["text"].shape[0]
  img_ids = torch.full((b, spec.image_tokens), spec.image_token_id, dtype=torch.long)
  text = torch.from_numpy(raw["text"]).long()
  input_ids = torch.cat([img_ids, text], dim=1)
  labels = torch.full_like(input_ids, -100)
  answer = torch.from_numpy(raw["answer"])
  labels[:, spec.image_tokens :][answer] = text[answer]
  pixel_values = torch.from_numpy(raw["image"]).permute(0, 3, 1, 2).contiguous()
  return {
    "input_ids": input_ids,
    "pixel_values": pixel_values,
    "attention_mask": torch.ones_like(input_ids),
    "labels": labels,
  }


def run_train(spec: specs.Spec, mode: str, steps: int, warmup: int) -> dict:
  model = build_model(spec, lora=True)
  info = counts(model)
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(
    params, lr=specs.LR, betas=specs.BETAS, eps=specs.EPS, weight_decay=specs.WEIGHT_DECAY
  )
  fwd = torch.compile(model) if mode == "compile" else model
  inputs = hf_inputs(spec, specs.make_batch(spec))

  def step() -> float:
    loss = fwd(**inputs).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, specs.GRAD_CLIP)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()

  t0 = time.perf_counter()
  first_loss = step()
  first_s = time.perf_counter() - t0
  for _ in range(warmup):
    step()
  t0 = time.perf_counter()
  for _ in range(steps):
    step()
  step_s = (time.perf_counter() - t0) / steps
  return {
    "side": f"hf_{mode}",
    "first_step_s": first_s,
    "step_ms": step_s * 1e3,
    "first_loss": first_loss,
    **info,
  }


def run_decode(spec: specs.Spec, batch: int, prompt_text: int, new_tokens: int, reps: int) -> dict:
  model = build_model(spec, lora=False)
  raw = specs.make_batch(dataclasses.replace(spec, batch_size=batch))
  inputs = hf_inputs(spec, raw)
  inputs["input_ids"] = inputs["input_ids"][:, : spec.image_tokens + prompt_text]
  inputs["attention_mask"] = inputs["attention_mask"][:, : spec.image_tokens + prompt_text]
  del inputs["labels"]
  # min_new_tokens keeps a random model from stopping early at its EOS id.
  gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

  @torch.inference_mode()
  def once():
    return model.generate(**inputs, **gen)

  t0 = time.perf_counter()
  out = once()
  first_s = time.perf_counter() - t0
  assert out.shape[1] - inputs["input_ids"].shape[1] == new_tokens, out.shape
  t0 = time.perf_counter()
  for _ in range(reps):
    once()
  call_s = (time.perf_counter() - t0) / reps
  return {
    "side": "hf_generate",
    "first_call_s": first_s,
    "call_s": call_s,
    "tokens_per_s": batch * new_tokens / call_s,
    "prompt_len": int(inputs["input_ids"].shape[1]),
  }


def main(argv: list[str] | None = None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("what", choices=("train", "decode", "count"))
  ap.add_argument("--size", default="tiny", choices=sorted(specs.SPECS))
  ap.add_argument("--mode", default="eager", choices=("eager", "compile"))
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--prompt_text", type=int, default=16)
  ap.add_argument("--new_tokens", type=int, default=64)
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
  args = ap.parse_args(argv)
  torch.set_num_threads(args.threads)
  spec = specs.get_spec(args.size)
  if args.what == "train":
    out = run_train(spec, args.mode, args.steps, args.warmup)
  elif args.what == "decode":
    out = run_decode(spec, args.batch, args.prompt_text, args.new_tokens, args.reps)
  else:
    out = counts(build_model(spec, lora=True)) | {"base_params": base_param_count(spec)}
  out |= {"threads": torch.get_num_threads(), "size": args.size, "torch": torch.__version__}
  print(json.dumps(out), flush=True)


if __name__ == "__main__":
  main()
