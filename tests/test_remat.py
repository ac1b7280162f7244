"""train.remat, bf16 compute and the chunked frozen encoder in the train step.

Memory figures of the full-size model live in BENCHMARKS.md
(benchmarks/memory.py); here: the same parameters and update with and
without remat, fewer activations kept with it, and the UNet really
computing in bf16.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from benchmarks import memory
from configs import seg_f4
from segldm_jax.config import run_config
from segldm_jax.models import build
from segldm_jax.training import ldm_step

CFG = {"base_learning_rate": 1e-4, "batch_size": 4, "ema_decay": 0.9999}


def _random_params(module, rs):
  # Random values of the module's shapes, without compiling an init.
  return jax.tree.map(
      lambda a: (0.1 * rs.standard_normal(a.shape)).astype(a.dtype),
      build.param_shapes(module))


@functools.cache
def _model_and_inputs():
  ldm = build.build_model(build.load_model_config("tests/fixtures/ldm_tiny.yaml"))
  rs = np.random.RandomState(1)
  params = {"unet": _random_params(ldm.unet, rs),
            "cond_stage": _random_params(ldm.cond_stage, rs)}
  batch = {"image": rs.randint(0, 256, (4, 32, 32, 3), dtype=np.uint8),
           "labels": rs.randint(0, 5, (4, 32, 32), dtype=np.uint8)}
  return ldm, params, _random_params(ldm.first_stage, rs), batch


@functools.cache
def _compiled(remat: str, encode_chunks: int = 1):
  ldm, params, fs, batch = _model_and_inputs()
  cfg = dict(CFG, remat=remat, encode_chunks=encode_chunks)
  opt = ldm_step.make_optimizer(cfg)
  state = ldm_step.init_state(params, opt)
  step = jax.jit(ldm_step.make_train_step(ldm, opt, cfg))
  return step(state, batch, fs, jax.random.key(5))


def test_remat_keeps_the_parameter_tree():
  # The same paths and shapes: checkpoints and the converter see the same
  # model whatever the policy.
  unet = _model_and_inputs()[0].unet
  plain = build.param_shapes(unet)
  for remat in ("block", "dots_saveable"):
    assert build.param_shapes(unet.clone(remat=remat)) == plain


def test_block_remat_gives_the_same_step():
  state_none, m_none = _compiled("none")
  state_block, m_block = _compiled("block")
  # The forward pass is the same float32 program: the same loss, to the bit.
  assert float(m_block["loss"]) == float(m_none["loss"])
  # The backward pass recomputes the same values, but XLA fuses the
  # recomputation with the gradient ops, so a sum may be taken in another
  # order: gradients agree to float32 rounding, not always to the bit.
  np.testing.assert_array_max_ulp(m_block["grad_norm"], m_none["grad_norm"], 2)
  # So compare the gradients, through Adam's first moment (0.1 x the
  # gradient), to a few float32 ulps of the largest gradient: the scale of
  # the terms the sums add up. (Some are rounding noise around an exact 0,
  # e.g. a bias before a GroupNorm; the updated weights divide by
  # sqrt(v) + eps and so amplify exactly those.)
  mu_block, mu_none = (jax.tree.leaves(optax.tree_utils.tree_get(
      s.opt_state, "mu")) for s in (state_block, state_none))
  scale = max(float(np.abs(m).max()) for m in mu_none)
  for a, b in zip(mu_block, mu_none):
    np.testing.assert_allclose(a, b, rtol=2**-20, atol=2**-20 * scale)


def test_remat_keeps_less_for_the_backward_pass():
  ldm, params = _model_and_inputs()[:2]
  kept = {r: memory.unet_residual_bytes(ldm.unet.clone(remat=r),
                                        params["unet"], 4, 32, 6, jnp.float32)
          for r in ("none", "block", "dots_saveable")}
  # Without remat every block's intermediates wait for the backward pass;
  # with "block" only the blocks' inputs (and what lies between blocks);
  # "dots_saveable" keeps the convolution and matmul outputs too.
  assert kept["block"] < 0.2 * kept["none"], kept
  assert kept["block"] < kept["dots_saveable"] < 0.5 * kept["none"], kept


def test_block_remat_frees_the_activations_in_the_compiled_program():
  # XLA:CPU drops jax.checkpoint's optimisation barrier and scheduled every
  # block's recomputation inside the forward pass, so the compiled program
  # kept almost as much with remat as without (19.3 vs 20.9 MB here, bf16);
  # unet._after_its_gradient makes each wait for the backward pass (6.1 MB).
  unet = _model_and_inputs()[0].unet
  x = jax.ShapeDtypeStruct((8, 16, 16, 6), jnp.bfloat16)
  t = jax.ShapeDtypeStruct((8,), jnp.int32)
  temps = {}
  for remat in ("none", "block"):
    net = unet.clone(remat=remat, dtype=jnp.bfloat16)

    def loss(p, x, t, net=net):
      out = net.apply({"params": p}, x, t, True)
      return jnp.sum(out.astype(jnp.float32) ** 2)
    compiled = jax.jit(jax.grad(loss)).lower(build.param_shapes(net), x,
                                             t).compile()
    temps[remat] = compiled.memory_analysis().temp_size_in_bytes
  assert temps["block"] < 0.5 * temps["none"], temps


def test_bf16_weight_casts_after_the_latents_are_the_plain_casts():
  # ldm_step._cast_after multiplies by a 1 made from the latents (a
  # scheduling constraint on CPU): the weights must come out bit for bit,
  # signed zeros included.
  params = {"w": jnp.asarray([1.5, -0.0, 3e-8, -1e30, 0.1], jnp.float32)}
  z = jnp.asarray([[0.25, -2.0]], jnp.float32)
  cast = jax.jit(ldm_step._cast_after, static_argnums=2)(
      z, params, jnp.bfloat16)
  np.testing.assert_array_equal(
      np.asarray(cast["w"]).view(np.uint16),
      np.asarray(params["w"].astype(jnp.bfloat16)).view(np.uint16))
  assert ldm_step._cast_after(z, params, jnp.float32) is params


def test_chunked_encoder_gives_the_same_latents():
  ldm, _, fs, batch = _model_and_inputs()
  image = batch["image"].astype(np.float32) / 127.5 - 1.0
  whole = jax.jit(ldm.encode)(fs, image)
  chunked = jax.jit(functools.partial(ldm_step.encode_in_chunks, ldm,
                                      chunks=2))(fs, image)
  # Each image is encoded alone either way; the batch size of the
  # convolutions may change their float32 summation order.
  np.testing.assert_allclose(chunked, whole, rtol=0, atol=1e-5)
  order = ldm_step.micro_batches(jnp.arange(8), 2)
  np.testing.assert_array_equal(order, [[0, 2, 4, 6], [1, 3, 5, 7]])


def _conv_dtypes(closed_jaxpr):
  """Input dtypes of every convolution in a jaxpr, nested ones included."""
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "conv_general_dilated":
        found.append(str(eqn.invars[0].aval.dtype))
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)
  walk(closed_jaxpr.jaxpr)
  return found


def test_bfloat16_step_runs_the_unet_convolutions_in_bfloat16():
  ldm, params, fs, batch = _model_and_inputs()
  cfg = dict(CFG, compute_dtype="bfloat16")
  opt = ldm_step.make_optimizer(cfg)
  step = ldm_step.make_train_step(ldm, opt, cfg)
  state = ldm_step.init_state(params, opt)
  convs = _conv_dtypes(jax.make_jaxpr(step)(state, batch, fs,
                                            jax.random.key(0)))
  image = jnp.zeros((4, 32, 32, 3))
  encoder = _conv_dtypes(jax.make_jaxpr(ldm.encode)(fs, image))
  # Only the frozen float32 encoder stays in float32; the UNet's forward
  # and backward convolutions (a module built with dtype=float32 used to
  # promote its bf16 inputs back to float32) are all bf16.
  assert convs.count("float32") == len(encoder)
  assert convs.count("bfloat16") >= 3 * len(
      _conv_dtypes(jax.make_jaxpr(ldm.unet.apply)(
          {"params": params["unet"]}, jnp.zeros((1, 8, 8, 6)),
          jnp.zeros((1,), jnp.int32))))


@pytest.mark.parametrize("key,value,message", [
    ("remat", "all", "train.remat='all'; use one of none, block, "
     "dots_saveable (block: least memory, none: fastest)"),
    ("encode_chunks", 3, "train.encode_chunks=3 must be a positive divisor "
     "of train.batch_size=8"),
])
def test_bad_memory_settings_name_the_key(key, value, message):
  config = seg_f4.get_config("tiny")
  config.data.source = "synthetic"
  config.first_stage.allow_random_init = True
  config.train.batch_size = 8
  config.train[key] = value
  with pytest.raises(run_config.ConfigError) as e:
    run_config.validate(config)
  assert str(e.value) == message
