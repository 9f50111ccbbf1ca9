"""Collective traffic from compiled HLO: libtpu's all-gathers counted through loop trips; parser."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from prerl_jax.aot import collectives, targets

L, N, D = 5, 256, 128  # Scan steps; rows and columns of each step's weight.
GATHER_BYTES = N * D * 2 * 3 / 4  # A [N, D] bfloat16 weight gathered from 4 chips, per chip.


@pytest.fixture(scope="module")
def mesh():
  pytest.importorskip("libtpu", reason="compiling for v5p needs libtpu: pip install -e .[tpu-aot]")
  return jax.sharding.Mesh(targets.target_devices(targets.get_target("v5p-8")), ("fsdp",))


def layer_scan(x_BxD, weights_LxNxD, mesh):
  """One matmul per step with that step's weight gathered from its N-sharded shards."""
  def step(x_BxD, weight_NxD):
    weight_NxD = jax.lax.with_sharding_constraint(weight_NxD, NamedSharding(mesh, PartitionSpec()))
    return jnp.tanh(x_BxD @ weight_NxD[:D].T), None
  return jax.lax.scan(step, x_BxD, weights_LxNxD)[0]


def compiled_text(function, mesh) -> str:
  """libtpu's optimized HLO of function(x, weights) for 4 v5p chips, the weights split on N."""
  x = jax.ShapeDtypeStruct((8, D), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec()))
  weights = jax.ShapeDtypeStruct((L, N, D), jnp.bfloat16,
                                 sharding=NamedSharding(mesh, PartitionSpec(None, "fsdp")))
  return jax.jit(function).trace(x, weights).lower().compile().as_text()


def test_an_all_gather_in_a_scan_counts_every_step(mesh):
  text = compiled_text(lambda x, w: layer_scan(x, w, mesh), mesh)
  assert text.count(" all-gather(") == 1  # In the loop body, not hoisted out of it.
  traffic = collectives.traffic(text)
  assert traffic.bytes["all-gather"] == traffic.total_bytes == L * N * D * 2 * 3 / 4
  assert traffic.ops == {**dict.fromkeys(collectives.TRAFFIC, 0), "all-gather": L}


def test_nested_loops_multiply_and_a_data_dependent_loop_counts_its_declared_bound(mesh):
  def decode(x, w):  # Three steps at most: it also stops once x is no longer finite.
    return jax.lax.while_loop(
        lambda loop: (loop[0] < 3) & jnp.isfinite(loop[1]).all(),
        lambda loop: (loop[0] + 1, layer_scan(loop[1], w, mesh)), (0, x))[1]

  text = compiled_text(decode, mesh)
  assert collectives.traffic(text, while_trips=(3,)).total_bytes == 3 * L * GATHER_BYTES
  with pytest.raises(ValueError, match=r"depends on data, and its counter's bound of 3 trips is "
                                       r"not among the program's declared while_loop trips \(\)"):
    collectives.traffic(text)


def test_a_loop_without_a_constant_bound_is_an_error(mesh):
  def steps(x, w):  # As many steps as x's first element says.
    bound = x[0, 0].astype(jnp.int32)
    return jax.lax.while_loop(lambda loop: loop[0] < bound,
                              lambda loop: (loop[0] + 1, layer_scan(loop[1], w, mesh)), (0, x))[1]

  text = compiled_text(steps, mesh)
  with pytest.raises(ValueError, match=r"while %while[\w.]* \(jit\(steps\)/while\) in %main.*: "
                                       "its trip count is unknown"):
    collectives.traffic(text, while_trips=(3,))


HLO = r"""HloModule handwritten, num_partitions=8

%body (loop: (s32[], f32[64])) -> (s32[], f32[64]) {
  %loop = (s32[], f32[64]{0}) parameter(0)
  %i = s32[] get-tuple-element(%loop), index=0
  %x = f32[64]{0} get-tuple-element(%loop), index=1
  %shard = f32[16]{0} slice(%x), slice={[0:16]}
  %ag-start = (f32[16]{0}, f32[64]{0}) all-gather-start(%shard), channel_id=1, replica_groups=[2,4]<=[8], dimensions={0}
  %ag-done = f32[64]{0} all-gather-done(%ag-start)
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %out = (s32[], f32[64]{0}) tuple(%next, %ag-done)
}

%cond (loop: (s32[], f32[64])) -> pred[] {
  %loop = (s32[], f32[64]{0}) parameter(0)
  %i = s32[] get-tuple-element(%loop), index=0
  %six = s32[] constant(6)
  ROOT %less = pred[] compare(%six, %i), direction=GT
}

%sum (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %c = f32[] add(%a, %b)
}

ENTRY %main (p: f32[64], q: bf16[8,32]) -> f32[64] {
  %p = f32[64]{0} parameter(0)
  %q = bf16[8,32]{1,0} parameter(1)
  %both = (f32[64]{0}, bf16[8,32]{1,0}) all-reduce(%p, %q), replica_groups={{0,1},{2,3},{4,5},{6,7}}, to_apply=%sum
  %mixed = bf16[64]{0} all-reduce(%p), replica_groups=[1,8]<=[8], to_apply=%sum
  %rs = f32[16]{0} reduce-scatter(%p), replica_groups=mesh['x'=2,'y'=4] {'y'}, dimensions={0}, to_apply=%sum
  %cp-start = (f32[64]{0}, f32[64]{0}, u32[], u32[]) collective-permute-start(%p), source_target_pairs={{0,1},{1,0}}
  %cp-done = f32[64]{0} collective-permute-done(%cp-start)
  %kernel = f32[64]{0} custom-call(%p), custom_call_target="tpu_custom_call", frontend_attributes={kernel_metadata={
"xprof_metadata":"{"block_q": 512, "q_layout": 1}"
}}, metadata={op_name="jit(f)/pallas_call"}
  %two = s32[] constant(2)
  %init = (s32[], f32[64]{0}) tuple(%two, %cp-done)
  %loop = (s32[], f32[64]{0}) while(%init), condition=%cond, body=%body
  ROOT %r = f32[64]{0} get-tuple-element(%loop), index=1
}
"""


def test_handwritten_hlo_async_pairs_once_and_each_replica_group_form():
  """Also a kernel's metadata over three lines (libtpu prints splash attention's so)."""
  traffic = collectives.traffic(HLO)
  assert traffic.ops == {**dict.fromkeys(collectives.TRAFFIC, 0), "all-reduce": 2,
                         "reduce-scatter": 1, "collective-permute": 1, "all-gather": 4}
  assert traffic.bytes == {
      **dict.fromkeys(collectives.TRAFFIC, 0.0),
      # Groups of 2 over both operands of the tuple: 2 x (2 - 1) / 2 of (256 + 512) bytes; and
      # float32 reduced into bfloat16 over 8 chips: 7 / 8 of 256 bytes in, 7 / 8 of 128 out.
      "all-reduce": 768.0 + 336.0,
      # 4 chips on mesh axis y: 3 / 4 of 256 bytes.
      "reduce-scatter": 192.0,
      "collective-permute": 256.0,
      # From counter 2 while 6 > i: 4 trips, each gathering 3 more 64-byte shards (groups of 4).
      "all-gather": 4 * 3 * 64.0,
  }


def test_group_sizes_and_shape_bytes():
  assert collectives.group_size("channel_id=1, replica_groups={{0,2,4},{1,3,5}}, x=1", 8) == 3
  assert collectives.group_size("replica_groups={}, to_apply=%sum", 8) == 8
  assert collectives.group_size("to_apply=%sum", 16) == 16
  assert collectives.group_size("replica_groups=[4,2]<=[2,4]T(1,0), dimensions={0}", 8) == 2
  assert collectives.group_size(
      "replica_groups=mesh['a'=2,'b'=2], device_ids=([2,2]T(1,0)) {'a','b'}, x=1", 4) == 4
  assert collectives.group_size("replica_groups=mesh['a'=2,'b'=8] {'b':(2)4}", 16) == 4
  with pytest.raises(ValueError, match="replica_groups of an unknown form"):
    collectives.group_size("replica_groups=groups(4)", 8)
  assert collectives.shape_bytes("(bf16[2,3]{1,0:T(8,128)(2,1)}, /*index=1*/s32[], pred[5])") == 21
  assert collectives.shape_bytes("f8e4m3fn[4,<=8]") == 32
