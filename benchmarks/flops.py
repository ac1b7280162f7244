"""FLOPs of a JAX function: XLA's cost analysis and an analytic count.

The analytic count reads the jaxpr (after autodiff, so a train step's
backward pass is in it) and counts only convolutions and matrix products
(attention included): 2 FLOPs per multiply-add, from the shapes alone. It
is the convention MFU is quoted in. XLA's figure adds the elementwise work
(norms, activations, the optimiser) but skips the multiplications a padded
convolution border makes by zero; on our train steps the two agree to ~10%.

A Winograd convolution (segldm_jax/models/winograd.py) does 16/36 of the
direct algorithm's multiplications. `model=True` counts it as the
convolution it computes (model FLOPs, what MFU is quoted in);
`model=False` counts what the program does, to compare with XLA's figure.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
from jax.extend import core as jex_core

from segldm_jax.models import winograd


def _conv_flops(eqn) -> int:
  lhs, rhs = (v.aval for v in eqn.invars[:2])
  out = eqn.outvars[0].aval
  rhs_out_dim = eqn.params["dimension_numbers"].rhs_spec[0]
  macs_per_output = math.prod(rhs.shape) // rhs.shape[rhs_out_dim]
  del lhs
  return 2 * math.prod(out.shape) * macs_per_output


def _dot_flops(eqn) -> int:
  lhs = eqn.invars[0].aval
  (contract, _), _ = eqn.params["dimension_numbers"]
  out = eqn.outvars[0].aval
  return 2 * math.prod(out.shape) * math.prod(lhs.shape[d] for d in contract)


def _jaxprs_in(params: dict[str, Any]):
  for value in params.values():
    for v in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(v, jex_core.ClosedJaxpr):
        yield v.jaxpr
      elif isinstance(v, jex_core.Jaxpr):
        yield v


def _winograd_as_direct_flops(eqn) -> int:
  in_channels = eqn.invars[0].aval.shape[-1]
  return 2 * math.prod(eqn.outvars[0].aval.shape) * 9 * in_channels


def count_jaxpr(jaxpr, model: bool = True) -> int:
  """Convolution and dot FLOPs of a jaxpr, through calls, scans and conds."""
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if model and eqn.params.get("name") == winograd.winograd_conv3x3.__name__:
      total += _winograd_as_direct_flops(eqn)
    elif name == "conv_general_dilated":
      total += _conv_flops(eqn)
    elif name == "dot_general":
      total += _dot_flops(eqn)
    elif name == "cond":  # the most expensive branch
      total += max(count_jaxpr(b.jaxpr, model)
                   for b in eqn.params["branches"])
    else:
      inner = sum(count_jaxpr(j, model) for j in _jaxprs_in(eqn.params))
      total += inner * (eqn.params["length"] if name == "scan" else 1)
  return total


def analytic_flops(fn: Callable, *args, model: bool = True, **kwargs) -> int:
  """Convolution + matmul FLOPs of one call of `fn(*args, **kwargs)`."""
  return count_jaxpr(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr, model)


def xla_flops(compiled: jax.stages.Compiled) -> float:
  """XLA's own count for a compiled program (a while loop's body counts
  once: compare on loop-free programs)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per module
    cost = cost[0]
  return float(cost.get("flops", float("nan")))
