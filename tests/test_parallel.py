"""Tests for segldm_jax.runtime (sharding, distributed, peers) on 8 host CPU devices (see conftest.py)."""

import subprocess
import sys
import time

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, PartitionSpec as P
import numpy as np
import optax
import pytest

from segldm_jax import formatting
from segldm_jax.models import build
from segldm_jax.runtime import sharding
from segldm_jax.ui.headless import free_port


@pytest.fixture(autouse=True, scope="module")
def _eight_devices():
  if jax.device_count() != 8:
    pytest.fail(f"needs 8 devices, found {jax.device_count()}: conftest.py "
                "must set XLA_FLAGS before jax is imported")


@pytest.fixture(scope="module")
def unet(fixtures_dir):
  return build.build_model(build.load_model_config(
      fixtures_dir / "unet_tiny.yaml"))


def _spec(shape, mesh, rules=sharding.FSDP, min_size=0):
  tree = {"w": jax.ShapeDtypeStruct(shape, jnp.float32)}
  return sharding.shardings_from_rules(tree, mesh, rules,
                                       min_size=min_size)["w"].spec


# --- make_mesh -------------------------------------------------------------


@pytest.mark.parametrize("axes, shape", [
    ([("data", 8)], {"data": 8}),
    ([("data", 2), ("fsdp", 4)], {"data": 2, "fsdp": 4}),
    ([("fsdp", 8)], {"fsdp": 8}),
    ([("data", -1), ("fsdp", 1)], {"data": 8, "fsdp": 1}),
    ([("data", 2), ("fsdp", -1)], {"data": 2, "fsdp": 4}),
    ([["data", -1]], {"data": 8}),  # YAML gives lists, not tuples.
])
def test_make_mesh_shapes(axes, shape):
  mesh = sharding.make_mesh(axes)
  assert dict(mesh.shape) == shape
  assert mesh.devices.size == 8
  assert set(mesh.devices.flat) == set(jax.devices())
  # Auto axes: the partitioner propagates shardings through unannotated layers.
  assert all(t == AxisType.Auto for t in mesh.axis_types)


def test_make_mesh_explicit_devices():
  mesh = sharding.make_mesh([("data", -1)], devices=jax.devices()[:4])
  assert dict(mesh.shape) == {"data": 4}
  assert set(mesh.devices.flat) == set(jax.devices()[:4])


def test_make_mesh_wrong_product_names_config_and_fix():
  with pytest.raises(ValueError) as e:
    sharding.make_mesh([("data", 3), ("fsdp", 1)])
  assert str(e.value) == (
      "mesh [('data', 3), ('fsdp', 1)] needs 3 devices but 8 are available; "
      "use ('data', -1) or sizes whose product is 8")


def test_make_mesh_suggests_an_axis_that_works():
  # data=-1 would need 8 % 3 == 0; fsdp=-1 works.
  with pytest.raises(ValueError, match=r"use \('fsdp', -1\) or sizes whose "
                     r"product is 8"):
    sharding.make_mesh([("data", 1), ("fsdp", 3)])
  with pytest.raises(ValueError, match=r"needs 9 devices but 8 are available; "
                     r"use sizes whose product is 8$"):
    sharding.make_mesh([("data", 3), ("fsdp", 3)])


@pytest.mark.parametrize("axes, match", [
    ([("data", -1), ("fsdp", -1)], "more than one -1"),
    ([("data", -1), ("fsdp", 3)], "multiply to 3, which does not divide the 8"),
    ([("data", 0)], "positive or -1"),
    ([("data", 4), ("data", 2)], "repeats an axis name"),
    ([], "at least one axis"),
])
def test_make_mesh_rejects(axes, match):
  with pytest.raises(ValueError, match=match):
    sharding.make_mesh(axes)


# --- batch -----------------------------------------------------------------


def test_batch_sharding_uses_data_then_fsdp():
  mesh = sharding.make_mesh([("fsdp", 4), ("data", 2)])
  assert sharding.batch_axes(mesh) == ("data", "fsdp")
  assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp"))
  mesh = sharding.make_mesh([("data", 8)])
  assert sharding.batch_sharding(mesh).spec == P(("data",))
  assert sharding.replicated(mesh).spec == P()
  with pytest.raises(ValueError, match="none of the batch axes"):
    sharding.batch_sharding(sharding.make_mesh([("model", 8)]))


@pytest.mark.parametrize("axes", [[("data", 8)], [("data", 2), ("fsdp", 4)],
                                  [("fsdp", 8)]])
def test_global_batch_two_rows_per_device(axes):
  mesh = sharding.make_mesh(axes)
  x = np.arange(16 * 8 * 8 * 3, dtype=np.float32).reshape(16, 8, 8, 3)
  y = np.arange(16, dtype=np.int32)
  batch = sharding.global_batch({"image": x, "label": y}, mesh)
  assert batch["image"].shape == (16, 8, 8, 3)
  shards = batch["image"].addressable_shards
  assert len(shards) == 8
  assert {s.device for s in shards} == set(jax.devices())
  rows = sorted(s.index[0].start for s in shards)
  assert rows == list(range(0, 16, 2))
  for s in shards:
    assert s.data.shape == (2, 8, 8, 3)
    np.testing.assert_array_equal(s.data, x[s.index])
  np.testing.assert_array_equal(batch["image"], x)
  assert [s.data.shape for s in batch["label"].addressable_shards] == [(2,)] * 8
  assert sharding.per_device_bytes(batch) == (2 * 8 * 8 * 3 + 2) * 4


def test_global_batch_rejects_uneven_batch():
  mesh = sharding.make_mesh([("data", 8)])
  with pytest.raises(ValueError, match=r"'image' .*\(12 rows\) must split "
                     "evenly over 8 batch shards"):
    sharding.global_batch({"image": np.zeros((12, 2))}, mesh)


# --- rules -----------------------------------------------------------------


def test_fsdp_shards_largest_divisible_dim():
  mesh4 = sharding.make_mesh([("data", 2), ("fsdp", 4)])
  mesh8 = sharding.make_mesh([("fsdp", 8)])
  assert _spec((3, 3, 128, 256), mesh4) == P(None, None, None, "fsdp")
  assert _spec((3, 3, 256, 128), mesh4) == P(None, None, "fsdp", None)
  assert _spec((3, 3, 6, 32), mesh8) == P(None, None, None, "fsdp")
  # Ties go to the last dim; a larger non-divisible dim is skipped.
  assert _spec((64, 64), mesh8) == P(None, "fsdp")
  assert _spec((100, 24), mesh8) == P(None, "fsdp")
  # No dim divisible by 8: replicate rather than split unevenly.
  assert _spec((182, 3), mesh8) == P()


def test_two_fsdp_axes_split_two_dims_where_one_would_not_divide():
  # 8 devices as fsdp 4 x fsdp_transpose 2, standing for 256 as 16 x 16:
  # a dim both divide takes both; otherwise each takes a dim of its own.
  mesh = sharding.make_mesh([("data", 1), ("fsdp", 4), ("fsdp_transpose", 2)])
  assert sharding.batch_axes(mesh) == ("data", "fsdp", "fsdp_transpose")
  assert _spec((3, 3, 128, 256), mesh) == P(
      None, None, None, ("fsdp", "fsdp_transpose"))
  assert _spec((3, 3, 12, 6), mesh) == P(None, None, "fsdp", "fsdp_transpose")
  assert _spec((3, 3, 6, 12), mesh) == P(None, None, "fsdp_transpose", "fsdp")
  assert _spec((3, 3, 4, 3), mesh) == P()  # only one dim either divides
  # The state a device holds is an eighth either way.
  tree = {"w": jax.ShapeDtypeStruct((3, 3, 12, 6), jnp.float32)}
  out = sharding.shardings_from_rules(tree, mesh, sharding.FSDP, min_size=0)
  assert out["w"].shard_shape((3, 3, 12, 6)) == (3, 3, 3, 3)


def test_fsdp_small_and_scalar_leaves_replicate():
  mesh = sharding.make_mesh([("fsdp", 8)])
  assert _spec((128, 128), mesh, min_size=2**14) == P(None, "fsdp")
  assert _spec((128, 127), mesh, min_size=2**14) == P()  # 16256 < 2**14.
  assert _spec((), mesh) == P()
  tree = {"step": 0, "count": jnp.zeros((), jnp.int32), "lr": 1e-4}
  out = sharding.shardings_from_rules(tree, mesh, sharding.FSDP)
  assert {k: v.spec for k, v in out.items()} == {k: P() for k in tree}


def test_fsdp_without_fsdp_axis_replicates():
  mesh = sharding.make_mesh([("data", 8)])
  assert _spec((3, 3, 128, 256), mesh) == P()
  mesh = sharding.make_mesh([("data", -1), ("fsdp", 1)])
  assert _spec((3, 3, 128, 256), mesh) == P()


def test_rules_first_match_wins_and_unmatched_replicate():
  mesh = sharding.make_mesh([("fsdp", 8)])
  sds = jax.ShapeDtypeStruct((256, 256), jnp.float32)
  tree = {"params": {"unet": {"out_2": {"kernel": sds},
                              "in_2": {"kernel": sds}}},
          "ema": {"unet": {"in_2": {"kernel": sds}}}}
  rules = [(r"^ema/", "replicate"), (r"out_\d+/", "replicate"),
           (r"^params/", "fsdp"), (r"out_2", "fsdp")]
  out = sharding.shardings_from_rules(tree, mesh, rules)
  assert out["params"]["unet"]["out_2"]["kernel"].spec == P()
  assert out["params"]["unet"]["in_2"]["kernel"].spec == P(None, "fsdp")
  assert out["ema"]["unet"]["in_2"]["kernel"].spec == P()
  # re.search, not re.match: a rule can match in the middle of a path.
  out = sharding.shardings_from_rules(tree, mesh, [("in_2", "fsdp")])
  assert out["params"]["unet"]["in_2"]["kernel"].spec == P(None, "fsdp")
  assert out["ema"]["unet"]["in_2"]["kernel"].spec == P(None, "fsdp")
  assert out["params"]["unet"]["out_2"]["kernel"].spec == P()
  out = sharding.shardings_from_rules(tree, mesh, sharding.DATA_PARALLEL)
  assert all(s.spec == P() for s in jax.tree.leaves(out))


@pytest.mark.parametrize("rules, match", [
    ([(".*", "tensor")], "unknown strategy 'tensor'"),
    ([("(", "fsdp")], "bad regex"),
    ([("x",)], "not a \\(regex, strategy\\) pair"),
])
def test_rules_rejects_bad_config(rules, match):
  mesh = sharding.make_mesh([("fsdp", 8)])
  with pytest.raises(ValueError, match=match):
    sharding.shardings_from_rules({"w": jnp.zeros(4)}, mesh, rules)


def test_paths_through_optax_state_and_dataclasses(unet):
  mesh = sharding.make_mesh([("fsdp", 8)])
  params = build.param_shapes(unet)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-4))
  state = {"params": {"unet": params}, "ema": {"unet": params},
           "opt_state": jax.eval_shape(tx.init, {"unet": params}), "step": 0}
  seen = {}

  def record(path, leaf):
    seen[formatting.path_str(path)] = leaf
  jax.tree_util.tree_map_with_path(record, state)
  kernel = "unet/input_blocks_1_0/in_layers_2/kernel"
  assert f"params/{kernel}" in seen and f"ema/{kernel}" in seen
  assert f"opt_state/1/0/mu/{kernel}" in seen
  assert f"opt_state/1/0/nu/{kernel}" in seen
  assert "opt_state/1/0/count" in seen

  out = sharding.shardings_from_rules(
      state, mesh, [(r"^ema/", "replicate"), (".*", "fsdp")], min_size=0)
  assert jax.tree.structure(out) == jax.tree.structure(state)
  mu = out["opt_state"][1][0].mu["unet"]["input_blocks_1_0"]["in_layers_2"]
  assert mu["kernel"].spec == P(None, None, None, "fsdp")
  assert out["opt_state"][1][0].count.spec == P()
  assert out["ema"]["unet"]["input_blocks_1_0"]["in_layers_2"][
      "kernel"].spec == P()
  assert out["step"].spec == P()


# --- the real UNet, born sharded ---------------------------------------------
# One jitted init and two jitted applies: the UNet's CPU compile dominates the
# runtime of this file, so the module-scoped fixture compiles the init once.


@pytest.fixture(scope="module")
def born_sharded(unet):
  mesh = sharding.make_mesh([("fsdp", 8)])
  abstract = build.param_shapes(unet)
  # The tiny UNet's kernels are mostly < 2**14 elements; shard all but biases.
  shardings = sharding.shardings_from_rules(abstract, mesh, sharding.FSDP,
                                            min_size=256)
  params = jax.jit(lambda: build.init_params(unet, jax.random.key(0)),
                   out_shardings=shardings)()
  return mesh, abstract, shardings, params


def test_unet_params_born_sharded(born_sharded):
  mesh, abstract, shardings, params = born_sharded
  assert jax.tree.structure(params) == jax.tree.structure(abstract)
  got = jax.tree.map(lambda x: x.sharding, params)
  assert jax.tree.leaves(got) == jax.tree.leaves(shardings)
  kernel = params["input_blocks_3_0"]["in_layers_2"]["kernel"]  # (3,3,32,64)
  assert kernel.sharding.spec == P(None, None, None, "fsdp")
  shard_shapes = [s.data.shape for s in kernel.addressable_shards]
  assert shard_shapes == [(3, 3, 32, 8)] * 8
  assert params["out_2"]["bias"].sharding.spec == P()  # 3 elements.

  full = jax.device_put(jax.device_get(params), sharding.replicated(mesh))
  full_bytes = sharding.per_device_bytes(full)
  assert full_bytes == 703363 * 4  # Every float32 parameter of the tiny UNet.
  sharded_bytes = sharding.per_device_bytes(params)
  assert sharded_bytes <= 0.2 * full_bytes, (sharded_bytes, full_bytes)
  assert sharded_bytes == sum(
      np.prod(s.shard_shape(x.shape)) * 4
      for s, x in zip(jax.tree.leaves(shardings), jax.tree.leaves(abstract)))


def test_unet_sharded_apply_matches_unsharded(unet, born_sharded):
  mesh, _, _, params = born_sharded
  x = np.asarray(jax.random.normal(jax.random.key(1), (16, 8, 8, 6)))
  t = np.arange(16, dtype=np.int32) * 60
  batch = sharding.global_batch({"x": x, "t": t}, mesh)
  apply = jax.jit(unet.apply)
  out = apply({"params": params}, batch["x"], batch["t"])
  assert out.shape == (16, 8, 8, 3)
  assert out.sharding.is_equivalent_to(sharding.batch_sharding(mesh), 4)
  # Host copies: the reference runs on one device, with nothing sharded.
  want = apply({"params": jax.device_get(params)}, x, t)
  assert len(want.sharding.device_set) == 1
  np.testing.assert_allclose(out, want, atol=1e-5, rtol=0)


def test_describe_unet(born_sharded):
  _, abstract, shardings, params = born_sharded
  lines = sharding.describe(shardings, abstract, top=3).splitlines()
  assert len(lines) == 5
  assert lines[0].split() == ["leaf", "shape", "spec", "per", "device"]
  assert lines[1].split() == [
      "output_blocks_0_0/in_layers_2/kernel", "(3,", "3,", "128,", "64)",
      "(None,", "None,", "fsdp,", "None)", "36.0", "KiB"]
  assert lines[2].startswith("output_blocks_1_0/in_layers_2/kernel ")
  local = formatting.human_bytes(sharding.per_device_bytes(params))
  assert lines[-1] == (f"128 leaves: 2.7 MiB in total, {local} per device "
                       f"({sharding.per_device_bytes(params) / 2813452:.1%})")
  table = sharding.describe(
      sharding.shardings_from_rules(abstract, born_sharded[0],
                                    sharding.DATA_PARALLEL), abstract, top=1)
  assert "replicated" in table.splitlines()[1]
  assert table.endswith("2.7 MiB per device (100.0%)")


def test_fmt_bytes():
  sizes = (0, 1023, 1536, 3 * 2**20, 2**42)
  assert [formatting.human_bytes(n) for n in sizes] == [
      "0 B", "1023 B", "1.5 KiB", "3.0 MiB", "4.0 TiB"]


_FAILING_PROCESS = r"""
import sys
from segldm_jax import errors
from segldm_jax.config import cli
from segldm_jax.runtime import distributed, peers

@cli.main_exits
def main(port, me, bad):
  distributed.maybe_initialize_distributed(f"127.0.0.1:{port}", 2, me,
                                        heartbeat_timeout_s=60)
  peers.watch_peers(60, sys.argv[4], ["train.py"])
  if me == bad:
    raise errors.InputError("a corrupt image in this process's shard")
  distributed.barrier("waits for the failed process", timeout_s=300)
  return 0

sys.exit(main(*map(int, sys.argv[1:4])))
"""


@pytest.mark.parametrize("bad", [0, 1], ids=["coordinator", "worker"])
def test_an_error_in_one_process_ends_both_at_once(bad, tmp_path):
  """A user error in one process of two ends both in seconds, each with one
  line, instead of both waiting in jax's shutdown and barriers (and the
  60 s heartbeat, which a live process never trips)."""
  port = free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-c", _FAILING_PROCESS, str(port), str(me),
       str(bad), str(tmp_path / "checkpoints")],
      stderr=subprocess.PIPE, text=True) for me in (0, 1)]
  start = time.monotonic()
  errs = [p.communicate(timeout=50)[1] for p in procs]
  assert time.monotonic() - start < 45  # < the 60 s heartbeat timeout
  assert [p.returncode for p in procs] == [1, 1]
  last = [e.strip().splitlines()[-1] for e in errs]
  assert last[bad] == "error: a corrupt image in this process's shard"
  assert last[1 - bad] == (
      f"error: process {bad} of 2 stopped on its own error (a corrupt image "
      "in this process's shard); no checkpoint was completed in "
      f"{tmp_path / 'checkpoints'}")
