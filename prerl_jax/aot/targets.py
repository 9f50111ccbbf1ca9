"""Dry-run targets by product name: chips, the devices to compile for, and each chip's peaks.

A TPU target compiles with libtpu's compiler for its real topology
(`jax.experimental.topologies.get_topology_desc`), which needs libtpu installed
(`pip install -e .[tpu-aot]`) but no TPU. A GPU target has no such offline compiler here: it
compiles for as many simulated host CPU devices (XLA:CPU's buffer assignment and fusions stand in
for the GPU compiler's), and every report of it says so.
"""

import dataclasses
import os

import jax

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Target:
  """One slice or host: `chips` chips of one kind with public dense bf16, HBM peaks and size.

  interconnect_bandwidth: bytes/s per chip over the chip-to-chip links, both directions together
  (TPU ICI, GPU NVLink), as the vendors publish it; a collective's per-chip bytes over it give its
  time. The network between hosts of a GPU cluster or slices of a multislice run is not modelled.
  """

  name: str
  chip: str
  chips: int
  topology: str | None  # libtpu topology name; None: compiled for simulated CPU devices.
  bf16_flops: float
  hbm_bandwidth: float
  hbm_bytes: float
  interconnect_bandwidth: float

  @property
  def compiler(self) -> str:
    """"tpu" (libtpu's compiler on the real topology) or "simulated" (XLA:CPU devices)."""
    return "tpu" if self.topology else "simulated"

  @property
  def compile_options(self) -> dict | None:
    """XLA options for compiling this target's programs (None: the compiler's defaults)."""
    # A simulated dry run never executes code: skip LLVM optimization (halves CPU compile time;
    # buffer assignment, and so the memory analysis, is unchanged).
    if self.compiler == "simulated":
      return {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
    return None


_V5P = dict(chip="TPU v5p", bf16_flops=459e12, hbm_bandwidth=2765e9, hbm_bytes=95.74 * GIB,
            interconnect_bandwidth=1200e9)
_V5E = dict(chip="TPU v5e", bf16_flops=197e12, hbm_bandwidth=819e9, hbm_bytes=16 * GIB,
            interconnect_bandwidth=400e9)
_V6E = dict(chip="TPU v6e", bf16_flops=918e12, hbm_bandwidth=1640e9, hbm_bytes=32 * GIB,
            interconnect_bandwidth=800e9)
_H100 = dict(chip="H100 SXM", bf16_flops=989e12, hbm_bandwidth=3350e9, hbm_bytes=80e9,
             interconnect_bandwidth=900e9)
_H200 = dict(chip="H200 SXM", bf16_flops=989e12, hbm_bandwidth=4800e9, hbm_bytes=141e9,
             interconnect_bandwidth=900e9)

# v5p-N counts TensorCores: N / 2 chips (v5p:AxBxC has A*B*C chips); v5e-N and v6e-N are N chips.
TARGETS = {t.name: t for t in (
    Target("v5p-8", chips=4, topology="v5p:2x2x1", **_V5P),
    Target("v5p-16", chips=8, topology="v5p:2x2x2", **_V5P),
    Target("v5p-32", chips=16, topology="v5p:2x2x4", **_V5P),
    Target("v5p-64", chips=32, topology="v5p:2x4x4", **_V5P),
    Target("v5p-128", chips=64, topology="v5p:4x4x4", **_V5P),
    Target("v5e-16", chips=16, topology="v5e:4x4", **_V5E),
    Target("v5e-64", chips=64, topology="v5e:8x8", **_V5E),
    Target("v6e-16", chips=16, topology="v6e:4x4", **_V6E),
    Target("v6e-64", chips=64, topology="v6e:8x8", **_V6E),
    Target("h100x8", chips=8, topology=None, **_H100),
    Target("h200x8", chips=8, topology=None, **_H200),
)}


def get_target(name: str) -> Target:
  """The TARGETS entry of `name`; an unknown name is an error listing the valid ones."""
  if name not in TARGETS:
    raise ValueError(f"--target={name!r} is unknown; valid: {', '.join(TARGETS)}")
  return TARGETS[name]


def target_devices(target: Target) -> list:
  """The devices a dry run compiles for: the TPU topology's, or simulated host CPU devices."""
  if target.topology:
    from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
    # Nothing runs on a TPU here: let several processes load libtpu (its lockfile guards a chip).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
      devices = topologies.get_topology_desc(platform="tpu",
                                             topology_name=target.topology).devices
    except Exception as error:  # pylint: disable=broad-except
      raise ValueError(f"target {target.name} needs libtpu's compiler for topology "
                       f"{target.topology} (pip install -e .[tpu-aot]): {error}") from error
    assert len(devices) == target.chips, (target, len(devices))
    return list(devices)
  devices = jax.devices("cpu")
  if len(devices) < target.chips:
    raise ValueError(
        f"target {target.name} is simulated on {target.chips} CPU devices; {len(devices)} are "
        f"available: set XLA_FLAGS=--xla_force_host_platform_device_count={target.chips} and "
        "JAX_PLATFORMS=cpu before importing jax")
  return devices[:target.chips]

