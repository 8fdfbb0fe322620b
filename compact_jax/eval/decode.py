"""Batched decoding with a KV cache, for a ``models.vlm.VLM``: greedy or sampled.

Einsum letters: B batch, P prompt len, N image tokens, S cache len
(N + P + max_new_tokens), L layers, K kv heads, H head dim, V vocab.

Prompts are LEFT-padded (``prompt_mask`` False on the left), so every row's
last prompt token sits at the same index and generated tokens are written to
the same cache slot for the whole batch. The prefix (valid image tokens + valid
prompt tokens) attends to itself fully (prefix-LM); each generated token
attends to the prefix, to earlier generated tokens and to itself. Positions
count valid tokens only, so padding never shifts RoPE and a row's output does
not depend on what else is in its batch.

Sampling (temperature / top-k / top-p) draws row r's token t with the key
``fold_in(fold_in(key(seed), row_ids[r]), t)``: a row's randomness depends on
its own id (e.g. the example's index in the benchmark), never on its position
in the batch, so sampled outputs are batch-size invariant too.

Generation stops per row at any of ``stop_ids`` (kept in the output, padding
after it) or after ``max_new_tokens``. Stop *strings* cannot be checked inside
jit (they need detokenization), so ``cut_at_stop_strings`` trims decoded text
on the host; the tokens after a stop string are wasted compute, nothing more.

``make_decoder`` jits one function per (batch, prompt length, image) shape; the
decode loop is a ``lax.while_loop`` with a fixed-size cache ``float[L, B, S, K, H]``,
so nothing retraces per token. ``greedy_decode_reference`` re-runs the training
forward pass instead, and is the yardstick the tests hold the cached decoder to.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from compact_jax import models
from compact_jax.models.vlm import VLM, make_attn_mask


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the next token is chosen. ``temperature == 0`` is greedy (argmax) and ignores
  the other fields; otherwise logits / temperature are restricted to the ``top_k``
  most likely tokens (0 = all) and then to the smallest set whose probability
  reaches ``top_p`` (1.0 = all), and a token is drawn with ``seed``."""

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0 (0 = no limit), got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


GREEDY = Sampling()


def _check_inputs(image, prompt_tokens, prompt_mask, has_image, tile_layout=None) -> None:
  """Host-side checks with errors that say what is wrong (inside jit they would be silent)."""
  if np.ndim(prompt_tokens) != 2:
    raise ValueError(f"prompt_tokens must be int32[B, P], got shape {np.shape(prompt_tokens)}")
  b, p = np.shape(prompt_tokens)
  if np.shape(prompt_mask) != (b, p):
    raise ValueError(f"prompt_mask has shape {np.shape(prompt_mask)}, expected {(b, p)}")
  if np.shape(has_image) != (b,):
    raise ValueError(f"has_image has shape {np.shape(has_image)}, expected {(b,)}")
  if tile_layout is not None:
    # Dynamic resolution: a global view and tiles per row (models/anyres.py).
    if np.ndim(image) != 5 or np.shape(image)[0] != b:
      raise ValueError(f"image must be float32[{b}, V, S, S, 3], got shape {np.shape(image)}")
    if np.shape(tile_layout) != (b, 4):
      raise ValueError(f"tile_layout has shape {np.shape(tile_layout)}, expected {(b, 4)}")
  elif np.ndim(image) != 4 or np.shape(image)[0] != b:
    raise ValueError(f"image must be float32[{b}, H, W, 3], got shape {np.shape(image)}")
  mask = np.asarray(prompt_mask, bool)
  if not mask[:, -1].all():
    rows = np.flatnonzero(~mask[:, -1]).tolist()
    raise ValueError(
      f"Prompts must be left-padded with a non-empty prompt: rows {rows} end in padding"
    )
  # Left padding means each row's mask is False...False True...True.
  bad = np.flatnonzero((np.diff(mask.astype(np.int8), axis=1) < 0).any(axis=1)).tolist()
  if bad:
    raise ValueError(f"Prompts must be left-padded: rows {bad} have padding after a valid token")


def filter_logits(logits: jax.Array, *, top_k: int, top_p: float) -> jax.Array:
  """float32[B, V] logits with tokens outside top-k / the top-p nucleus set to -inf.

  The nucleus keeps every token whose probability mass *before* it (in descending
  order) is below ``top_p``, so the most likely token always survives. Ties at
  the threshold are all kept (a threshold on values, not on sorted positions).
  """
  neg = jnp.finfo(logits.dtype).min
  if top_k and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, neg, logits)
  if top_p < 1.0:
    desc = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    # The smallest logit still inside the nucleus.
    cutoff = jnp.min(jnp.where(before < top_p, desc, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, neg, logits)
  return logits


class Decoder:
  """``decoder(params_state, image, prompt_tokens, prompt_mask, has_image[, row_ids])
  -> int32[B, max_new_tokens]``.

  Built by ``make_decoder`` (or ``make_greedy_decoder``). ``num_traces`` counts how
  often the decode function was traced (once per input shape), so callers and
  tests can see that repeated calls do not recompile.
  """

  def __init__(
    self,
    graphdef: nnx.GraphDef,
    *,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    stop_ids: Sequence[int] = (),
    sampling: Sampling = GREEDY,
  ):
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    self.graphdef = graphdef
    self.max_new_tokens = max_new_tokens
    self.eos_id = eos_id
    self.pad_id = pad_id
    self.stop_ids = tuple(sorted({int(eos_id), *(int(s) for s in stop_ids)}))
    self.sampling = sampling
    self.num_traces = 0
    self._jitted = jax.jit(self._decode)

  def __call__(
    self,
    params_state: nnx.State,
    image: jax.Array,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    has_image: jax.Array,
    row_ids: jax.Array | None = None,
    seed: int | None = None,
    tile_layout: jax.Array | None = None,
  ) -> jax.Array:
    """Continuations of each prompt.

    Args:
      params_state: the model's state, as from ``nnx.split(model)``.
      image: float32[B, H, W, 3] in [-1, 1] (any values where has_image is False).
      prompt_tokens: int32[B, P], left-padded.
      prompt_mask: bool[B, P], False on the left padding.
      has_image: bool[B].
      row_ids: int32[B], what each row's sampling key is derived from (default
        0..B-1); give each example a stable id to make sampling batch-invariant.
        Unused when greedy.
      seed: overrides ``sampling.seed`` for this call (a traced value: no recompile).
      tile_layout: int32[B, 4] for a model with ``model.dynamic_res`` (then image is
        float32[B, V, S, S, 3], from ``data.image.ImagePreprocessor``).

    Returns:
      int32[B, max_new_tokens]: generated tokens; after a row's stop token (which
      is kept) every token is ``pad_id``.
    """
    _check_inputs(image, prompt_tokens, prompt_mask, has_image, tile_layout)
    b = np.shape(prompt_tokens)[0]
    if row_ids is None:
      row_ids = np.arange(b)
    if np.shape(row_ids) != (b,):
      raise ValueError(f"row_ids has shape {np.shape(row_ids)}, expected {(b,)}")
    return self._jitted(
      params_state,
      jnp.asarray(image, jnp.float32),
      jnp.asarray(prompt_tokens, jnp.int32),
      jnp.asarray(prompt_mask, bool),
      jnp.asarray(has_image, bool),
      jnp.asarray(row_ids, jnp.uint32),
      jnp.uint32(self.sampling.seed if seed is None else seed),
      None if tile_layout is None else jnp.asarray(tile_layout, jnp.int32),
    )

  def _pick(self, logits: jax.Array, row_keys: jax.Array, t: jax.Array) -> jax.Array:
    """int32[B] next tokens from float32[B, V] logits at generation step ``t``."""
    s = self.sampling
    if s.greedy:
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits.astype(jnp.float32) / s.temperature, top_k=s.top_k, top_p=s.top_p)
    keys = jax.vmap(lambda k: jax.random.fold_in(k, t))(row_keys)
    return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)

  def _decode(
    self, state, image, prompt_tokens, prompt_mask, has_image, row_ids, seed, tile_layout
  ):
    self.num_traces += 1  # runs at trace time only
    model: VLM = nnx.merge(self.graphdef, state)
    lm = model.llm
    if not lm.scan and lm.remat_policy in (None, "none"):
      # The prefill below lays every LM weight out for its matmul once; the token loop
      # reuses those matrices instead of re-slicing/relaying the weights per token.
      models.prepare_decode_weights(lm)
    b = prompt_tokens.shape[0]
    max_new = self.max_new_tokens
    stop_ids = jnp.asarray(self.stop_ids, jnp.int32)
    base_key = jax.random.key(seed)
    row_keys = jax.vmap(lambda r: jax.random.fold_in(base_key, r))(row_ids)

    # Prefill: the whole prefix in one pass, writing cache slots [0, N + P).
    x, valid, _ = model.embed_prefix(image, prompt_tokens, prompt_mask, has_image, tile_layout)
    prefix_len = x.shape[1]
    n_img = prefix_len - prompt_tokens.shape[1]
    prompt_ar = jnp.zeros_like(prompt_tokens, jnp.int32)
    prefix_attn = make_attn_mask(valid, model.full_mask_ar(n_img, prompt_ar))
    # Slots after the prefix are still empty: nothing attends to them.
    mask = jnp.pad(prefix_attn, ((0, 0), (0, 0), (0, max_new)))
    positions = jnp.cumsum(valid, axis=1) - 1
    _, aux = lm(
      x,
      positions,
      mask,
      cache=lm.init_cache(b, prefix_len + max_new),
      cache_index=0,
      lora_mask=model.lora_mask(b, n_img, prompt_tokens.shape[1]),
    )
    # With left padding the last prefix slot is every row's last prompt token.
    first = self._pick(lm.logits(aux["pre_logits"][:, -1:])[:, 0], row_keys, jnp.int32(0))

    out = jnp.full((b, max_new), self.pad_id, jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, stop_ids)
    kv_valid = jnp.pad(valid, ((0, 0), (0, max_new)))
    num_valid = valid.sum(axis=1).astype(jnp.int32)

    def cond(carry):
      t, _, done, _, _ = carry
      return (t < max_new) & ~jnp.all(done)

    def step(carry):
      # Feed token t-1 (cache slot prefix_len + t - 1), predict token t.
      t, out, done, cache, kv_valid = carry
      slot = prefix_len + t - 1
      kv_valid = kv_valid.at[:, slot].set(True)
      prev = jax.lax.dynamic_slice_in_dim(out, t - 1, 1, axis=1)
      pos = (num_valid + t - 1)[:, None]
      logits, aux = lm(
        lm.embed(prev),
        pos,
        kv_valid[:, None, :],
        cache=cache,
        cache_index=slot,
        lora_mask=model.lora_mask(b, 0, 1),  # generated tokens are text
      )
      tok = self._pick(logits[:, 0], row_keys, t)
      tok = jnp.where(done, self.pad_id, tok)
      out = jax.lax.dynamic_update_slice_in_dim(out, tok[:, None], t, axis=1)
      return t + 1, out, done | jnp.isin(tok, stop_ids), aux["kv_cache"], kv_valid

    carry = (jnp.int32(1), out, done, aux["kv_cache"], kv_valid)
    return jax.lax.while_loop(cond, step, carry)[1]


# The greedy decoder is the general one with the default (greedy) sampling.
GreedyDecoder = Decoder


def make_decoder(
  graphdef: nnx.GraphDef,
  *,
  max_new_tokens: int,
  eos_id: int,
  pad_id: int,
  stop_ids: Sequence[int] = (),
  sampling: Sampling = GREEDY,
) -> Decoder:
  """A jitted decoder for models with this graphdef (see ``Decoder``)."""
  return Decoder(
    graphdef,
    max_new_tokens=max_new_tokens,
    eos_id=eos_id,
    pad_id=pad_id,
    stop_ids=stop_ids,
    sampling=sampling,
  )


def make_greedy_decoder(
  graphdef: nnx.GraphDef, *, max_new_tokens: int, eos_id: int, pad_id: int
) -> Decoder:
  """A jitted greedy decoder for models with this graphdef (see ``Decoder``)."""
  return Decoder(graphdef, max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id)


def trim_generated(ids: Sequence[int], *, stop_ids: Sequence[int], pad_id: int) -> list[int]:
  """A row of generated ids up to (not including) its first stop token, padding dropped."""
  stops = set(int(s) for s in stop_ids)
  out = []
  for t in ids:
    t = int(t)
    if t in stops:
      break
    if t != pad_id:
      out.append(t)
  return out


def cut_at_stop_strings(text: str, stop_strings: Sequence[str]) -> str:
  """``text`` up to the earliest occurrence of any stop string (all of it if none occurs)."""
  end = len(text)
  for s in stop_strings:
    if s and (i := text.find(s)) != -1:
      end = min(end, i)
  return text[:end]


@functools.partial(jax.jit, static_argnums=0)
def _forward_logits(graphdef, state, *batch, tile_layout=None):
  # graphdef is static, so models of one architecture share a compile.
  return nnx.merge(graphdef, state)(*batch, tile_layout=tile_layout)[0]


def greedy_decode_reference(
  model: VLM,
  image: jax.Array,
  prompt_tokens: jax.Array,
  prompt_mask: jax.Array,
  has_image: jax.Array,
  *,
  max_new_tokens: int,
  eos_id: int,
  pad_id: int,
  tile_layout: jax.Array | None = None,
) -> np.ndarray:
  """Greedy decoding by full forward passes, no cache (slow; for tests and debugging).

  Each step runs ``VLM.__call__`` on ``[prompt ; generated so far]`` with
  mask_ar 0 on the prompt and 1 on generated tokens, exactly as the trainer
  sees a prompt and its answer, and takes the argmax at the last valid
  position. The sequence is right-padded to P + max_new_tokens with invalid
  tokens so that one compiled forward serves every step.

  Returns:
    int32[B, max_new_tokens], ``pad_id`` after each row's EOS.
  """
  _check_inputs(image, prompt_tokens, prompt_mask, has_image, tile_layout)
  graphdef, state = nnx.split(model)
  b, p = np.shape(prompt_tokens)
  tokens = np.full((b, p + max_new_tokens), pad_id, np.int32)
  tokens[:, :p] = np.asarray(prompt_tokens)
  mask_input = np.zeros((b, p + max_new_tokens), bool)
  mask_input[:, :p] = np.asarray(prompt_mask, bool)
  mask_ar = np.zeros((b, p + max_new_tokens), np.int32)
  mask_ar[:, p:] = 1
  out = np.full((b, max_new_tokens), pad_id, np.int32)
  done = np.zeros((b,), bool)
  image = jnp.asarray(image, jnp.float32)
  has_image = jnp.asarray(has_image, bool)
  tile_layout = None if tile_layout is None else jnp.asarray(tile_layout, jnp.int32)
  for t in range(max_new_tokens):
    logits = _forward_logits(
      graphdef,
      state,
      image,
      jnp.asarray(tokens),
      jnp.asarray(mask_ar),
      jnp.asarray(mask_input),
      has_image,
      tile_layout=tile_layout,
    )
    tok = np.asarray(jnp.argmax(logits[:, p + t - 1], axis=-1), np.int32)
    tok = np.where(done, pad_id, tok)
    out[:, t] = tok
    tokens[:, p + t] = tok
    mask_input[:, p + t] = True
    done |= tok == eos_id
    if done.all():
      break
  return out
