"""Declarative converter tables: (HF name template -> our param path, transform).

A ``Rule`` pairs one Hugging Face tensor name template (``{i}`` is the layer
index) with one of our '/'-joined per-layer param paths (``layers_{i}/...``,
``encoderblock_{i}/...``), an optional ``slot`` (the index along a leading
stacking axis of ours: k/v in ``kv_einsum``, gate/up in ``gating_einsum``) and
a ``Transform`` (a pure transpose/reshape pair, HF layout <-> ours). A
``Section`` puts a list of rules under a prefix on each side; its
``hf_prefixes`` lists every accepted spelling (legacy and current
transformers), the first being the one written on export.

Einsum letters: N heads, K kv heads, H head dim, D model dim, F mlp dim,
P patch side, V vocab.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import numpy as np

from compact_jax.models import llm, siglip

Array = np.ndarray


@dataclasses.dataclass(frozen=True)
class Transform:
  """``to_ours(hf_array) -> ours`` and its inverse ``to_hf``."""

  name: str
  to_ours: Callable[[Array], Array]
  to_hf: Callable[[Array], Array]


IDENTITY = Transform("identity", lambda x: x, lambda y: y)
TRANSPOSE = Transform("transpose", lambda x: x.T, lambda y: y.T)


def heads_in(n: int, h: int) -> Transform:
  """torch Linear ``weight[n*H, D]`` -> ours ``[n, D, H]`` (q_einsum, kv_einsum[j])."""
  return Transform(
    f"heads_in({n},{h})",
    lambda x: x.reshape(n, h, -1).transpose(0, 2, 1),
    lambda y: y.transpose(0, 2, 1).reshape(n * h, -1),
  )


def heads_out(n: int, h: int) -> Transform:
  """torch Linear ``o_proj.weight[D, N*H]`` -> ours ``attn_vec_einsum [N, H, D]``."""
  return Transform(
    f"heads_out({n},{h})",
    lambda x: x.reshape(-1, n, h).transpose(1, 2, 0),
    lambda y: y.transpose(2, 0, 1).reshape(-1, n * h),
  )


def head_bias(n: int, h: int) -> Transform:
  """bias ``[n*H]`` -> ``[n, H]``."""
  return Transform(f"head_bias({n},{h})", lambda x: x.reshape(n, h), lambda y: y.reshape(n * h))


def vit_heads_in(n: int, h: int) -> Transform:
  """torch Linear ``weight[N*H, D]`` -> big_vision ``query/kernel [D, N, H]``."""
  return Transform(
    f"vit_heads_in({n},{h})", lambda x: x.T.reshape(-1, n, h), lambda y: y.reshape(y.shape[0], -1).T
  )


def vit_heads_out(n: int, h: int) -> Transform:
  """torch Linear ``out_proj.weight[D, N*H]`` -> big_vision ``out/kernel [N, H, D]``."""
  return Transform(
    f"vit_heads_out({n},{h})", lambda x: x.T.reshape(n, h, -1), lambda y: y.reshape(n * h, -1).T
  )


# torch conv weight [D, C, P, P] (OIHW) <-> big_vision HWIO [P, P, C, D].
PATCH = Transform("patch", lambda x: x.transpose(2, 3, 1, 0), lambda y: y.transpose(3, 2, 0, 1))
# HF position_embedding.weight [N, D] <-> big_vision pos_embedding [1, N, D].
POSEMB = Transform("posemb", lambda x: x[None], lambda y: y[0])


@dataclasses.dataclass(frozen=True)
class Rule:
  """One HF tensor (or one of ``part[1]`` equal chunks of it along axis 0,
  chunk ``part[0]``: torch's fused ``in_proj``) <-> one of our params (or its
  ``slot`` along our leading axis)."""

  hf: str
  ours: str
  transform: Transform = IDENTITY
  slot: int | None = None
  part: tuple[int, int] | None = None


@dataclasses.dataclass(frozen=True)
class Section:
  """Rules under a prefix. ``hf_prefixes[0]`` is written on export."""

  hf_prefixes: tuple[str, ...]
  ours_prefix: str
  rules: tuple[Rule, ...]

  def compiled(self) -> list[tuple[re.Pattern, Rule]]:
    """One regex per rule, accepting any of ``hf_prefixes``."""
    prefixes = "|".join(re.escape(p) for p in self.hf_prefixes)
    out = []
    for rule in self.rules:
      body = re.escape(rule.hf).replace(r"\{i\}", r"(?P<i>\d+)")
      out.append((re.compile(rf"^(?:{prefixes}){body}$"), rule))
    return out


# --- decoder LMs ------------------------------------------------------------------------

FAMILIES = ("gemma", "gemma2", "llama", "qwen2")


def llm_rules(family: str, v: llm.LLMVariant) -> tuple[Rule, ...]:
  """The HF ``*ForCausalLM`` body (under ``model.``) for ``family``."""
  if family not in FAMILIES:
    raise ValueError(f"Unknown LLM family {family!r}; known: {FAMILIES}")
  n, k, h = v.num_heads, v.num_kv_heads, v.head_dim
  layer = "layers.{i}."
  ours = "layers_{i}/"
  rules = [
    Rule("embed_tokens.weight", "embedder/input_embedding"),
    Rule("norm.weight", "final_norm/scale"),
    Rule(layer + "input_layernorm.weight", ours + "pre_attention_norm/scale"),
    Rule(layer + "self_attn.q_proj.weight", ours + "attn/q_einsum/w", heads_in(n, h)),
    Rule(layer + "self_attn.k_proj.weight", ours + "attn/kv_einsum/w", heads_in(k, h), 0),
    Rule(layer + "self_attn.v_proj.weight", ours + "attn/kv_einsum/w", heads_in(k, h), 1),
    Rule(layer + "self_attn.o_proj.weight", ours + "attn/attn_vec_einsum/w", heads_out(n, h)),
    Rule(layer + "mlp.gate_proj.weight", ours + "mlp/gating_einsum", TRANSPOSE, 0),
    Rule(layer + "mlp.up_proj.weight", ours + "mlp/gating_einsum", TRANSPOSE, 1),
    Rule(layer + "mlp.down_proj.weight", ours + "mlp/linear", TRANSPOSE),
  ]
  if family == "gemma2":
    # The trap: HF Gemma2's post_attention_layernorm is a *post*-norm.
    rules += [
      Rule(layer + "post_attention_layernorm.weight", ours + "post_attention_norm/scale"),
      Rule(layer + "pre_feedforward_layernorm.weight", ours + "pre_ffw_norm/scale"),
      Rule(layer + "post_feedforward_layernorm.weight", ours + "post_ffw_norm/scale"),
    ]
  else:
    rules.append(Rule(layer + "post_attention_layernorm.weight", ours + "pre_ffw_norm/scale"))
  if v.qkv_bias:
    rules += [
      Rule(layer + "self_attn.q_proj.bias", ours + "attn/q_einsum/b", head_bias(n, h)),
      Rule(layer + "self_attn.k_proj.bias", ours + "attn/kv_einsum/b", head_bias(k, h), 0),
      Rule(layer + "self_attn.v_proj.bias", ours + "attn/kv_einsum/b", head_bias(k, h), 1),
    ]
  return tuple(rules)


def causal_lm_sections(family: str, v: llm.LLMVariant, ours_prefix: str = "") -> list[Section]:
  """``GemmaForCausalLM`` / ``Gemma2ForCausalLM`` / ``LlamaForCausalLM`` / ``Qwen2ForCausalLM``."""
  sections = [Section(("model.",), ours_prefix, llm_rules(family, v))]
  if not v.tie_embeddings:
    sections.append(
      Section(("",), ours_prefix, (Rule("lm_head.weight", "embedder/output_embedding"),))
    )
  return sections


# --- SigLIP and CLIP vision towers ------------------------------------------------------


def _encoder_rules(v: siglip.ViTVariant) -> list[Rule]:
  """The blocks under ``encoder.layers.{i}.``: the same names in SigLIP and CLIP."""
  n, h = v.num_heads, v.head_dim
  layer = "encoder.layers.{i}."
  ours = "Transformer/encoderblock_{i}/"
  att = ours + "MultiHeadDotProductAttention_0/"
  rules = []
  for hf_ln, ours_ln in (("layer_norm1", "LayerNorm_0"), ("layer_norm2", "LayerNorm_1")):
    rules.append(Rule(f"{layer}{hf_ln}.weight", f"{ours}{ours_ln}/scale"))
    rules.append(Rule(f"{layer}{hf_ln}.bias", f"{ours}{ours_ln}/bias"))
  for hf_p, ours_p in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
    rules.append(
      Rule(f"{layer}self_attn.{hf_p}.weight", f"{att}{ours_p}/kernel", vit_heads_in(n, h))
    )
    rules.append(Rule(f"{layer}self_attn.{hf_p}.bias", f"{att}{ours_p}/bias", head_bias(n, h)))
  rules.append(Rule(f"{layer}self_attn.out_proj.weight", f"{att}out/kernel", vit_heads_out(n, h)))
  rules.append(Rule(f"{layer}self_attn.out_proj.bias", f"{att}out/bias"))
  for hf_fc, ours_d in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
    rules.append(Rule(f"{layer}mlp.{hf_fc}.weight", f"{ours}MlpBlock_0/{ours_d}/kernel", TRANSPOSE))
    rules.append(Rule(f"{layer}mlp.{hf_fc}.bias", f"{ours}MlpBlock_0/{ours_d}/bias"))
  return rules


def siglip_rules(v: siglip.ViTVariant) -> tuple[Rule, ...]:
  """HF ``SiglipVisionModel`` body (under ``vision_model.``) -> big_vision ``img/`` names."""
  if v.family != "siglip":
    raise ValueError(f"siglip_rules: {v} is a {v.family} variant")
  rules = [
    Rule("embeddings.patch_embedding.weight", "embedding/kernel", PATCH),
    Rule("embeddings.patch_embedding.bias", "embedding/bias"),
    Rule("embeddings.position_embedding.weight", "pos_embedding", POSEMB),
    Rule("post_layernorm.weight", "Transformer/encoder_norm/scale"),
    Rule("post_layernorm.bias", "Transformer/encoder_norm/bias"),
  ]
  return tuple(rules + _encoder_rules(v))


# HF class_embedding [D] <-> big_vision cls [1, 1, D].
CLS = Transform("cls", lambda x: x.reshape(1, 1, -1), lambda y: y.reshape(-1))


def clip_rules(v: siglip.ViTVariant) -> tuple[Rule, ...]:
  """HF ``CLIPVisionModel`` body (under ``vision_model.``) -> our ``img/`` names.

  ``cls`` is big_vision's class-token name; ``pre_norm`` (HF ``pre_layrnorm``,
  sic) is ours, since big_vision's ViT has no pre-encoder norm. The position
  embedding ``[1 + N, D]`` keeps the class position first. CLIP's patch conv
  has no bias. ``post_layernorm`` is our ``encoder_norm`` (HF applies it to
  the pooled class token only; LayerNorm acts per token, so it is the same map).
  """
  if v.family != "clip":
    raise ValueError(f"clip_rules: {v} is not a CLIP (class-token) variant")
  rules = [
    Rule("embeddings.class_embedding", "cls", CLS),
    Rule("embeddings.patch_embedding.weight", "embedding/kernel", PATCH),
    Rule("embeddings.position_embedding.weight", "pos_embedding", POSEMB),
    Rule("pre_layrnorm.weight", "pre_norm/scale"),
    Rule("pre_layrnorm.bias", "pre_norm/bias"),
    Rule("post_layernorm.weight", "Transformer/encoder_norm/scale"),
    Rule("post_layernorm.bias", "Transformer/encoder_norm/bias"),
  ]
  return tuple(rules + _encoder_rules(v))


def vision_rules(v: siglip.ViTVariant) -> tuple[Rule, ...]:
  """``clip_rules`` or ``siglip_rules``, by the variant's family."""
  return clip_rules(v) if v.family == "clip" else siglip_rules(v)


def map_head_rules(v: siglip.ViTVariant) -> tuple[Rule, ...]:
  """HF ``head.*`` (``SiglipMultiheadAttentionPoolingHead``) -> big_vision ``MAPHead_0/``.

  torch's ``nn.MultiheadAttention`` fuses q, k, v into ``in_proj_{weight,bias}``
  ``[3*D, D]`` / ``[3*D]``; each of our projections is one third.
  """
  n, h = v.num_heads, v.head_dim
  att = "MAPHead_0/MultiHeadDotProductAttention_0/"
  rules = [Rule("head.probe", "MAPHead_0/probe")]
  for j, name in enumerate(("query", "key", "value")):
    rules.append(
      Rule("head.attention.in_proj_weight", f"{att}{name}/kernel", vit_heads_in(n, h), part=(j, 3))
    )
    rules.append(
      Rule("head.attention.in_proj_bias", f"{att}{name}/bias", head_bias(n, h), part=(j, 3))
    )
  rules += [
    Rule("head.attention.out_proj.weight", f"{att}out/kernel", vit_heads_out(n, h)),
    Rule("head.attention.out_proj.bias", f"{att}out/bias"),
    Rule("head.layernorm.weight", "MAPHead_0/LayerNorm_0/scale"),
    Rule("head.layernorm.bias", "MAPHead_0/LayerNorm_0/bias"),
    Rule("head.mlp.fc1.weight", "MAPHead_0/MlpBlock_0/Dense_0/kernel", TRANSPOSE),
    Rule("head.mlp.fc1.bias", "MAPHead_0/MlpBlock_0/Dense_0/bias"),
    Rule("head.mlp.fc2.weight", "MAPHead_0/MlpBlock_0/Dense_1/kernel", TRANSPOSE),
    Rule("head.mlp.fc2.bias", "MAPHead_0/MlpBlock_0/Dense_1/bias"),
  ]
  return tuple(rules)


# Skips the MAP head when importing into ViT(pool_type="none"), which is what VLMs use.
SIGLIP_HEAD = r"^(?:vision_model\.)?head\."
# A full HF ``CLIPModel`` (OpenAI's repos) also holds the text tower and both
# projections, and older files saved the ``position_ids`` buffer.
CLIP_IGNORE = (
  r"^(?:text_model\.|visual_projection\.|text_projection\.|logit_scale$)",
  r"embeddings\.position_ids$",
)


def siglip_sections(
  v: siglip.ViTVariant, ours_prefix: str = "", *, map_head: bool = False
) -> list[Section]:
  """``SiglipVisionModel``: saved files use ``vision_model.``; transformers 5 drops it in memory."""
  rules = siglip_rules(v) + (map_head_rules(v) if map_head else ())
  return [Section(("vision_model.", ""), ours_prefix, rules)]


def clip_sections(v: siglip.ViTVariant, ours_prefix: str = "") -> list[Section]:
  """``CLIPVisionModel`` (transformers 5 saves it without a prefix) or the
  ``vision_model.`` half of a ``CLIPModel`` (``CLIP_IGNORE`` skips the rest)."""
  return [Section(("", "vision_model."), ours_prefix, clip_rules(v))]


MLP2X = (
  Rule("linear_1.weight", "Dense_0/kernel", TRANSPOSE),
  Rule("linear_1.bias", "Dense_0/bias"),
  Rule("linear_2.weight", "Dense_1/kernel", TRANSPOSE),
  Rule("linear_2.bias", "Dense_1/bias"),
)


def llava_sections(vit: siglip.ViTVariant, family: str, v: llm.LLMVariant) -> list[Section]:
  """``LlavaForConditionalGeneration`` with a SigLIP or CLIP tower and the mlp2x projector.

  Both the legacy (``vision_tower.vision_model.``, ``language_model.model.``,
  ``language_model.lm_head``) and the transformers >= 4.52 in-memory names
  (``model.vision_tower.``, ``model.language_model.``, ``lm_head``) load, as
  does transformers 5's saved ``vision_tower.`` (no ``vision_model.``). Export
  writes the first spelling of each, which is what transformers 5 saves.
  """
  sections = [
    Section(
      (
        "vision_tower.",
        "vision_tower.vision_model.",
        "model.vision_tower.",
        "model.vision_tower.vision_model.",
      ),
      "img/",
      vision_rules(vit),
    ),
    Section(("multi_modal_projector.", "model.multi_modal_projector."), "connector/", MLP2X),
    Section(("language_model.model.", "model.language_model."), "llm/", llm_rules(family, v)),
  ]
  if not v.tie_embeddings:
    sections.append(
      Section(
        ("language_model.", ""), "llm/", (Rule("lm_head.weight", "embedder/output_embedding"),)
      )
    )
  return sections
