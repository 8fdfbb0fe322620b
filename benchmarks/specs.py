"""Matched benchmark models: one ``Spec`` per size, built the same way in both frameworks.

A spec is a LLaVA-style VLM (SigLIP vision tower -> 2-layer GELU MLP connector ->
LLaMA decoder) with LoRA r=8, alpha=16 on every LM linear (q, k, v, o, gate, up,
down), the vision tower and connector frozen, AdamW on the adapters, and the loss
masked to the answer tokens (issue 7):

- compact_jax: ``jax_config(spec)`` is an ordinary ``configs/base.py`` config
  (``model.lora.*``, ``train.param_groups``) that ``train/state.setup_state`` and
  ``train/step.TrainStep`` run, the code path users train with.
- Hugging Face: ``hf_config_kwargs(spec)`` holds the keyword arguments of
  ``SiglipVisionConfig``, ``LlamaConfig`` and ``LlavaConfig``, and ``PEFT_TARGETS``
  peft's ``target_modules``; ``benchmarks/torch_peer.py`` builds the model from
  them (torch is never imported here, so this module stays importable without it).

Both sides read the same synthetic batch (``make_batch``): ``B`` examples of
``seq_len`` tokens of which ``image_tokens`` are the image's (one per patch) and
the last ``answer_len`` text tokens are the answer that the loss is taken on.

Model FLOPs (``model_flops``, the issue's rule, per train step):

  2*N per token for forward-only parts (vision tower + connector: frozen, and
      nothing before them is trained, so no gradient reaches them),
  4*N per token for frozen LM weights that gradients pass through (every LM
      linear, and the LM head on all S positions, as both implementations run it),
  6*r*(I + O) per token for each LoRA adapter (A[I, r], B[r, O], trained),
  attention 4*S^2*width_attn per layer and example forward (Q K^T and P V over
      the full S x S square), x3 in the LM (backward), x1 in the vision tower.

Elementwise work (norms, softmax, activations, RoPE, loss, optimizer) and the
embedding gather are not counted.
"""

from __future__ import annotations

import dataclasses

import numpy as np

LORA_RANK = 8
LORA_ALPHA = 16.0
# peft's target_modules for LlamaForCausalLM: every linear of every decoder layer.
PEFT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# compact_jax's LoRA targets for the same weights (llm.py parameter names; q/k/v live
# in q_einsum and the fused kv_einsum, gate/up in the fused gating_einsum, whose slices
# get one adapter each, so the adapters and their count are peft's).
JAX_TARGETS = (
  r"llm/layers[^/]*/attn/(q_einsum|kv_einsum|attn_vec_einsum)/w$",
  r"llm/layers[^/]*/mlp/(gating_einsum|linear)$",
)
# Optimizer settings of both sides: torch.optim.AdamW's defaults except the lr, and
# global-norm clipping at 1.0 as Hugging Face's Trainer does by default.
LR = 1e-4
BETAS = (0.9, 0.999)
EPS = 1e-8
WEIGHT_DECAY = 0.01
GRAD_CLIP = 1.0


@dataclasses.dataclass(frozen=True)
class Spec:
  """One benchmark size. ``seq_len`` is the LM's total sequence (image + text tokens)."""

  name: str
  image_size: int
  patch_size: int
  vit_width: int
  vit_depth: int
  vit_mlp: int
  vit_heads: int
  llm_width: int
  llm_depth: int
  llm_heads: int
  llm_mlp: int
  vocab_size: int
  batch_size: int
  seq_len: int
  answer_len: int

  def __post_init__(self):
    if self.image_size % self.patch_size:
      raise ValueError(f"spec {self.name}: image_size is not a multiple of patch_size")
    if not 0 < self.answer_len < self.text_len:
      raise ValueError(f"spec {self.name}: answer_len must be in (0, {self.text_len})")

  @property
  def image_tokens(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def text_len(self) -> int:
    return self.seq_len - self.image_tokens

  @property
  def llm_head_dim(self) -> int:
    return self.llm_width // self.llm_heads

  @property
  def image_token_id(self) -> int:
    """HF's image placeholder id; text tokens are drawn below it."""
    return self.vocab_size - 1


SPECS: dict[str, Spec] = {
  # Issue 7's "tiny": SigLIP 64 px / 8, 2 x 128 (MLP 512); Llama 4 x 256, 4 heads,
  # MLP 1024, vocab 1024; batch 8, sequence 128 of which 64 image tokens.
  "tiny": Spec(
    name="tiny",
    image_size=64,
    patch_size=8,
    vit_width=128,
    vit_depth=2,
    vit_mlp=512,
    vit_heads=2,
    llm_width=256,
    llm_depth=4,
    llm_heads=4,
    llm_mlp=1024,
    vocab_size=1024,
    batch_size=8,
    seq_len=128,
    answer_len=16,
  ),
  # Issue 7's "small": SigLIP 128 px / 8, 4 x 256; Llama 4 x 512, 8 heads, MLP 2048,
  # vocab 4096; batch 8, sequence 512 of which 256 image tokens.
  "small": Spec(
    name="small",
    image_size=128,
    patch_size=8,
    vit_width=256,
    vit_depth=4,
    vit_mlp=1024,
    vit_heads=4,
    llm_width=512,
    llm_depth=4,
    llm_heads=8,
    llm_mlp=2048,
    vocab_size=4096,
    batch_size=8,
    seq_len=512,
    answer_len=64,
  ),
}


def get_spec(name: str) -> Spec:
  if name not in SPECS:
    raise ValueError(f"Unknown benchmark spec {name!r}; known: {sorted(SPECS)}")
  return SPECS[name]


# --- compact_jax side --------------------------------------------------------------------


def jax_variants(spec: Spec):
  """(ViTVariant, LLMVariant) of the spec; the LM has the LLaMA family's knobs."""
  from compact_jax.models import llm, siglip

  vit = siglip.ViTVariant(
    spec.vit_width, spec.vit_depth, spec.vit_mlp, spec.vit_heads, spec.patch_size
  )
  # smoke_llama carries the LLaMA knobs (plain RMSNorm, SwiGLU, untied head, no
  # embedding scale, eps 1e-5); only the sizes change.
  lm = dataclasses.replace(
    llm.VARIANTS["smoke_llama"],
    width=spec.llm_width,
    depth=spec.llm_depth,
    num_heads=spec.llm_heads,
    num_kv_heads=spec.llm_heads,
    head_dim=spec.llm_head_dim,
    mlp_dim=spec.llm_mlp,
    vocab_size=spec.vocab_size,
  )
  return vit, lm


def jax_config(spec: Spec, *, scan_layers: bool = False):
  """The ``configs/base.py`` config that trains the spec's model with LoRA (one device)."""
  from configs import base

  c = base.get_config()
  vit, lm = jax_variants(spec)
  # The variant keys hold strings in the base config; a spec's sizes are not in the
  # variant tables, and VLM accepts variant objects, so the fields are replaced.
  del c.model["vit_variant"]
  del c.model["llm_variant"]
  c.model.vit_variant = vit
  c.model.llm_variant = lm
  c.model.connector = "mlp2x_gelu"  # LLaVA-1.5's projector, HF's LlavaMultiModalProjector
  # HF's vision_feature_layer=-1 reads the last block's output; both sides run every block.
  c.model.vit_output_layer = -1
  # Four layers run unrolled by default, as configs/tiny_world.py runs them: on XLA:CPU a
  # scanned stack pays dynamic slices of the stacked weights and residuals in every layer
  # (``--scan_layers`` in the compare scripts measures it). Real models keep scan.
  c.model.scan_layers = scan_layers
  c.model.lora.targets = JAX_TARGETS
  c.model.lora.rank = LORA_RANK
  c.model.lora.alpha = LORA_ALPHA
  c.data.image_size = spec.image_size
  c.train.batch_size = spec.batch_size
  c.train.lr = LR
  c.train.warmup_steps = 0
  c.train.end_lr_fraction = 1.0
  c.train.b1, c.train.b2 = BETAS
  c.train.weight_decay = WEIGHT_DECAY
  c.train.grad_clip_norm = GRAD_CLIP
  c.train.param_groups = ((base.LORA_TRAINABLE, 1.0), (base.NOT_LORA, None))
  c.mesh = (("data", 1), ("fsdp", 1), ("tensor", 1))
  c.compilation_cache_dir = ""  # compile time is measured, not cached
  return c


# --- Hugging Face side (plain dicts; torch_peer.py builds the model) ---------------------


def hf_config_kwargs(spec: Spec) -> dict[str, dict]:
  """Keyword arguments of ``SiglipVisionConfig``, ``LlamaConfig`` and ``LlavaConfig``."""
  vision = dict(
    hidden_size=spec.vit_width,
    intermediate_size=spec.vit_mlp,
    num_hidden_layers=spec.vit_depth,
    num_attention_heads=spec.vit_heads,
    image_size=spec.image_size,
    patch_size=spec.patch_size,
    # LLaVA reads per-patch features; SigLIP's pooling head would be dead weight.
    vision_use_head=False,
  )
  text = dict(
    hidden_size=spec.llm_width,
    intermediate_size=spec.llm_mlp,
    num_hidden_layers=spec.llm_depth,
    num_attention_heads=spec.llm_heads,
    num_key_value_heads=spec.llm_heads,
    vocab_size=spec.vocab_size,
    max_position_embeddings=max(2048, 2 * spec.seq_len),
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
  )
  llava = dict(
    image_token_index=spec.image_token_id,
    image_seq_length=spec.image_tokens,
    projector_hidden_act="gelu",
    # SigLIP has no CLS token: "default" would drop the first patch.
    vision_feature_select_strategy="full",
    vision_feature_layer=-1,
    tie_word_embeddings=False,
  )
  return {"vision": vision, "text": text, "llava": llava}


# --- the shared batch ------------------------------------------------------------------


def make_batch(spec: Spec, seed: int = 0) -> dict[str, np.ndarray]:
  """The synthetic batch both sides train on (numpy).

  Returns:
    image float32[B, H, W, 3] in [-1, 1]; text int32[B, T] (T = text_len) below
    ``image_token_id``; answer bool[B, T], True on the last ``answer_len`` tokens.
  """
  rng = np.random.default_rng(seed)
  b, t = spec.batch_size, spec.text_len
  image = rng.uniform(-1, 1, (b, spec.image_size, spec.image_size, 3)).astype(np.float32)
  text = rng.integers(0, spec.image_token_id, (b, t), dtype=np.int32)
  answer = np.zeros((b, t), bool)
  answer[:, t - spec.answer_len :] = True
  return {"image": image, "text": text, "answer": answer}


def jax_batch(spec: Spec, seed: int = 0) -> dict[str, np.ndarray]:
  """``make_batch`` in compact_jax's batch layout (``train/step.BATCH_KEYS``).

  Text is causal throughout (mask_ar 1), as in LLaVA, after the image prefix.
  """
  raw = make_batch(spec, seed)
  b, t = raw["text"].shape
  return {
    "image": raw["image"],
    "has_image": np.ones((b,), bool),
    "tokens": raw["text"],
    "mask_ar": np.ones((b, t), np.int32),
    "mask_loss": raw["answer"].astype(np.int32),
    "mask_input": np.ones((b, t), bool),
  }


# --- counts and FLOPs, in closed form -------------------------------------------------


def vit_param_count(spec: Spec) -> int:
  """SigLIP tower without pooling head: patch conv, positions, blocks, final LayerNorm."""
  d, f, p = spec.vit_width, spec.vit_mlp, spec.patch_size
  block = 4 * (d * d + d) + (d * f + f) + (f * d + d) + 2 * 2 * d
  return (p * p * 3 * d + d) + spec.image_tokens * d + spec.vit_depth * block + 2 * d


def connector_param_count(spec: Spec) -> int:
  dv, dl = spec.vit_width, spec.llm_width
  return (dv * dl + dl) + (dl * dl + dl)


def llm_param_count(spec: Spec) -> int:
  """LLaMA decoder: embeddings, untied head, 4 attention + 3 MLP linears, 2 norms/layer."""
  d, f, v = spec.llm_width, spec.llm_mlp, spec.vocab_size
  layer = 4 * d * d + 3 * d * f + 2 * d
  return 2 * v * d + spec.llm_depth * layer + d


def param_count(spec: Spec) -> int:
  return vit_param_count(spec) + connector_param_count(spec) + llm_param_count(spec)


def lora_shapes(spec: Spec) -> dict[str, tuple[int, int]]:
  """peft's adapters per layer: module -> (I, O) of ``A[I, r]``, ``B[r, O]``."""
  d, f = spec.llm_width, spec.llm_mlp
  attn = {m: (d, d) for m in ("q_proj", "k_proj", "v_proj", "o_proj")}
  return attn | {"gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}


def lora_param_count(spec: Spec) -> int:
  """Trainable parameters of peft's LoRA on ``PEFT_TARGETS``."""
  per_layer = sum(LORA_RANK * (i + o) for i, o in lora_shapes(spec).values())
  return spec.llm_depth * per_layer


@dataclasses.dataclass(frozen=True)
class Flops:
  """Model FLOPs of one train step, by part (see the module docstring)."""

  vit: float
  connector: float
  llm_linear: float
  llm_attention: float
  lm_head: float
  lora: float

  @property
  def total(self) -> float:
    return (
      self.vit + self.connector + self.llm_linear + self.llm_attention + self.lm_head + self.lora
    )


FLOP_FORMULA = (
  "2N/token forward-only (frozen ViT + connector), 4N/token frozen LM linears and LM head"
  " (gradients pass through), 6*r*(I+O)/token LoRA, attention 4*S^2*width per layer"
  " (x3 in the LM, x1 in the ViT); no elementwise"
)


def model_flops(spec: Spec) -> Flops:
  """FLOPs of one train step on the spec's batch by the issue's rule."""
  b, p, s = spec.batch_size, spec.image_tokens, spec.seq_len
  dv, fv = spec.vit_width, spec.vit_mlp
  vit_matmul = (spec.patch_size**2 * 3 * dv) + spec.vit_depth * (4 * dv * dv + 2 * dv * fv)
  vit = 2.0 * b * p * vit_matmul + spec.vit_depth * b * 4.0 * p * p * dv
  conn = 2.0 * b * p * (spec.vit_width * spec.llm_width + spec.llm_width**2)
  d, f = spec.llm_width, spec.llm_mlp
  llm_linear = 4.0 * b * s * spec.llm_depth * (4 * d * d + 3 * d * f)
  llm_attention = 3.0 * spec.llm_depth * b * 4.0 * s * s * d
  lm_head = 4.0 * b * s * spec.vocab_size * d
  lora = 6.0 * b * s * lora_param_count(spec)
  return Flops(vit, conn, llm_linear, llm_attention, lm_head, lora)
