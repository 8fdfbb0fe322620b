"""AdamW with warmup + cosine, and regex parameter groups.

``config.train.param_groups`` is a list of ``(regex, lr_multiplier)`` over
'/'-joined parameter paths (``img/embedding/kernel``, ``llm/layers/attn/...``).
A multiplier of ``None`` freezes the match: it gets no optimizer state and a
zero update. Every parameter must match exactly one pattern (``re.fullmatch``);
anything else is a config error raised before training starts.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import optax

from compact_jax.train.mesh import path_names, unflatten

FROZEN = "frozen"


# Learned token params (models/siglip.py) that weight decay would pull towards zero.
NO_DECAY_TOKENS = ("cls", "probe")


def assign_groups(
  params: Mapping, groups: Sequence[tuple[str, float | None]]
) -> tuple[dict, dict[str, list[str]]]:
  """Labels each parameter with its group; fails unless exactly one matches.

  Returns:
    (labels, members): a tree like ``params`` of group labels ("frozen" or
    "g<i>"), and the parameter names in each label.
  """
  compiled = [(re.compile(pattern), mult) for pattern, mult in groups]
  labels_flat: dict[tuple, str] = {}
  members: dict[str, list[str]] = {}
  problems = []
  for name in path_names(params):
    hits = [i for i, (rx, _) in enumerate(compiled) if rx.fullmatch(name)]
    if len(hits) != 1:
      which = [groups[i][0] for i in hits]
      problems.append(f"{name}: matches {which or 'no pattern'}")
      continue
    label = FROZEN if compiled[hits[0]][1] is None else f"g{hits[0]}"
    labels_flat[tuple(name.split("/"))] = label
    members.setdefault(label, []).append(name)
  used = {
    i for i, (rx, _) in enumerate(compiled) for name in path_names(params) if rx.fullmatch(name)
  }
  for i, (pattern, _) in enumerate(groups):
    if i not in used:
      # A pattern that matches nothing is a typo (e.g. "^img/" under fullmatch), and
      # the parameters it meant fall silently into another group.
      problems.append(f"pattern {pattern!r} matches no parameter (patterns are fullmatched)")
  if problems:
    raise ValueError(
      "<phase>.param_groups must match every parameter exactly once:\n  "
      + "\n  ".join(problems[:20])
      + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
    )
  return unflatten(labels_flat), members


def make_schedule(cfg: ml_collections.ConfigDict, base_lr: float) -> optax.Schedule:
  """Linear warmup to ``base_lr``, then cosine to ``base_lr * end_lr_fraction``."""
  warmup = min(cfg.warmup_steps, max(cfg.total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=base_lr,
    warmup_steps=warmup,
    decay_steps=max(cfg.total_steps, warmup + 1),
    end_value=base_lr * cfg.end_lr_fraction,
  )


def make_optimizer(
  cfg: ml_collections.ConfigDict, params: Mapping
) -> tuple[optax.GradientTransformation, dict[str, list[str]], optax.Schedule]:
  """The optimizer for ``params`` (abstract or concrete) under ``cfg`` (config.train).

  Global-norm clipping runs over trainable parameters only: frozen ones are
  zeroed by the partition before any statistic could see them.

  Returns:
    (tx, members, schedule): the transformation, parameter names per group,
    and the base learning-rate schedule (for logging).
  """
  labels, members = assign_groups(params, cfg.param_groups)
  schedule = make_schedule(cfg, cfg.lr)

  def decay_mask(tree):
    # No weight decay on biases, norm scales, position embeddings and learned tokens
    # (1-D or named so: the ViT's class token, the MAP head's probe), as timm's
    # no_weight_decay() and the usual AdamW practice.
    def keep(path, leaf):
      keys = [str(getattr(k, "key", k)) for k in path]
      name = "/".join(keys)
      return (
        leaf.ndim > 1
        and "pos_embedding" not in name
        and "norm" not in name
        and keys[-1] not in NO_DECAY_TOKENS
      )

    return jax.tree_util.tree_map_with_path(keep, tree)

  transforms: dict[str, optax.GradientTransformation] = {FROZEN: optax.set_to_zero()}
  for i, (_, mult) in enumerate(cfg.param_groups):
    if mult is None:
      continue
    transforms[f"g{i}"] = optax.adamw(
      make_schedule(cfg, cfg.lr * mult),
      b1=cfg.b1,
      b2=cfg.b2,
      weight_decay=cfg.weight_decay,
      mask=decay_mask,
    )
  tx = optax.partition(transforms, labels)
  if cfg.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), tx)
  return tx, members, schedule


def trainable_mask(params: Mapping, groups: Sequence[tuple[str, float | None]]) -> Any:
  """Tree of bools: True where a parameter is trained."""
  labels, _ = assign_groups(params, groups)
  return jax.tree.map(lambda label: label != FROZEN, labels)


def group_names(groups: Sequence[tuple[str, float | None]]) -> dict[str, str]:
  """Label ("g<i>") -> a readable name for logs: ``g<i>`` plus the pattern's words.

  ``(".*_lora_[ab]", ...)`` at index 0 is ``g0_lora_ab``; ``("connector/.*", ...)``
  at index 1 is ``g1_connector``; ``("(?!img/).*", ...)`` at index 1 is ``g1_not_img``;
  ``(".*", ...)`` is just ``g0``. The index keeps
  names unique; frozen groups are left out (they have no learning rate).
  """
  out = {}
  for i, (pattern, mult) in enumerate(groups):
    if mult is None:
      continue
    # A negative lookaround names what the group is *not*: "(?!img/).*" is "not_img".
    readable = re.sub(r"\(\?<?!([^)]*)\)", r" not \1 ", pattern.replace("[ab]", "ab"))
    words = "_".join(re.findall(r"[A-Za-z0-9]+", readable))
    out[f"g{i}"] = f"g{i}_{words}" if words else f"g{i}"
  return out


def group_schedules(cfg: ml_collections.ConfigDict) -> dict[str, optax.Schedule]:
  """Readable group name (``group_names``) -> that group's learning-rate schedule.

  These are the schedules ``make_optimizer`` gives each trainable group, so the
  logged value is the rate its AdamW applied.
  """
  names = group_names(cfg.param_groups)
  return {
    names[f"g{i}"]: make_schedule(cfg, cfg.lr * mult)
    for i, (_, mult) in enumerate(cfg.param_groups)
    if mult is not None
  }
