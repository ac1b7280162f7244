"""The same train step on different meshes computes the same thing.

Runs on the 8 host devices that conftest.py creates, with train.py's two
programs (the frozen encoder, then the step on its latents, FSDP's weights
gathered for compute). Three steps from the same seed and global batch: data=2 x fsdp=4 (the batch split 8 ways, the
gradient reduced over the data axis and reduce-scattered over fsdp) and
fsdp=8 must match one device, and fsdp=8 must hold about 1/8 of the
parameters per device where data=8 holds all of them. Pure data=8 training
is not compiled a fourth time: data=2 x fsdp=4 reduces over a data axis too,
and train.py's default data=8 runs in tests/test_multiprocess.py.
"""

import collections
import functools
import re

import jax
import numpy as np
import pytest

from segldm_jax.models import build
from segldm_jax.runtime import sharding
from segldm_jax.training import ldm_step
from segldm_jax.training import loop

TRAIN = {"base_learning_rate": 1e-4, "batch_size": 8}
MESHES = {"1 device": [("data", 1)], "data=8": [("data", 8), ("fsdp", 1)],
          "data=2 x fsdp=4": [("data", 2), ("fsdp", 4)],
          "fsdp=8": [("data", 1), ("fsdp", 8)]}


@functools.cache
def _model():
  return build.build_model(build.load_model_config("tests/fixtures/ldm_tiny.yaml"))


def _batches():
  rs = np.random.RandomState(0)
  return [{"image": rs.randint(0, 256, (8, 32, 32, 3)).astype(np.uint8),
           "labels": rs.randint(0, 5, (8, 32, 32)).astype(np.uint8)}
          for _ in range(3)]


@functools.cache
def _mesh_and_shardings(mesh_name):
  ldm = _model()
  devices = jax.devices()[:1] if mesh_name == "1 device" else None
  mesh = sharding.make_mesh(MESHES[mesh_name], devices=devices)
  optimizer = ldm_step.make_optimizer(TRAIN)

  def init(rng):
    k1, k2, k3 = jax.random.split(rng, 3)
    params = {"unet": build.init_params(ldm.unet, k1),
              "cond_stage": build.init_params(ldm.cond_stage, k2)}
    return ldm_step.init_state(params, optimizer), build.init_params(
        ldm.first_stage, k3)

  abstract, _ = jax.eval_shape(init, jax.random.key(0))
  shardings = sharding.shardings_from_rules(abstract, mesh, sharding.FSDP,
                                            min_size=0)
  return ldm, mesh, optimizer, init, shardings


@functools.cache
def _initial_state():
  """The state every mesh starts from, on the host: initialised once, then
  placed onto each mesh (born-sharded init is tests/test_parallel.py's; its
  RNG-heavy program took ~40 s to compile here per mesh)."""
  _, _, _, init, _ = _mesh_and_shardings("1 device")
  return jax.device_get(jax.jit(init)(jax.random.key(0)))


@functools.cache
def _programs(mesh_name):
  """train.py's encoder and step for the mesh, jitted as train.py does."""
  ldm, mesh, optimizer, _, shardings = _mesh_and_shardings(mesh_name)
  encode = loop.jit_encoder(ldm_step.make_encoder(ldm, TRAIN), mesh)
  step = loop.jit_train_step(
      ldm_step.make_latent_train_step(
          ldm, optimizer, TRAIN,
          gather_weights=sharding.gathered_for_compute(mesh)),
      mesh, shardings, replicated_args=1)
  return encode, step


@functools.cache
def _train(mesh_name):
  _, mesh, _, _, shardings = _mesh_and_shardings(mesh_name)
  encode, step = _programs(mesh_name)
  rng = jax.random.key(0)
  host_state, host_fs = _initial_state()
  # Fresh device arrays from host values: the step donates its state.
  state = jax.device_put(host_state, shardings)
  fs = jax.device_put(host_fs, sharding.replicated(mesh))
  losses = []
  for batch in _batches():
    batch = loop.encoded(sharding.global_batch(batch, mesh), encode, fs)
    state, metrics = step(state, batch, rng)
    losses.append(float(metrics["loss"]))
  return losses, jax.device_get(state.params), sharding.per_device_bytes(
      state.params)


@pytest.mark.parametrize("mesh_name", ["data=2 x fsdp=4", "fsdp=8"])
def test_mesh_gives_the_single_device_result(mesh_name):
  want_losses, want_params, _ = _train("1 device")
  losses, params, _ = _train(mesh_name)
  np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
  # Adam divides by sqrt(v): near-zero gradients turn reduction-order
  # round-off into ~1e-6 moves; 2e-5 is 5% of one step's size (lr 8e-4).
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want_params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)


def test_fsdp_holds_an_eighth_of_the_parameters_per_device():
  # The same rules on data=8 (fsdp axis of 1): every device holds all of it.
  _, want_params, single = _train("1 device")
  params = _mesh_and_shardings("data=8")[4].params
  replicated = sharding.per_device_bytes(jax.device_put(want_params, params))
  sharded = _train("fsdp=8")[2]
  assert replicated == single
  assert sharded <= 0.14 * replicated, (sharded, replicated)


def test_fsdp_gathers_weights_and_moves_no_activations():
  """FSDP as designed: whole weights gathered for compute, and no layer
  computed on channel-split weights (the all-to-alls and
  collective-permutes that moved activations between devices before
  `gathered_for_compute`). The gradients come back as all-reduces here;
  XLA:TPU makes reduce-scatters of them (tests/test_tpu_compile.py)."""
  state = _initial_state()[0]
  _, step = _programs("fsdp=8")
  ldm = _model()
  key = jax.random.key(0)
  batch = {"latents": jax.ShapeDtypeStruct(
               (8, 8, 8, ldm.latent_channels), np.float32),
           "labels": jax.ShapeDtypeStruct((8, 32, 32), np.uint8)}
  hlo = step.lower(state, batch, key).compile().as_text()
  ops = collections.Counter(re.findall(
      r" (all-gather|reduce-scatter|all-reduce|all-to-all|collective-permute)"
      r"(?:-start)?\(", hlo))
  assert ops["all-gather"] > 0 and ops["all-reduce"] > 0, ops
  assert ops["all-to-all"] == 0 and ops["collective-permute"] == 0, ops
