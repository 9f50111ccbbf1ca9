"""The persistent compilation cache: on after other programs compiled, written, and reused."""

import os
import subprocess
import sys

PROGRAM = """
import sys, time
import jax, jax.numpy as jnp
jax.jit(jnp.cos)(1.0).block_until_ready()  # a program compiled before the cache is on
from prerl_jax.training import caches
caches.enable_compilation_cache(min_compile_seconds=0.0)
f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum(axis=0) * 3.0)
f(jnp.ones((96, 96))).block_until_ready()
"""


def _run(env):
  return subprocess.run([sys.executable, "-c", PROGRAM], env=env, check=True, timeout=120)


def test_compiled_programs_land_in_the_cache_under_prerl_jax_cache(tmp_path):
  env = {**os.environ, "PRERL_JAX_CACHE": str(tmp_path), "XLA_FLAGS": "",
         "JAX_PLATFORMS": "cpu"}
  _run(env)
  entries = sorted(os.listdir(tmp_path / "xla"))
  assert any(name.startswith("jit__lambda") for name in entries), entries
  before = {name: os.path.getmtime(tmp_path / "xla" / name) for name in entries}
  _run(env)  # the same programs again: read from the cache, no new entries
  assert sorted(os.listdir(tmp_path / "xla")) == entries
  assert all(os.path.getmtime(tmp_path / "xla" / n) == t for n, t in before.items())
