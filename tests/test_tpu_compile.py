"""train.py's programs compiled for a TPU slice on this CPU (libtpu, no TPU).

Slow tier: one compile of the tiny model for v5e:2x2 takes 1-5 minutes on
2 cores. It needs libtpu (`pip install -e ".[tpu]"`), which CI does not
install (~700 MB installed, for a compiler no other test uses), so there it
is skipped, saying so.
"""

import importlib.util
import math

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                       reason="libtpu is not installed (pip install -e "
                       "\".[tpu]\"); CI does not install it"),
]


def test_fsdp_step_for_v5e_2x2_holds_a_quarter_of_the_state_per_chip():
  import jax

  from benchmarks import memory, tpu_compile
  from segldm_jax.runtime import sharding

  devices, chip = tpu_compile.slice_devices("v5e:2x2")
  assert len(devices) == 4 and chip.name == "v5e"
  config = tpu_compile.load_config("tiny")
  with config.unlocked():
    config.mesh, config.sharding_strategy = tpu_compile.strategy_settings(
        "fsdp")
    config.train.compute_dtype = "bfloat16"
  mesh = sharding.make_mesh(config.mesh, devices=devices)
  assert dict(mesh.shape) == {"data": 1, "fsdp": 4}

  # Global batch 8: 2 images per chip.
  r, extra = tpu_compile.train_once(config, mesh, chip, 4, 2, "none")

  state = jax.tree.leaves(extra["state"])
  # The compiled program's own shardings of the state, not just the ones
  # asked for: XLA kept them (a replicated copy would show here).
  compiled = jax.tree.leaves(
      extra["compiled"].input_shardings[0][0],
      is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
  assert len(compiled) == len(state)
  sharded = [(x, s) for x, s in zip(state, compiled)
             if not s.is_fully_replicated]
  total = sum(x.size * x.dtype.itemsize for x, _ in sharded)
  per_chip = sum(math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
                 for x, s in sharded)
  assert per_chip * 4 == total  # a quarter on each chip, nothing padded
  # Every leaf the rules could split is split: only the small ones (biases,
  # norms: under 2**14 elements) stay whole.
  whole = [x for x, s in zip(state, compiled) if s.is_fully_replicated]
  assert all(x.size < 2**14 for x in whole)
  assert total > 0.75 * memory.nbytes(extra["state"])
  # The per-chip split the script prints adds up to the same.
  split = r["state"]
  replicated = sum(x.size * x.dtype.itemsize for x in whole)
  assert (split["params"] + split["optimizer"] + split["ema"]
          + 3 * 4 == per_chip + replicated)  # + step, ema_updates, skipped
  # The donated state is reused for the new one, and it all fits.
  assert r["memory"]["aliased"] > 0
  assert r["memory"]["fits"] and 0 < r["memory"]["peak_on_chip"] < 0.2e9
  # FSDP gathers the parameters for compute and reduce-scatters their
  # gradients; no activation moves between chips.
  coll = r["collectives"]
  assert coll["all-gather"]["bytes"] > 0 and coll["reduce-scatter"]["bytes"] > 0
  assert "all-to-all" not in coll and "collective-permute" not in coll, coll
  assert r["flops"] > 0 and r["bytes_accessed"] > 0
  assert 0.8 < r["flops"] / r["analytic_model_flops"] < 1.3
  # The frozen encoder is its own program: batch-parallel, no collective,
  # and a train step as train.py runs it is the two together.
  enc, both = r["encode"], r["together"]
  assert not any(isinstance(v, dict) for v in enc["collectives"].values())
  assert 0.8 < enc["flops"] / enc["analytic_model_flops"] < 1.3
  assert both["flops"] == r["flops"] + enc["flops"]
  assert both["peak_on_chip"] == max(r["memory"]["peak_on_chip"],
                                     enc["memory"]["peak_on_chip"])
