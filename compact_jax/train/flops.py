"""FLOPs of one train step of the VLM, and MFU.

The count is analytic, per matmul, from the model's shapes. A step is a forward
pass over ``B`` examples of ``S = N + T`` tokens (N image tokens after the
connector, T text tokens) and the backward pass the trainable parameters need.
With ``F`` a matmul's forward FLOPs (``2 · rows · |W|``; a multiply-add is two
FLOPs), its cost in one step is::

  F                            forward
  + F  if its weight is trained                          (weight gradient)
  + F  if anything before it in the forward is trained   (input gradient)

which is the usual rule made exact per matmul. Per token and per parameter N:
6·N for trained weights, 4·N for frozen weights that gradients pass through
(the frozen LM under LoRA, a frozen LM under a trained connector), 2·N for
forward-only towers (a frozen vision tower that no trainable parameter
precedes). The first trainable matmul of a chain costs 4·N, not 6·N: nothing
needs its input gradient. "Before" is forward order, with sibling projections
(q, k, v; gate and up) sharing a stage; within the first trainable layer that
ordering is a slight over-approximation of the true dataflow.

Attention (no weights): per layer and example, the score product ``Q·Kᵀ`` and
the value product ``P·V`` cost ``2·S²·N_h·H`` FLOPs each, so ``4·S²·N_h·H``
forward (N_h heads of width H; ViT: N_h·H = width, S = patches). We count the
full S x S square: the model computes masked dense attention (prefix-LM and
causal masks skip nothing). The backward of each product costs twice its
forward (both operands need gradients), so attention is x3 when gradients pass
through it and x1 in a forward-only tower. MaxText halves causal attention; we
do not, because this implementation does not skip the masked half.

Two totals, which differ only where the implementation does more than the
model needs:

- ``model``: the FLOPs the model needs (for MFU). The LM head counts only the T
  text positions.
- ``executed``: what this implementation computes without rematerialisation;
  compare it with XLA's ``cost_analysis()``. The LM head runs on all S
  positions (image positions' logits are computed, then dropped).

LoRA (both totals): ``models.project`` applies an adapter ``A[I, r]``,
``B[r, O]`` (one per slice of a fused weight) to the activations, ``x·A`` then
``·B``, forward ``2·r·I`` and ``2·r·O`` per token, and the same rule holds per
matmul: ``·B`` is x3 (its input ``x·A`` needs a gradient for A's), ``x·A`` x2,
x3 when something earlier is trained; so ``6·r·(I + O)`` per token, less
``2·r·I`` in the first trained stage. The frozen base weight counts as frozen.

Not counted (either total): elementwise work (norms, softmax, activations,
RoPE, the loss, the optimizer update), embedding gathers, and remat's
recomputed forward (XLA's count includes all three).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import ml_collections

from compact_jax.models import connectors as connectors_lib
from compact_jax.models import llm as llm_lib
from compact_jax.models import siglip

FORMULA = (
  "per matmul with forward F = 2*rows*|W|: F + F if W trained + F if anything earlier is trained"
  " (6N trained, 4N frozen-but-backpropagated, 2N forward-only); attention 4*S^2*heads*head_dim"
  " per layer forward over the full S x S square (x3 when gradients pass); LoRA on activations"
  " x.A (2*r*I/token, x2, x3 if earlier trained) then .B (2*r*O/token, x3); LM head on text"
  " positions; no remat, no elementwise"
)

# bf16 dense peak FLOP/s per chip (no sparsity). Sources: Google Cloud TPU v5e/v5p
# product pages as tabulated in /work/shared/reference/jax_api_and_performance.md §1.1
# (v5e 197e12, v5p 459e12; MaxText's published MFU tables are consistent with both:
# 132 TF/s = 66.9% on v5e, 328 TF/s = 71.5% on v5p); NVIDIA's H100 SXM datasheet,
# 989e12 dense bf16 (1979e12 is the 2:4-sparse figure). A100 312e12 (datasheet).
PEAK_FLOPS: dict[str, float] = {
  "tpu_v5e": 197e12,
  "tpu_v5p": 459e12,
  "h100_sxm": 989e12,
  "a100": 312e12,
}
# HBM per chip, bytes: XLA's GetDeviceMemoryInBytes (openxla/xla, xla/python/ifrt/ir)
# gives v5e 16 GiB and v5p 95 GiB; H100 SXM and A100-80GB are 80 GB parts (datasheets).
HBM_BYTES: dict[str, int] = {
  "tpu_v5e": 16 * 2**30,
  "tpu_v5p": 95 * 2**30,
  "h100_sxm": 80 * 10**9,
  "a100": 80 * 10**9,
}
# jax ``Device.device_kind`` -> PEAK_FLOPS key. The TPU strings are the ones JAX's
# own Pallas TPU-info test expects ("TPU v5 lite" is v5e, "TPU v5" is v5p); the
# GPU strings are what nvidia-smi reports. Unverified here (no accelerator).
DEVICE_KINDS: dict[str, str] = {
  "TPU v5 lite": "tpu_v5e",
  "TPU v5e": "tpu_v5e",
  "TPU v5": "tpu_v5p",
  "TPU v5p": "tpu_v5p",
  "NVIDIA H100 80GB HBM3": "h100_sxm",
  "NVIDIA A100-SXM4-80GB": "a100",
}


def mfu(flops_per_step: float, step_seconds: float, peak_flops: float) -> float:
  """Model FLOPs utilisation: ``flops_per_step / step_seconds / peak_flops``.

  ``peak_flops`` is the aggregate peak of every chip the step runs on, e.g.
  ``PEAK_FLOPS["tpu_v5e"] * jax.device_count()``.
  """
  if step_seconds <= 0 or peak_flops <= 0:
    raise ValueError(
      f"mfu needs positive step_seconds and peak_flops, got {step_seconds}, {peak_flops}"
    )
  return flops_per_step / step_seconds / peak_flops


def chip_name(device_kind: str) -> str | None:
  """The ``PEAK_FLOPS`` key for a jax ``device_kind``, or None if unknown (CPU)."""
  return DEVICE_KINDS.get(device_kind)


@dataclasses.dataclass(frozen=True)
class Site:
  """One matmul of the forward pass, or a parameter read without a matmul.

  Attributes:
    name: for the breakdown, e.g. ``llm/layers_3/attn/q``.
    part: "img", "connector" or "llm".
    stage: forward order; siblings (q, k, v) share a stage.
    flops: forward FLOPs for the global batch (0 for parameter-only sites).
    weight: the matmul's weight path, whose gradient costs ``flops`` when it
      is trained (None for attention products and parameter-only sites).
    params: every parameter path the site reads (weight, bias, norm scale...).
    operands: activation operands that need a gradient when something earlier
      is trained (2 for attention's products, 1 for a projection, 0 for the
      patch embedding, whose input is the image).
  """

  name: str
  part: str
  stage: int
  flops: float
  weight: str | None = None
  params: tuple[str, ...] = ()
  operands: int = 1


@dataclasses.dataclass(frozen=True)
class StepFlops:
  """FLOPs of one train step for the global batch (see the module docstring).

  Attributes:
    model: what the model needs (MFU numerator).
    executed: what this implementation computes without remat (compare with
      XLA's cost analysis of the step).
    forward: the executed forward pass alone.
    by_part: model FLOPs per part ("img", "connector", "llm", "llm_attention",
      "lora").
    text_tokens: B·T, for per-token rates.
    formula: the counting rule, for logs.
  """

  model: float
  executed: float
  forward: float
  by_part: dict[str, float]
  text_tokens: int
  formula: str = FORMULA


# The stage of parameters the forward never reads (the ViT blocks after LLaVA's
# feature layer): they take no part in the ordering.
UNUSED = 0


class _Stages:
  """Hands out increasing stage numbers."""

  def __init__(self):
    self.n = 0

  def next(self) -> int:
    self.n += 1
    return self.n


def _vit_sites(
  v: siglip.ViTVariant, *, image_size: int, output_layer: int, scan: bool, batch: int, st: _Stages
) -> list[Site]:
  patches = (image_size // v.patch_size) ** 2
  # A class token (CLIP) is one more row through every block, but not through the conv.
  p = patches + int(v.class_token)
  rows = batch * p
  d, f = v.width, v.mlp_dim
  stem = ("img/embedding/kernel", "img/pos_embedding")
  stem += ("img/embedding/bias",) * v.patch_bias + ("img/cls",) * v.class_token
  stem += ("img/pre_norm/scale", "img/pre_norm/bias") * v.pre_norm
  sites = [
    Site(
      "img/embedding",
      "img",
      st.next(),
      2.0 * batch * patches * v.patch_size**2 * 3 * d,
      "img/embedding/kernel",
      stem,
      operands=0,
    )
  ]
  num_run = v.depth + 1 + output_layer
  for i in range(v.depth):
    blk = "img/Transformer/encoderblock" + ("" if scan else f"_{i}")
    run = i < num_run
    attn = f"{blk}/MultiHeadDotProductAttention_0"
    mlp = f"{blk}/MlpBlock_0"
    name = f"img/block_{i}"
    if not run:
      # LLaVA's penultimate-layer features: the last blocks are never run.
      if not scan:
        unused = [
          f"{blk}/{m}/{k}"
          for m in (
            "LayerNorm_0",
            "LayerNorm_1",
            *(f"MultiHeadDotProductAttention_0/{x}" for x in ("query", "key", "value", "out")),
            "MlpBlock_0/Dense_0",
            "MlpBlock_0/Dense_1",
          )
          for k in (("scale", "bias") if m.startswith("LayerNorm") else ("kernel", "bias"))
        ]
        sites.append(Site(f"{name}/unused", "img", UNUSED, 0.0, params=tuple(unused)))
      continue
    ln0 = st.next()
    sites.append(
      Site(
        f"{name}/ln0",
        "img",
        ln0,
        0.0,
        params=(f"{blk}/LayerNorm_0/scale", f"{blk}/LayerNorm_0/bias"),
      )
    )
    qkv = st.next()
    for x in ("query", "key", "value"):
      w = f"{attn}/{x}/kernel"
      sites.append(Site(f"{name}/{x}", "img", qkv, 2.0 * rows * d * d, w, (w, f"{attn}/{x}/bias")))
    sites.append(Site(f"{name}/scores", "img", st.next(), 2.0 * batch * p * p * d, operands=2))
    sites.append(Site(f"{name}/values", "img", st.next(), 2.0 * batch * p * p * d, operands=2))
    w = f"{attn}/out/kernel"
    sites.append(
      Site(f"{name}/out", "img", st.next(), 2.0 * rows * d * d, w, (w, f"{attn}/out/bias"))
    )
    sites.append(
      Site(
        f"{name}/ln1",
        "img",
        st.next(),
        0.0,
        params=(f"{blk}/LayerNorm_1/scale", f"{blk}/LayerNorm_1/bias"),
      )
    )
    for j, (i_dim, o_dim) in enumerate(((d, f), (f, d))):
      w = f"{mlp}/Dense_{j}/kernel"
      sites.append(
        Site(
          f"{name}/mlp{j}",
          "img",
          st.next(),
          2.0 * rows * i_dim * o_dim,
          w,
          (w, f"{mlp}/Dense_{j}/bias"),
        )
      )
  # encoder_norm is applied only to the last layer's output (output_layer == -1);
  # its params exist either way.
  norm = ("img/Transformer/encoder_norm/scale", "img/Transformer/encoder_norm/bias")
  stage = st.next() if output_layer == -1 else UNUSED
  sites.append(Site("img/encoder_norm", "img", stage, 0.0, params=norm))
  return sites


def _dense(name: str, part: str, stage: int, rows: float, din: int, dout: int, prefix: str) -> Site:
  w = f"{prefix}/kernel"
  return Site(name, part, stage, 2.0 * rows * din * dout, w, (w, f"{prefix}/bias"))


def _connector_sites(
  name: str, d_vit: int, d_llm: int, *, grid: int, batch: int, st: _Stages
) -> list[Site]:
  """The connector's matmuls (see ``models.connectors``) for ``batch`` images."""
  rows = batch * grid * grid
  if name == "linear":
    return [_dense("img/head", "connector", st.next(), rows, d_vit, d_llm, "img/head")]
  if name == "mlp2x_gelu":
    return [
      _dense("connector/dense0", "connector", st.next(), rows, d_vit, d_llm, "connector/Dense_0"),
      _dense("connector/dense1", "connector", st.next(), rows, d_llm, d_llm, "connector/Dense_1"),
    ]
  if name == "pixel_shuffle_mlp":
    r2 = connectors_lib.PIXEL_SHUFFLE_FACTOR**2
    rows //= r2
    ln = ("connector/LayerNorm_0/scale", "connector/LayerNorm_0/bias")
    return [
      Site("connector/ln", "connector", st.next(), 0.0, params=ln),
      _dense(
        "connector/dense0", "connector", st.next(), rows, r2 * d_vit, d_llm, "connector/Dense_0"
      ),
      _dense("connector/dense1", "connector", st.next(), rows, d_llm, d_llm, "connector/Dense_1"),
    ]
  if name in ("resampler", "resampler_nopos"):
    q = connectors_lib.RESAMPLER_QUERIES
    qrows, d = batch * q, d_llm
    ln = lambda n: (f"connector/{n}/scale", f"connector/{n}/bias")  # noqa: E731
    proj = st.next()
    sites = [
      _dense("connector/kv_proj", "connector", proj, rows, d_vit, d, "connector/kv_proj"),
      Site("connector/query", "connector", proj, 0.0, params=("connector/query", *ln("ln_q"))),
      Site("connector/ln_kv", "connector", st.next(), 0.0, params=ln("ln_kv")),
    ]
    qkv = st.next()
    sites += [
      _dense("connector/attn_query", "connector", qkv, qrows, d, d, "connector/attn_query"),
      _dense("connector/attn_key", "connector", qkv, rows, d, d, "connector/attn_key"),
      _dense("connector/attn_value", "connector", qkv, rows, d, d, "connector/attn_value"),
      Site("connector/scores", "connector", st.next(), 2.0 * qrows * grid * grid * d, operands=2),
      Site("connector/values", "connector", st.next(), 2.0 * qrows * grid * grid * d, operands=2),
      _dense("connector/attn_out", "connector", st.next(), qrows, d, d, "connector/attn_out"),
      Site("connector/ln_post", "connector", st.next(), 0.0, params=ln("ln_post")),
      _dense("connector/proj", "connector", st.next(), qrows, d, d, "connector/proj"),
    ]
    return sites
  raise ValueError(f"flops: no FLOP count for connector {name!r}; add it to train/flops.py")


def _scales(prefix: str, *norms: str) -> tuple[str, ...]:
  return tuple(f"{prefix}/{n}/scale" for n in norms)


def _llm_sites(
  v: llm_lib.LLMVariant,
  *,
  vocab_size: int,
  scan: bool,
  batch: int,
  seq: int,
  head_rows: int,
  st: _Stages,
) -> list[Site]:
  rows = batch * seq
  d, n, k, h, f = v.width, v.num_heads, v.num_kv_heads, v.head_dim, v.mlp_dim
  emb = "llm/embedder/input_embedding"
  sites = [Site("llm/embed", "llm", st.next(), 0.0, params=(emb,))]
  for i in range(v.depth):
    lyr = "llm/layers" + ("" if scan else f"_{i}")
    name = f"llm/layer_{i}"
    sites.append(
      Site(f"{name}/norm0", "llm", st.next(), 0.0, params=_scales(lyr, "pre_attention_norm"))
    )
    qkv = st.next()
    bias = lambda w: (f"{w[:-2]}/b",) if v.qkv_bias else ()  # noqa: E731
    for x, width in (("q_einsum", n * h), ("kv_einsum", 2 * k * h)):
      w = f"{lyr}/attn/{x}/w"
      sites.append(Site(f"{name}/{x}", "llm", qkv, 2.0 * rows * d * width, w, (w, *bias(w))))
    att = 2.0 * batch * seq * seq * n * h
    sites.append(Site(f"{name}/scores", "llm_attention", st.next(), att, operands=2))
    sites.append(Site(f"{name}/values", "llm_attention", st.next(), att, operands=2))
    w = f"{lyr}/attn/attn_vec_einsum/w"
    sites.append(Site(f"{name}/attn_out", "llm", st.next(), 2.0 * rows * n * h * d, w, (w,)))
    ffw = ("post_attention_norm", "pre_ffw_norm") if v.post_norms else ("pre_ffw_norm",)
    sites.append(Site(f"{name}/norm1", "llm", st.next(), 0.0, params=_scales(lyr, *ffw)))
    w = f"{lyr}/mlp/gating_einsum"
    sites.append(Site(f"{name}/gating", "llm", st.next(), 2.0 * rows * d * 2 * f, w, (w,)))
    w = f"{lyr}/mlp/linear"
    sites.append(Site(f"{name}/linear", "llm", st.next(), 2.0 * rows * f * d, w, (w,)))
    if v.post_norms:
      sites.append(
        Site(f"{name}/norm2", "llm", st.next(), 0.0, params=_scales(lyr, "post_ffw_norm"))
      )
  sites.append(Site("llm/final_norm", "llm", st.next(), 0.0, params=("llm/final_norm/scale",)))
  head = emb if v.tie_embeddings else "llm/embedder/output_embedding"
  head_params = () if v.tie_embeddings else (head,)
  sites.append(
    Site("llm/head", "llm", st.next(), 2.0 * batch * head_rows * d * vocab_size, head, head_params)
  )
  return sites


def vlm_sites(
  model_cfg: ml_collections.ConfigDict,
  *,
  vocab_size: int,
  image_size: int,
  batch_size: int,
  seq_len: int,
  head_on_text_only: bool = False,
) -> tuple[list[Site], int]:
  """The VLM's matmul sites in forward order, and its image token count.

  ``model_cfg`` is ``config.model``; ``seq_len`` is the text length T.
  """
  vit = siglip.decode_variant(model_cfg.vit_variant)
  lm = llm_lib.decode_variant(model_cfg.llm_variant)
  spec = connectors_lib.get_connector(model_cfg.connector)
  grid = image_size // vit.patch_size
  num_image = spec.num_tokens(grid)
  st = _Stages()
  sites = _vit_sites(
    vit,
    image_size=image_size,
    output_layer=model_cfg.vit_output_layer,
    scan=model_cfg.scan_layers,
    batch=batch_size,
    st=st,
  )
  sites += _connector_sites(
    model_cfg.connector, vit.width, lm.width, grid=grid, batch=batch_size, st=st
  )
  seq = num_image + seq_len
  sites += _llm_sites(
    lm,
    vocab_size=vocab_size,
    scan=model_cfg.scan_layers,
    batch=batch_size,
    seq=seq,
    head_rows=seq_len if head_on_text_only else seq,
    st=st,
  )
  return sites, num_image


def _adapters(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, int, int]]:
  """Adapted weight path -> (I, r, O) of one slice's adapter, from its
  ``_lora_a`` ``[..., I, r]`` / ``_lora_b`` ``[..., r, O]`` shapes (leading dims:
  scanned layers, slices of a fused weight)."""
  out = {}
  for name in shapes:
    if name.endswith("_lora_a"):
      base = name[: -len("_lora_a")]
      a, b = shapes[name], shapes[base + "_lora_b"]
      out[base] = (a[-2], a[-1], b[-1])
  return out


def _check_coverage(
  sites: list[Site], shapes: Mapping[str, tuple[int, ...]], adapted: Mapping
) -> None:
  counted = {p for s in sites for p in s.params}
  counted |= {s.weight for s in sites if s.weight}
  counted |= {w + sfx for w in adapted for sfx in ("_lora_a", "_lora_b")}
  missing = sorted(counted - set(shapes))
  unknown = sorted(set(shapes) - counted)
  if missing or unknown:
    raise ValueError(
      "flops: the FLOP model and the parameters disagree (update compact_jax/train/flops.py): "
      f"counted but absent {missing[:5]}, present but not counted {unknown[:5]}"
    )


def _reads_trained(site: Site, trainable: Mapping[str, bool], lora_trained: set[str]) -> bool:
  return site.weight in lora_trained or any(trainable[p] for p in site.params)


def count_step_flops(
  sites: list[Site],
  *,
  shapes: Mapping[str, tuple[int, ...]],
  trainable: Mapping[str, bool],
  text_tokens: int,
) -> StepFlops:
  """Applies the counting rule (module docstring) to ``sites``.

  Args:
    sites: from ``vlm_sites``, in forward order.
    shapes: '/'-path -> shape of every parameter, LoRA adapters included.
    trainable: '/'-path -> whether the parameter is trained.
    text_tokens: B·T.
  """
  adapted = _adapters(shapes)
  _check_coverage(sites, shapes, adapted)
  lora_trained = {w for w in adapted if trainable[w + "_lora_a"] or trainable[w + "_lora_b"]}
  by_stage: dict[int, list[Site]] = {}
  for s in sites:
    if s.stage != UNUSED:
      by_stage.setdefault(s.stage, []).append(s)
  model = executed = forward = 0.0
  by_part: dict[str, float] = {}
  earlier_trained = False
  for stage in sorted(by_stage):
    group = by_stage[stage]
    for s in group:
      w_trained = s.weight is not None and trainable[s.weight]
      dx = s.operands * s.flops if earlier_trained else 0.0
      cost = s.flops + dx + (s.flops if w_trained else 0.0)
      lora = 0.0
      if s.weight in lora_trained:
        i, r, o = adapted[s.weight]
        # With S slices s.flops = 2·rows·I·O·S; x·A costs 2·rows·I·r·S and ·B 2·rows·r·O·S.
        fwd_a, fwd_b = s.flops * r / o, s.flops * r / i
        # Both factors trained; B's input x·A always needs its gradient (for dA),
        # A's input x only when something earlier is trained.
        lora = fwd_a * (3.0 if earlier_trained else 2.0) + fwd_b * 3.0
        by_part["lora"] = by_part.get("lora", 0.0) + lora
        forward += fwd_a + fwd_b
      model += cost + lora
      executed += cost + lora
      forward += s.flops
      by_part[s.part] = by_part.get(s.part, 0.0) + cost
    if any(_reads_trained(s, trainable, lora_trained) for s in group):
      earlier_trained = True
  return StepFlops(model, executed, forward, by_part, text_tokens)


def step_flops(
  model_cfg: ml_collections.ConfigDict,
  *,
  vocab_size: int,
  image_size: int,
  batch_size: int,
  seq_len: int,
  shapes: Mapping[str, tuple[int, ...]],
  trainable: Mapping[str, bool],
) -> StepFlops:
  """FLOPs of one train step of ``VLM.from_config(model_cfg, ...)`` on
  ``image float32[B, image_size, image_size, 3]`` and ``tokens int32[B, T]``.

  Args:
    model_cfg: ``config.model``.
    vocab_size, image_size: as given to the model.
    batch_size: B, global.
    seq_len: T, text tokens per example (the step's bucket).
    shapes: '/'-path -> shape of every parameter (LoRA adapters included).
    trainable: '/'-path -> trained or frozen (``optimizer.trainable_mask``).

  Raises:
    ValueError: when the parameters are not exactly those the FLOP model
      expects (a model change this module has not followed).
  """
  kw = dict(vocab_size=vocab_size, image_size=image_size, batch_size=batch_size, seq_len=seq_len)
  executed_sites, _ = vlm_sites(model_cfg, **kw)
  model_sites, _ = vlm_sites(model_cfg, **kw, head_on_text_only=True)
  tokens = batch_size * seq_len
  ex = count_step_flops(executed_sites, shapes=shapes, trainable=trainable, text_tokens=tokens)
  mo = count_step_flops(model_sites, shapes=shapes, trainable=trainable, text_tokens=tokens)
  return dataclasses.replace(ex, model=mo.model, by_part=mo.by_part)


def shapes_and_trainable(
  abstract_params: Mapping, trainable_tree: Mapping
) -> tuple[dict[str, tuple[int, ...]], dict[str, bool]]:
  """'/'-path dicts of shapes and trainability from a param tree and its bool mask."""
  from compact_jax.train.mesh import path_names

  shapes = {k: tuple(v.shape) for k, v in path_names(abstract_params).items()}
  trained = {k: bool(v) for k, v in path_names(trainable_tree).items()}
  return shapes, trained


def xla_flops(compiled: jax.stages.Compiled) -> float:
  """XLA's FLOP count of one device's program (``cost_analysis()["flops"]``).

  For an SPMD-partitioned step this is per device: multiply by the device
  count for the global step. It includes elementwise work and remat's
  recomputation, and counts a while loop's body once (a scanned layer stack
  contributes one layer).
  """
  cost = compiled.cost_analysis()
  if isinstance(cost, list | tuple):  # older jax returned one dict per program
    cost = cost[0]
  return float(cost.get("flops", 0.0))
