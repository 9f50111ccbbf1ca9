"""The GPUs a dry run compiles for, as XLA:GPU describes them (GpuTargetConfigProto text).

A deviceless XLA:GPU compile (`targets.target_devices`) knows the chip only from this text: the
compute capability picks the code (sm_90a); cores, shared memory, registers, L2 and clock drive
fusion and tiling; `device_memory_size` sets the budget XLA's rematerialization aims for.

Sources: XLA's own specs of these chips, captured from the devices (openxla/xla,
xla/backends/gpu/target_config/specs/h100_sxm.txtpb and h200.txtpb: "NVIDIA H100 80GB HBM3",
"NVIDIA H200 141GB HBM3e"), which agree with NVIDIA's data sheets: both are the GH100 die with
132 SMs at 1.98 GHz boost, 228 KiB shared memory (227 KiB per block) and 64 Ki 32-bit registers
per SM, 50 MiB L2 (H100 and H200 Tensor Core GPU data sheets; Hopper tuning guide); HBM3 at
3.35 TB/s (H100 SXM) and HBM3e at 4.8 TB/s (H200 SXM). `device_memory_size` is the memory CUDA
reports: 79.1 GiB of the H100's 80 GB, 141.0 GiB on the H200. Left out: cuDNN's version (XLA
then plans no cuDNN kernels, which this host could not build without a GPU) and XLA's per-dtype
unit rates (its cost model's; the paper preset's update compiles to the same memory with them).
"""

import dataclasses

# The GH100 die (H100 SXM, H200 SXM); gpu_device_info fields of stream_executor's
# GpuDeviceInfoProto, in XLA's spec-file order.
_HOPPER = """\
gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {memory_bandwidth}
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: {device_memory_size}
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {{
    major: 9
    minor: 0
    feature_extension: ACCELERATED_FEATURES
  }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  name: "{name}"
}}
platform_name: "CUDA"
device_description_str: "{name}"
"""


@dataclasses.dataclass(frozen=True)
class GpuChip:
  """One GPU model: its name as CUDA reports it, HBM bytes/s and the HBM bytes CUDA reports."""

  name: str
  memory_bandwidth: int
  device_memory_size: int

  @property
  def target_config(self) -> str:
    """The GpuTargetConfigProto text that `topologies.get_topology_desc` compiles for."""
    return _HOPPER.format(**dataclasses.asdict(self))


H100_SXM = GpuChip("NVIDIA H100 80GB HBM3", memory_bandwidth=3_352_320_000_000,
                   device_memory_size=84_942_979_072)
H200_SXM = GpuChip("NVIDIA H200 141GB HBM3e", memory_bandwidth=4_800_000_000_000,
                   device_memory_size=151_397_597_184)
