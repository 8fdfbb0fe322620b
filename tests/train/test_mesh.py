"""Mesh shape resolution and logical -> mesh shardings."""

import jax
import pytest
from jax.sharding import PartitionSpec as P

from compact_jax import sharding as sharding_lib
from compact_jax.train import mesh as mesh_lib


def test_fill_axis():
  assert mesh_lib.resolve_mesh_shape((("data", -1), ("fsdp", 2), ("tensor", 1)), 8) == (
    ("data", "fsdp", "tensor"),
    (4, 2, 1),
  )


@pytest.mark.parametrize("axes", [(("data", -1), ("fsdp", -1)), (("data", 3),), (("model", 8),)])
def test_bad_meshes_fail(axes):
  with pytest.raises(ValueError):
    mesh_lib.resolve_mesh_shape(axes, 8)


def test_make_mesh_uses_all_devices_with_auto_axes():
  mesh = mesh_lib.make_mesh((("data", -1), ("fsdp", 2), ("tensor", 1)))
  assert jax.device_count() == 8 and dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_logical_to_spec_never_reuses_a_mesh_axis():
  rules = (("embed", "fsdp"), ("mlp", "tensor"), ("act_batch", ("data", "fsdp")))
  assert sharding_lib.logical_to_spec(("embed", "mlp"), rules) == P("fsdp", "tensor")
  assert sharding_lib.logical_to_spec(("act_batch", "embed"), rules) == P(("data", "fsdp"), None)
  assert sharding_lib.logical_to_spec(("layers", None), rules) == P(None, None)
