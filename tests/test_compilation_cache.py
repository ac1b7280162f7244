"""The persistent compilation cache: where it lives, off, and read back."""

import os
import pathlib
import subprocess
import sys

from segldm_jax.runtime import compilation_cache

ROOT = pathlib.Path(__file__).parents[1]

# Compiles one program, forgets it, compiles it again: the second comes from
# the cache folder (in a fresh process, since the cache is set up once).
_SCRIPT = """
import sys
import jax, jax.numpy as jnp, numpy as np
from segldm_jax.runtime import compilation_cache
where = compilation_cache.setup(sys.argv[1] if len(sys.argv) > 1 else None)
f = lambda x: jnp.sin(x) @ x.T
x = np.ones((8, 8), np.float32)
jax.jit(f)(x).block_until_ready()
jax.clear_caches()
jax.jit(f)(x).block_until_ready()
print(repr(where), compilation_cache.stats())
"""


def _run(env, *args):
  r = subprocess.run([sys.executable, "-c", _SCRIPT, *args], env=env,
                     cwd=ROOT, capture_output=True, text=True, timeout=120,
                     check=True)
  return r.stdout.strip()


def _env(tmp_path):
  env = {k: v for k, v in os.environ.items()
         if not k.startswith("JAX_COMPILATION_CACHE")}
  env.update(XDG_CACHE_HOME=str(tmp_path / "xdg"), PYTHONPATH=str(ROOT),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  return env


def test_default_folder_is_in_the_user_cache_and_a_recompile_hits(tmp_path):
  out = _run(_env(tmp_path))
  where = tmp_path / "xdg" / "segldm_jax" / "jax_cache"
  assert out == f"'{where}' {{'requests': 2, 'hits': 1}}"
  assert any(where.iterdir())


def test_a_config_folder_moves_it_and_empty_turns_it_off(tmp_path):
  env = _env(tmp_path)
  assert _run(env, str(tmp_path / "c")) == (
      f"'{tmp_path / 'c'}' {{'requests': 2, 'hits': 1}}")
  assert _run(env, "") == "'' {'requests': 0, 'hits': 0}"
  assert not (tmp_path / "xdg").exists()


def test_tests_never_use_the_home_cache():
  assert not str(compilation_cache.default_dir()).startswith(
      str(pathlib.Path.home() / ".cache"))
