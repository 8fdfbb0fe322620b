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


class Checkpointer:
  """Keep-N, async checkpoints of (state, data-iterator state, metadata)."""

  def __init__(self, directory: str | os.PathLike, *, keep: int = 2, async_save: bool = True):
    self.directory = os.path.abspath(os.fspath(directory))
    self._mngr = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=True,
        # A kill mid-save leaves a tmp directory; remove it rather than read it.
        cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save,
      ),
    )

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def save(self, step: int, state: Any, *, data: dict, meta: dict, force: bool = False) -> bool:
    saved = self._mngr.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data),
        meta=ocp.args.JsonSave(meta),
      ),
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

  def restore_meta(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else step
    out = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(out["meta"])

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
