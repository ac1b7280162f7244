r"""Where F(2x2, 3x3) Winograd beats the direct convolution on this CPU.

Times every 3x3 convolution shape of the demo UNet at batch 8, direct (XLA's
convolution, XNNPACK) against segldm_jax.models.winograd.conv3x3, then the
whole UNet forward with the thresholds in winograd.py and with the path off.
Each figure is the median of 10 runs of 20 calls chained in a lax.scan (the
parameters are loop invariants there, so the kernel transform is hoisted, as
in a sampling loop). These numbers chose MIN_SIDE and MIN_IN_CHANNELS.

  python benchmarks/winograd_layers.py
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                ".."))

from segldm_jax.runtime import xla_cpu  # pylint: disable=g-import-not-at-top

xla_cpu.use_xnnpack_convolutions()

import jax  # pylint: disable=g-import-not-at-top
from jax import lax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from segldm_jax.models import build  # pylint: disable=g-import-not-at-top
from segldm_jax.models import winograd  # pylint: disable=g-import-not-at-top

CHAIN = 20
# (side, in channels, out channels, how many in the demo UNet forward)
DEMO_SHAPES = [(16, 64, 64, 3), (16, 192, 64, 1), (16, 128, 64, 1),
               (16, 128, 128, 1), (8, 64, 128, 1), (8, 128, 128, 5),
               (8, 256, 128, 1), (8, 192, 128, 1), (4, 128, 128, 8),
               (4, 256, 128, 2)]


def _chained(f):
  """f(x, w) 20 times, each input depending on the last output."""
  def run(x, w):
    def body(c, _):
      return jnp.mean(f(x + c, w)) * 1e-9, None
    return lax.scan(body, jnp.zeros((), x.dtype), None, length=CHAIN)[0]
  return jax.jit(run)


def _ms_per_call(f, *args, runs=10):
  jax.block_until_ready(f(*args))
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - t0)
  return 1e3 * float(np.median(times)) / CHAIN


def _direct(x, w):
  return lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


def layers(batch=8):
  print(f"| map | in -> out | n | direct ms | Winograd ms | speed-up | "
        f"taken |\n|---|---|---|---|---|---|---|")
  rng = np.random.default_rng(0)
  totals = [0.0, 0.0]
  for side, cin, cout, n in DEMO_SHAPES:
    x = jnp.asarray(rng.standard_normal((batch, side, side, cin)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, cin, cout)), jnp.float32)
    d = _ms_per_call(_chained(_direct), x, w)
    f = _ms_per_call(_chained(winograd.conv3x3), x, w)
    taken = winograd.worthwhile(x.shape, w.shape)
    totals[0] += n * d
    totals[1] += n * (f if taken else d)
    print(f"| {side}x{side} | {cin} -> {cout} | {n} | {d:.3f} | {f:.3f} | "
          f"{d / f:.2f}x | {'yes' if taken else 'no'} |")
  print(f"\n3x3 convolutions of one forward (stride 1): direct "
        f"{totals[0]:.1f} ms, as taken {totals[1]:.1f} ms")


def unet_forward(batch=8, repeats=15):
  """The demo UNet forward, Winograd as taken vs off, alternating."""
  from benchmarks import bench  # pylint: disable=g-import-not-at-top
  config = bench.size_config("demo")
  ldm = build.build_model(config.model, dtype=jnp.float32,
                          conv=xla_cpu.preferred_conv())
  key = jax.random.key(0)
  params = build.init_params(ldm.unet, key)
  params = jax.tree.map(lambda a: a + 0.02 * jax.random.normal(key, a.shape),
                        params)  # no zero kernels
  x = jax.random.normal(key, (batch, 16, 16, config.model.params.unet_config
                                   .params.in_channels))
  t = jnp.full((batch,), 500)
  fns, outs = {}, {}
  min_cin = winograd.MIN_IN_CHANNELS
  for name, threshold in (("direct", 10**9), ("as taken", min_cin)):
    winograd.MIN_IN_CHANNELS = threshold  # read when the UNet is traced

    def forward(p, x, t):
      return ldm.unet.apply({"params": p}, x, t)

    def chained(p, x, t, forward=forward):
      def body(c, _):
        return jnp.mean(forward(p, x + c, t)) * 1e-9, None
      return lax.scan(body, jnp.zeros(()), None, length=CHAIN)[0]
    fns[name] = jax.jit(chained).lower(params, x, t).compile()
    outs[name] = np.asarray(jax.jit(forward)(params, x, t))
  winograd.MIN_IN_CHANNELS = min_cin
  times = {name: [] for name in fns}
  for r in range(repeats):
    for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
      t0 = time.perf_counter()
      jax.block_until_ready(fns[name](params, x, t))
      times[name].append(1e3 * (time.perf_counter() - t0) / CHAIN)
  for name, ts in times.items():
    print(f"UNet forward, batch {batch}, {name}: {np.median(ts):.2f} ms "
          f"[{min(ts):.2f}-{max(ts):.2f}]")
  print(f"largest output difference: "
        f"{np.abs(outs['direct'] - outs['as taken']).max():.1e} "
        f"(outputs up to {np.abs(outs['direct']).max():.2f})")


if __name__ == "__main__":
  layers()
  print()
  unet_forward()
