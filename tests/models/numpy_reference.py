"""An independent float64 numpy implementation of the VLM, for parity tests.

Written from the papers' and big_vision's definitions, one example and one
head at a time, reading params from the per-layer flat dict
(``vlm.scanned_to_per_layer(flat_params(...))``). It shares no code with
``compact_jax.models``; RoPE is written as a complex rotation rather than
the split-half formula.
"""

from __future__ import annotations

import math

import numpy as np

_erf = np.vectorize(math.erf)


def gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def gelu_exact(x):
  return 0.5 * x * (1 + _erf(x / np.sqrt(2)))


def softmax(s):
  s = s - s.max(-1, keepdims=True)
  e = np.exp(s)
  return e / e.sum(-1, keepdims=True)


def layer_norm(x, scale, bias, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * scale + bias


def rms_norm(x, scale, eps=1e-6):
  return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * (1 + scale)


def rope(x, positions):
  """x [S, H] rotated by angle pos / 10000^(2i/H) on the pair (x_i, x_{i+H/2})."""
  half = x.shape[-1] // 2
  angle = positions[:, None] / 10000.0 ** (2 * np.arange(half) / x.shape[-1])
  z = (x[:, :half] + 1j * x[:, half:]) * np.exp(1j * angle)
  return np.concatenate([z.real, z.imag], axis=-1)


def vit(p, image, *, depth, num_heads, patch, output_layer=-1):
  """image [H, W, 3] -> [N, D] for one example."""
  g = lambda k: np.asarray(p[f"img/{k}"], np.float64)  # noqa: E731
  h, w, _ = image.shape
  kernel = g("embedding/kernel")
  tokens = []
  for i in range(h // patch):
    for j in range(w // patch):
      block = image[i * patch : (i + 1) * patch, j * patch : (j + 1) * patch, :]
      tokens.append(np.tensordot(block, kernel, axes=3))
  x = np.stack(tokens) + g("embedding/bias") + g("pos_embedding")[0]
  for layer in range(depth + 1 + output_layer):
    pre = f"Transformer/encoderblock_{layer}/"
    y = layer_norm(x, g(pre + "LayerNorm_0/scale"), g(pre + "LayerNorm_0/bias"))
    att = pre + "MultiHeadDotProductAttention_0/"
    out = g(att + "out/bias").copy()
    for n in range(num_heads):
      q = y @ g(att + "query/kernel")[:, n] + g(att + "query/bias")[n]
      k = y @ g(att + "key/kernel")[:, n] + g(att + "key/bias")[n]
      v = y @ g(att + "value/kernel")[:, n] + g(att + "value/bias")[n]
      a = softmax(q @ k.T / np.sqrt(q.shape[-1]))
      out = out + (a @ v) @ g(att + "out/kernel")[n]
    x = x + out
    y = layer_norm(x, g(pre + "LayerNorm_1/scale"), g(pre + "LayerNorm_1/bias"))
    mlp = pre + "MlpBlock_0/"
    hid = gelu_tanh(y @ g(mlp + "Dense_0/kernel") + g(mlp + "Dense_0/bias"))
    x = x + hid @ g(mlp + "Dense_1/kernel") + g(mlp + "Dense_1/bias")
  if output_layer == -1:
    x = layer_norm(x, g("Transformer/encoder_norm/scale"), g("Transformer/encoder_norm/bias"))
  return x


def connector(p, z, name):
  g = lambda k: np.asarray(p[k], np.float64)  # noqa: E731
  if name == "linear":
    return z @ g("img/head/kernel") + g("img/head/bias")
  hid = gelu_exact(z @ g("connector/Dense_0/kernel") + g("connector/Dense_0/bias"))
  return hid @ g("connector/Dense_1/kernel") + g("connector/Dense_1/bias")


def decoder(p, x, positions, mask, *, depth, num_heads, num_kv_heads):
  """x [S, D] embedded inputs, positions [S], mask bool [S, S] -> logits [S, V]."""
  g = lambda k: np.asarray(p[f"llm/{k}"], np.float64)  # noqa: E731
  groups = num_heads // num_kv_heads
  for layer in range(depth):
    pre = f"layers_{layer}/"
    y = rms_norm(x, g(pre + "pre_attention_norm/scale"))
    wq, wkv, wo = (
      g(pre + "attn/q_einsum/w"),
      g(pre + "attn/kv_einsum/w"),
      g(pre + "attn/attn_vec_einsum/w"),
    )
    out = np.zeros_like(x)
    for n in range(num_heads):
      kv_head = n // groups
      q = rope(y @ wq[n], positions) / np.sqrt(wq.shape[-1])
      k = rope(y @ wkv[0, kv_head], positions)
      v = y @ wkv[1, kv_head]
      s = np.where(mask, q @ k.T, -1e30)
      out = out + (softmax(s) @ v) @ wo[n]
    x = x + out
    y = rms_norm(x, g(pre + "pre_ffw_norm/scale"))
    wg = g(pre + "mlp/gating_einsum")
    x = x + (gelu_tanh(y @ wg[0]) * (y @ wg[1])) @ g(pre + "mlp/linear")
  x = rms_norm(x, g("final_norm/scale"))
  return x @ g("embedder/input_embedding").T


def embed_tokens(p, tokens):
  table = np.asarray(p["llm/embedder/input_embedding"], np.float64)
  return table[tokens] * np.sqrt(table.shape[1])


def attention_mask(valid, mask_ar):
  """big_vision's rule, element by element."""
  cum = np.cumsum(mask_ar)
  s = len(valid)
  return np.array(
    [[valid[i] and valid[j] and cum[j] <= cum[i] for j in range(s)] for i in range(s)]
  )


def vlm(
  p,
  image,
  tokens,
  mask_ar,
  mask_input,
  has_image,
  *,
  vit_variant,
  llm_variant,
  connector_name,
  output_layer=-1,
):
  """Logits [B, T, V] for a batch, one example at a time."""
  out = []
  for b in range(tokens.shape[0]):
    z = vit(
      p,
      image[b].astype(np.float64),
      depth=vit_variant.depth,
      num_heads=vit_variant.num_heads,
      patch=vit_variant.patch_size,
      output_layer=output_layer,
    )
    z = connector(p, z, connector_name)
    n = z.shape[0]
    x = np.concatenate([z, embed_tokens(p, tokens[b])])
    valid = np.concatenate([np.full(n, bool(has_image[b])), mask_input[b].astype(bool)])
    ar = np.concatenate([np.zeros(n, int), mask_ar[b].astype(int)])
    positions = np.cumsum(valid) - 1
    logits = decoder(
      p,
      x,
      positions.astype(np.float64),
      attention_mask(valid, ar),
      depth=llm_variant.depth,
      num_heads=llm_variant.num_heads,
      num_kv_heads=llm_variant.num_kv_heads,
    )
    out.append(logits[n:])
  return np.stack(out)
