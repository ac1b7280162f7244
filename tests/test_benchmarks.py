"""The benchmark's FLOP counter, and the benchmark itself as a smoke run.

Nothing here is timed: speed lives in BENCHMARKS.md.
"""

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp

from benchmarks import flops
from segldm_jax.models import winograd

ROOT = pathlib.Path(__file__).parents[1]


def _conv(x, w):
  return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def test_analytic_flops_of_a_conv_and_a_matmul():
  x, w = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 5))
  assert flops.analytic_flops(_conv, x, w) == 2 * (2 * 8 * 8 * 5) * (3 * 3 * 4)
  a, b = jnp.ones((6, 3, 4)), jnp.ones((6, 4, 5))  # batched, as attention
  assert flops.analytic_flops(jnp.matmul, a, b) == 2 * 6 * 3 * 5 * 4


def test_analytic_flops_follow_grad_and_scan():
  x, w = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 5))
  fwd = flops.analytic_flops(_conv, x, w)
  # The backward pass: one conv for d/dx and one for d/dw, each as big.
  loss = lambda x, w: _conv(x, w).sum()
  assert flops.analytic_flops(jax.grad(loss, argnums=(0, 1)), x, w) == 3 * fwd

  def three(x, w):
    return jax.lax.scan(lambda c, _: (c, _conv(c, w)), x, None, length=3)[1]
  assert flops.analytic_flops(three, x, w) == 3 * fwd


def test_a_winograd_convolution_counts_as_the_convolution_it_computes():
  x, w = jnp.ones((2, 8, 8, 64)), jnp.ones((3, 3, 64, 32))
  direct = flops.analytic_flops(_conv, x, w)
  assert flops.analytic_flops(winograd.conv3x3, x, w) == direct
  # As compiled: 16 products per 2x2 tile instead of 36, plus the kernel
  # transform's two small matrix products.
  kernel_transform = 2 * (4 * 3 * 64 * 32 * 3 + 4 * 4 * 64 * 32 * 3)
  assert (flops.analytic_flops(winograd.conv3x3, x, w, model=False)
          == direct * 16 // 36 + kernel_transform)
  # Its backward pass is the direct convolution's.
  loss = lambda x, w: winograd.conv3x3(x, w).sum()
  assert flops.analytic_flops(jax.grad(loss, (0, 1)), x, w) == 3 * direct


def test_benchmark_smoke_run_reports_flops_and_memory():
  r = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks/bench.py"), "--size", "tiny",
       "--batch", "1", "--ddim_steps", "2", "--smoke"],
      capture_output=True, text=True, timeout=600, check=True)
  report = json.loads(r.stdout)
  info = report["workers"]["jax"]
  assert set(info["compile_s"]) == {"train", "ddim", "encode", "decode"}
  # Two independent counts of the same program agree.
  ratio = info["flops_train_xla"] / info["flops_train_analytic"]
  assert 0.9 < ratio < 1.1, ratio
  assert info["flops_train_model"] >= info["flops_train_analytic"]
  assert report["memory"]["jax"]["peak_rss_bytes"] > 2**20
  assert report["peak_flops"] > 0 and "FLOP/cycle" in report["peak_assumed"]
