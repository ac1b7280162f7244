"""Content hashes of saved arrays, so a checkpoint that changed on disk is
refused (or skipped, when resuming) naming the array, never used.

Each array's hash is a sum modulo 2**32 over its elements of
`fmix32(word + index * 0x9E3779B9)`: `word` is the element's bits
(zero-extended to 32; 8-byte elements, numpy only, count as two words) and
`index` its position in C order. fmix32 (MurmurHash3's finaliser) is a
bijection, so a change to any one element always changes the hash; several
changes collide with chance 2**-32. Unlike a CRC of the bytes, the sum does
not care how the array is split: it is computed where the array lives, by a
jitted reduction on accelerators (sharded arrays too, over every process,
with no gather), or in numpy chunks for host and CPU arrays. Both give the
same number for the same values.

The manifest is `{"format": ..., "arrays": {"params/unet/...": "89abcdef"}}`,
saved as an orbax item of each train step and as `manifest.json` in a model
directory.
"""

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from segldm_jax import formatting

FORMAT = "fmix32-sum/1"
_GOLDEN = 0x9E3779B9
_CHUNK = 1 << 16  # numpy elements hashed at a time: temporaries stay in cache


def _fmix(h, xp):
  h = h ^ (h >> xp.uint32(16))
  h = h * xp.uint32(0x85EBCA6B)
  h = h ^ (h >> xp.uint32(13))
  h = h * xp.uint32(0xC2B2AE35)
  return h ^ (h >> xp.uint32(16))


def _jax_hash(x: jax.Array) -> jax.Array:
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  itemsize = jnp.dtype(x.dtype).itemsize
  if itemsize not in (1, 2, 4):
    raise TypeError(f"no on-device hash for {x.dtype}")
  words = jax.lax.bitcast_convert_type(
      x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[itemsize])
  words = words.astype(jnp.uint32)
  # The C-order index from one iota per axis: no reshape, which would move
  # the shards of an array split over a trailing axis.
  index = jnp.zeros(x.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(x.ndim)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis) * jnp.uint32(
        stride % 2**32)
    stride *= x.shape[axis]
  return jnp.sum(_fmix(words + index * jnp.uint32(_GOLDEN), jnp),
                 dtype=jnp.uint32)


# One program per shape, dtype and sharding (a train state has a few dozen
# of each), not one for the whole tree: XLA compiles hundreds of reductions
# in one program slowly (BENCHMARKS.md, "content manifests").
_jax_hash_jit = jax.jit(_jax_hash)


def numpy_hash(x: Any) -> int:
  """The hash of one host array (any numeric dtype), in bounded chunks."""
  x = np.ascontiguousarray(x)
  if x.dtype == np.bool_:
    x = x.view(np.uint8)
  if x.dtype.itemsize in (1, 2, 4):
    words = x.reshape(-1).view(f"u{x.dtype.itemsize}")
  else:
    words = x.reshape(-1).view(np.uint8).view("<u4")
  total = np.uint32(0)
  with np.errstate(over="ignore"):
    for start in range(0, words.size, _CHUNK):
      chunk = words[start:start + _CHUNK].astype(np.uint32)
      index = np.arange(start, start + chunk.size, dtype=np.uint64).astype(
          np.uint32)
      h = _fmix(chunk + index * np.uint32(_GOLDEN), np)
      total = np.uint32(total + np.sum(h, dtype=np.uint32))
  return int(total)


def _host_copy(x: Any) -> np.ndarray | None:
  """`x` as a host array when that costs no device transfer: numpy values,
  and jax arrays on CPU whose every value this process holds. None: hash
  it on its devices (accelerators; arrays split over processes)."""
  if not isinstance(x, jax.Array):
    return np.asarray(x)
  if np.dtype(x.dtype).itemsize > 4 or x.sharding.device_set and next(
      iter(x.sharding.device_set)).platform == "cpu":
    if x.is_fully_addressable:
      return np.asarray(x)
    if x.is_fully_replicated:
      return np.asarray(x.addressable_shards[0].data)
  return None


def hashes(tree: Any) -> dict[str, str]:
  """{'a/b/c': '89abcdef'} for every array leaf of `tree` (a dict of items).

  On CPU the arrays are hashed in numpy where they lie (no compile: a few
  dozen programs cost seconds to build there); on accelerators on their
  devices, one small program per shape, and so are arrays split over
  processes (a collective: every process calls this).
  """
  out, on_device = {}, {}
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    name = formatting.path_str(path)
    host = _host_copy(x)
    if host is None:
      on_device[name] = _jax_hash_jit(x)
    else:
      out[name] = f"{numpy_hash(host):08x}"
  out.update({name: f"{int(h):08x}"
              for name, h in jax.device_get(on_device).items()})
  return {name: out[name] for name in sorted(out)}


def make(tree: Any) -> dict:
  """The manifest of a dict of items (e.g. {'params': ..., 'opt_state': ...})."""
  return {"format": FORMAT, "arrays": hashes(tree)}


def first_mismatch(saved: Mapping[str, Any], tree: Any
                   ) -> tuple[str, str, str] | None:
  """(array, saved hash, hash now) of the first array of `tree` whose hash
  differs from manifest `saved`; None when all match. Arrays the manifest
  does not list (or a manifest of another format) are not checked."""
  if not isinstance(saved, Mapping) or saved.get("format") != FORMAT:
    return None
  listed = saved.get("arrays") or {}
  now = hashes(tree)
  for name, value in now.items():
    if name in listed and listed[name] != value:
      return name, listed[name], value
  return None
