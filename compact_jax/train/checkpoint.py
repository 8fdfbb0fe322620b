"""Orbax checkpoints behind a small interface (so Orbax v0 -> v1 stays local).

A checkpoint step holds three items:
- ``state``: the train-state pytree (step, params, optimizer state), saved
  from every host and restored straight into the target shardings;
- ``data``: the input pipeline's iterator state (JSON), so a resumed run sees
  exactly the batches it would have seen;
- ``meta``: JSON facts a reader needs without the config (vocab size, model
  variants, process count).

Saves are asynchronous; Orbax writes to a temporary directory and renames it
when complete, so a kill mid-save leaves the previous step as the latest.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint.checkpoint_managers import preservation_policy as preservation


class ParamsMismatchError(ValueError):
  """A checkpoint's params and the model restoring them have different paths."""


def _leaf_paths(tree: Any, is_leaf=None) -> dict[str, Any]:
  """'/'-joined key path -> leaf (dict keys and attribute names alike)."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_leaf):
    names = (getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)
    out["/".join(str(n) for n in names)] = leaf
  return out


class Checkpointer:
  """Keep-N, async checkpoints of (state, data-iterator state, metadata).

  With ``best_metric`` the ``keep_best`` checkpoints with the best value of that
  metric (passed to :meth:`save`) are kept as well as the ``keep`` latest: the
  latest must survive for resume, however bad its metric.
  """

  def __init__(
    self,
    directory: str | os.PathLike,
    *,
    keep: int = 2,
    async_save: bool = True,
    best_metric: str = "",
    best_mode: str = "min",
    keep_best: int = 1,
  ):
    if best_mode not in ("min", "max"):
      raise ValueError(f"Checkpointer: best_mode must be 'min' or 'max', got {best_mode!r}")
    self.directory = os.path.abspath(os.fspath(directory))
    self.best_metric = best_metric
    policy = None
    best_fn = None
    if best_metric:

      def best_fn(metrics):
        return metrics[best_metric]

      policy = preservation.AnyPreservationPolicy(
        [
          preservation.LatestN(n=keep),
          preservation.BestN(
            get_metric_fn=best_fn,
            # BestN keeps the last n of an ascending sort; reversed, the smallest.
            reverse=best_mode == "min",
            n=keep_best,
            keep_checkpoints_without_metrics=False,
          ),
        ]
      )
    self._mngr = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        # The preservation policy, when given, replaces max_to_keep; best_fn
        # still makes Orbax write each step's metrics and rank them.
        max_to_keep=None if policy else keep,
        preservation_policy=policy,
        best_fn=best_fn,
        best_mode=best_mode,
        create=True,
        # A kill mid-save leaves a tmp directory; remove it rather than read it.
        cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save,
      ),
    )

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def save(
    self,
    step: int,
    state: Any,
    *,
    data: dict,
    meta: dict,
    metrics: dict[str, float] | None = None,
    force: bool = False,
  ) -> bool:
    """Queues an async save; ``metrics`` rank it for ``best_metric`` (None: recency only)."""
    if self.best_metric and metrics is not None and self.best_metric not in metrics:
      raise KeyError(f"Checkpoint {step}: metrics {sorted(metrics)} lack {self.best_metric!r}")
    saved = self._mngr.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data),
        meta=ocp.args.JsonSave(meta),
      ),
      metrics=metrics if self.best_metric else None,
      force=force,
    )
    if saved:
      logging.info("Checkpoint for step %d queued in %s", step, self.directory)
    return saved

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, dict]:
    """Restores ``step`` (default: latest) into ``abstract_state``'s shardings.

    Args:
      abstract_state: pytree of ``jax.ShapeDtypeStruct`` with ``sharding`` set.
      step: which step; None = latest.

    Returns:
      (state, data, meta).
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"No checkpoint in {self.directory}")
    out = self._mngr.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore(),
      ),
    )
    return out["state"], dict(out["data"]), dict(out["meta"])

  def restore_params(self, abstract_params: Any, step: int | None = None) -> Any:
    """Only ``state["params"]`` of ``step`` (default: latest), in ``abstract_params``'
    shardings. The optimizer state is not read, so a reader needs neither its
    structure (the writer's param groups) nor its memory.

    Use a Checkpointer that has not saved: Orbax binds the ``state`` item to the
    handler of the first save or restore.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"No checkpoint in {self.directory}")
    # partial_restore (which lets us skip the optimizer state) would also silently
    # skip params that only one side has: a LoRA checkpoint read by a model without
    # adapters evaluates the base model, and a param the checkpoint lacks comes back
    # as its abstract placeholder (seen far away as "ShapeDtypeStruct is not a valid
    # JAX type"). Both sides' param paths must agree.
    saved = self.saved_param_paths(step)
    wanted = set(_leaf_paths(abstract_params))
    for what, paths in (("has no value for", wanted - saved), ("holds", saved - wanted)):
      if paths:
        raise ParamsMismatchError(
          f"checkpoint {self.directory} step {step} {what} {len(paths)} param(s) "
          f"{'of' if what.startswith('has') else 'not in'} the model being restored "
          f"(e.g. {', '.join(sorted(paths)[:4])}): it is not the model that wrote it"
        )
    item = {"params": abstract_params}
    out = self._mngr.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
          item,
          restore_args=ocp.checkpoint_utils.construct_restore_args(item),
          partial_restore=True,
        )
      ),
    )
    return out["state"]["params"]

  def saved_param_paths(self, step: int) -> set[str]:
    """The '/'-joined paths of ``state["params"]`` in checkpoint ``step`` (from its
    metadata; no array is read)."""
    tree = ocp.StandardCheckpointHandler().metadata(
      epath.Path(self.directory) / str(step) / "state"
    )
    if tree is None or "params" not in tree:
      raise FileNotFoundError(f"checkpoint {self.directory} step {step} holds no params")
    return set(_leaf_paths(tree["params"], is_leaf=lambda x: hasattr(x, "shape")))

  def restore_meta(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else step
    out = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(out["meta"])

  def all_steps(self) -> list[int]:
    return sorted(self._mngr.all_steps())

  def best_step(self) -> int | None:
    """The step with the best ``best_metric`` (the latest when there is none)."""
    return self._mngr.best_step()

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of ``tree`` carrying ``shardings`` (for restore)."""
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
  )
