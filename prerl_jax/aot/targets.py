"""Dry-run targets by product name: chips, the devices to compile for, and each chip's peaks.

Every target compiles on this host's CPU, deviceless, with its chip's own compiler for the real
topology (`jax.experimental.topologies.get_topology_desc`): libtpu for a TPU slice
(`pip install -e .[tpu-aot]`), XLA:GPU through the CUDA plugin for a GPU host
(`pip install -e .[gpu-aot]`; the chip as XLA sees it is in gpu_specs.py). Without the CUDA
plugin a GPU target falls back to as many simulated host CPU devices (XLA:CPU's buffer assignment
and fusions stand in for the GPU compiler's), and every report of it says so.
"""

import dataclasses
import importlib.util
import os

import jax

from prerl_jax.aot import gpu_specs

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
  # libtpu's topology name, or XLA:GPU's slices x hosts x GPUs per host ("1x1x8": one host of 8).
  topology: str
  bf16_flops: float
  hbm_bandwidth: float
  hbm_bytes: float
  interconnect_bandwidth: float
  gpu: gpu_specs.GpuChip | None = None  # The GPU as XLA:GPU sees it; None on a TPU.

  @property
  def compiler(self) -> str:
    """"tpu" (libtpu), "xla-gpu" (XLA:GPU through the CUDA plugin) or "simulated" (XLA:CPU
    devices standing in for a GPU whose compiler is not installed)."""
    if self.gpu is None:
      return "tpu"
    return "xla-gpu" if xla_gpu_installed() else "simulated"

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
# HBM bytes/s and size as CUDA reports them (gpu_specs.py): the fit check and XLA's
# rematerialization budget use the same bytes.
_H100 = dict(chip="H100 SXM", bf16_flops=989e12, interconnect_bandwidth=900e9,
             hbm_bandwidth=gpu_specs.H100_SXM.memory_bandwidth,
             hbm_bytes=gpu_specs.H100_SXM.device_memory_size, gpu=gpu_specs.H100_SXM)
_H200 = dict(chip="H200 SXM", bf16_flops=989e12, interconnect_bandwidth=900e9,
             hbm_bandwidth=gpu_specs.H200_SXM.memory_bandwidth,
             hbm_bytes=gpu_specs.H200_SXM.device_memory_size, gpu=gpu_specs.H200_SXM)

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
    Target("h100x1", chips=1, topology="1x1x1", **_H100),
    Target("h100x8", chips=8, topology="1x1x8", **_H100),
    Target("h200x1", chips=1, topology="1x1x1", **_H200),
    Target("h200x8", chips=8, topology="1x1x8", **_H200),
)}


def get_target(name: str) -> Target:
  """The TARGETS entry of `name`; an unknown name is an error listing the valid ones."""
  if name not in TARGETS:
    raise ValueError(f"--target={name!r} is unknown; valid: {', '.join(TARGETS)}")
  return TARGETS[name]


def xla_gpu_installed() -> bool:
  """Whether XLA:GPU's compiler is installed: the CUDA PJRT plugin (the gpu-aot extra)."""
  return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None


def target_devices(target: Target) -> list:
  """The devices a dry run compiles for: the TPU or GPU topology's, or simulated CPU devices."""
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  if target.compiler == "tpu":
    # Nothing runs on a TPU here: let several processes load libtpu (its lockfile guards a chip).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
      devices = topologies.get_topology_desc(platform="tpu",
                                             topology_name=target.topology).devices
    except Exception as error:  # pylint: disable=broad-except
      raise ValueError(f"target {target.name} needs libtpu's compiler for topology "
                       f"{target.topology} (pip install -e .[tpu-aot]): {error}") from error
  elif target.compiler == "xla-gpu":
    try:
      devices = topologies.get_topology_desc(platform="cuda", topology=target.topology,
                                             target_config=target.gpu.target_config).devices
    except Exception as error:  # pylint: disable=broad-except
      # Without JAX_PLATFORMS=cpu on a machine with no GPU, the plugin's CUDA check fails and
      # jax registers no cuda platform: "topology not implemented for cuda".
      raise ValueError(f"target {target.name} compiles with XLA:GPU through the CUDA plugin, "
                       f"which jax did not load ({error}): set JAX_PLATFORMS=cpu before jax "
                       "starts (launch/tpu_run.py --dry_run does)") from error
  else:
    devices = jax.devices("cpu")[:target.chips]
    if len(devices) < target.chips:
      raise ValueError(
          f"target {target.name} is simulated on {target.chips} CPU devices (XLA:GPU is not "
          f"installed: pip install -e .[gpu-aot]); {len(devices)} are available: set "
          f"XLA_FLAGS=--xla_force_host_platform_device_count={target.chips} and "
          "JAX_PLATFORMS=cpu before importing jax")
  assert len(devices) == target.chips, (target, len(devices))
  return list(devices)
