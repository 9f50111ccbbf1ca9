"""The pure train step: TrainState, AdamW, micro-batch gradient accumulation, phase switches.

One batch is one `prerl_jax.rl.batch.RolloutBatch` of B = num_prompts * group_size responses
(each group's responses consecutive).

`make_train_step` jits `train_step(state, batch) -> (state, metrics)` once per objective; the
trainer calls `enter_phase` at a schedule's switch step before the new phase's first step.
"""

import functools

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from prerl_jax.rl import objective as oc
from prerl_jax.rl import losses as objectives, scoring
from prerl_jax import sharding
from prerl_jax.rl.batch import RolloutBatch
from prerl_jax.rl.packing import PackedBatch
from prerl_jax.rl.objective import CONDITIONAL, MARGINAL, Objective
from prerl_jax.rl.schedule import Phase


@flax.struct.dataclass
class TrainState:
  """Everything a step changes. `rng` is the trainer's (for sampling); the step never uses it.

  step counts completed steps (the schedule's 1-based step of the next batch is step + 1);
  skipped counts steps whose update was dropped as non-finite; reference is the KL reference
  policy's parameters, or None when the run keeps none.
  """

  params: nnx.State
  opt_state: optax.OptState
  step: jax.Array
  rng: jax.Array
  skipped: jax.Array
  reference: nnx.State | None = None


def make_optimizer(learning_rate=1e-6, weight_decay: float = 0.01, grad_clip: float | None = 1.0,
                   b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
  """Global-norm gradient clipping then AdamW (defaults: the reference's lr, decay and clip)."""
  adamw = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
  return adamw if grad_clip is None else optax.chain(optax.clip_by_global_norm(grad_clip), adamw)


def init_train_state(model: nnx.Module, optimizer, seed: int = 0, with_reference: bool = False,
                     mesh: Mesh | None = None):
  """(graphdef, TrainState) of a model; opt state placed like the parameters it tracks.

  The state's params are the model's own arrays: after a (donating) train step, rebuild the model
  with `nnx.merge(graphdef, state.params)`. with_reference copies the params as KL reference.
  """
  graphdef, params = nnx.split(model)

  def counters():
    return jnp.zeros((), jnp.int32), jax.random.key(seed), jnp.zeros((), jnp.int32)

  init, copy = optimizer.init, functools.partial(jax.tree.map, jnp.copy)
  if mesh is not None:  # Created in place: every array of the state is sharded from the start.
    param_shardings = sharding.state_shardings(params, mesh)
    init = jax.jit(init, out_shardings=sharding.state_shardings(
        jax.eval_shape(init, params), mesh))
    counters = jax.jit(counters, out_shardings=sharding.replicated(mesh))
    copy = jax.jit(copy, out_shardings=param_shardings)
  step, rng, skipped = counters()
  state = TrainState(params=params, opt_state=init(params), step=step, rng=rng, skipped=skipped,
                     reference=copy(params) if with_reference else None)
  return graphdef, state


def train_state_shardings(state: TrainState, mesh: Mesh):
  """NamedShardings of a TrainState: parameters and moments by logical axes, scalars replicated."""
  return sharding.state_shardings(state, mesh)


def enter_phase(state: TrainState, phase: Phase, optimizer) -> TrainState:
  """The state a phase starts from: fresh optimizer state and / or reference := current params.

  A state built without a reference (KL off) stays without one. New arrays keep the sharding of
  the ones they replace.
  """
  if phase.reset_optimizer:
    placed = jax.tree.map(lambda x: x.sharding, state.opt_state)
    state = state.replace(opt_state=jax.jit(optimizer.init, out_shardings=placed)(state.params))
  if phase.reset_reference and state.reference is not None:
    state = state.replace(reference=jax.tree.map(jnp.copy, state.params))
  return state


def _other_space(objective: Objective):
  """The space the objective does not train in, or None when it trains in both."""
  if objective.space == "both":
    return None
  return MARGINAL if objective.space == CONDITIONAL else CONDITIONAL


def _scorer(batch: RolloutBatch | PackedBatch, bos_id, temperature, chunk_size):
  """score(model, space) -> (logp, entropy) per response slot, for either layout."""
  if isinstance(batch, PackedBatch):
    return lambda model, space: scoring.packed_response_logprobs(model, batch, space, temperature,
                                                                 chunk_size)
  return lambda model, space: scoring.response_logprobs(model, batch, space == CONDITIONAL,
                                                        temperature, bos_id, chunk_size)


def micro_batch_loss(graphdef, params, batch: RolloutBatch | PackedBatch, advantages: dict,
                     denominators: oc.Denominators, objective: Objective, *, bos_id=None,
                     temperature=1.0,
                     chunk_size=scoring.DEFAULT_CHUNK_SIZE, reference=None,
                     other_space_metrics: bool = False):
  """(loss, (metric_sums, max_abs_sampler_diff)) of one micro-batch, to differentiate in params.

  batch: a RolloutBatch's rows, or one micro-batch of a PackedBatch (scored per response slot,
  so the objective sees the same per-response arrays in both layouts).

  `denominators` are the full batch's (`batch_denominators`), so losses sum over micro-batches.
  other_space_metrics: also score the space the objective does not train in (one extra forward,
  no backward), for its entropy and, in marginal phases, the sampler-vs-trainer comparison.
  """
  model = nnx.merge(graphdef, params)
  score = _scorer(batch, bos_id, temperature, chunk_size)
  logp, entropy = {}, {}
  for space in objective.spaces:
    logp[space], entropy[space] = score(model, space)
  ref_logp = None
  if objective.kl_spaces:
    if reference is None:
      raise ValueError(f"objective {objective.name!r} has kl_coef={objective.kl_coef}: build the "
                       "state with init_train_state(..., with_reference=True)")
    ref_model = nnx.merge(graphdef, jax.lax.stop_gradient(reference))
    ref_logp = {s: score(ref_model, s)[0] for s in objective.kl_spaces}
  mask_BxR = jnp.asarray(batch.response_mask, jnp.float32)
  loss, sums = oc.objective_loss(objective, logp, batch.old_logp, advantages, mask_BxR,
                                 ref_logp=ref_logp, entropy=entropy, denominators=denominators)
  other = _other_space(objective)
  if other_space_metrics and other is not None:
    # Constant params: this forward is never differentiated.
    other_logp, other_entropy = score(nnx.merge(graphdef, jax.lax.stop_gradient(params)), other)
    logp[other] = other_logp
    sums[f"{other}/entropy"] = objectives.masked_sum_count(other_entropy, mask_BxR)
  max_diff = jnp.zeros((), jnp.float32)
  if CONDITIONAL in logp:
    trainer_BxR = jax.lax.stop_gradient(logp[CONDITIONAL])
    diff_BxR = jnp.asarray(batch.sampler_logp, jnp.float32) - trainer_BxR
    sums["sampler/abs_logp_diff"] = objectives.masked_sum_count(jnp.abs(diff_BxR), mask_BxR)
    sums["sampler/approx_kl"] = objectives.masked_sum_count(diff_BxR, mask_BxR)
    max_diff = jnp.max(jnp.where(mask_BxR > 0, jnp.abs(diff_BxR), 0.0))
  return loss, (sums, max_diff)


def _micro_batches(tree, micro_batches: int, mesh: Mesh | None):
  """Splits every array's leading axis into (micro_batches, rows / micro_batches), strided.

  Micro-batch m holds rows m, m + M, m + 2M, ..., so each one spreads over all batch shards.
  """
  def split(x):
    rows = x.shape[0]
    if rows % micro_batches:
      raise ValueError(f"a batch of {rows} rows does not split into micro_batches={micro_batches}")
    x = x.reshape(rows // micro_batches, micro_batches, *x.shape[1:]).swapaxes(0, 1)
    if mesh is not None:
      spec = PartitionSpec(None, *sharding.batch_sharding(mesh, 1).spec)
      x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
    return x
  return jax.tree.map(split, tree)


def _micro_inputs(batch: RolloutBatch | PackedBatch, advantages: dict, micro_batches: int,
                  mesh: Mesh | None):
  """(rows, advantages) with a leading micro-batch axis, and the whole batch's
  (advantages, response_mask) per response for the aggregation denominators."""
  if not isinstance(batch, PackedBatch):
    return _micro_batches((batch, advantages), micro_batches, mesh), (advantages,
                                                                      batch.response_mask)
  if batch.index.shape[0] != micro_batches:
    raise ValueError(f"a PackedBatch of {batch.index.shape[0]} micro-batches was packed for "
                     f"another micro_batches={micro_batches}: pack with the same count")
  slots = {space: a[batch.index] for space, a in advantages.items()}
  flat = {space: a.reshape(-1) for space, a in slots.items()}
  mask = batch.response_mask.reshape(-1, batch.response_mask.shape[-1])
  return (batch.replace(rewards=None), slots), (flat, mask)


def accumulate_gradients(graphdef, params, batch: RolloutBatch | PackedBatch,
                         objective: Objective, *, group_size: int, micro_batches: int = 1,
                         mesh: Mesh | None = None, **loss_options):
  """Full-batch (grads, loss, metric_sums, max_abs_sampler_diff), summed over micro-batches.

  batch: a RolloutBatch (micro-batches of strided rows) or a PackedBatch (`prerl_jax.rl.packing`,
  packed with the same micro_batches). Advantages and aggregation denominators come from the
  whole batch, so the sum over micro-batches equals the full-batch loss and gradient, in either
  layout. Gradients accumulate in float32. loss_options: `micro_batch_loss`'s keyword arguments.
  """
  advantages = oc.advantages_for(objective, batch.rewards, group_size)
  micro_inputs, (whole_advantages, whole_mask) = _micro_inputs(batch, advantages, micro_batches,
                                                               mesh)
  denominators = oc.batch_denominators(objective, whole_advantages, whole_mask)
  grad_fn = jax.value_and_grad(micro_batch_loss, argnums=1, has_aux=True)

  def one(grads, micro):
    rows_micro, advantages_micro = micro
    (loss, aux), micro_grads = grad_fn(graphdef, params, rows_micro, advantages_micro,
                                       denominators, objective, **loss_options)
    return jax.tree.map(lambda g, m: g + m.astype(jnp.float32), grads, micro_grads), (loss, aux)

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  grads, (losses, (sums, max_diffs)) = jax.lax.scan(
      one, zeros, micro_inputs)
  return grads, losses.sum(), jax.tree.map(jnp.sum, sums), max_diffs.max()


def train_step(state: TrainState, batch: RolloutBatch | PackedBatch, *, graphdef,
               objective: Objective, optimizer,
               group_size: int, micro_batches: int = 1, mesh: Mesh | None = None,
               **loss_options):
  """One optimizer step on one rollout batch; a non-finite loss or gradient skips the update."""
  grads, loss, sums, max_diff = accumulate_gradients(
      graphdef, state.params, batch, objective, group_size=group_size,
      micro_batches=micro_batches, mesh=mesh, reference=state.reference, **loss_options)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)

  def unless_skipped(new, old):
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

  skipped = state.skipped + (~finite).astype(jnp.int32)
  new_state = state.replace(params=unless_skipped(params, state.params),
                            opt_state=unless_skipped(opt_state, state.opt_state),
                            step=state.step + 1, skipped=skipped)
  metrics = oc.finalize_metrics(sums)
  metrics.update({
      "loss": loss,
      "grad_norm": grad_norm,
      "update_skipped": (~finite).astype(jnp.float32),
      "skipped_updates": skipped,
      "tokens/prompt": jnp.sum(_prompt_lengths(batch).astype(jnp.float32)),
      "tokens/response": jnp.sum(batch.response_mask.astype(jnp.float32)),
  })
  for space in objective.spaces:
    metrics[f"{space}/kept_tokens"] = sums[f"{space}/clip_frac"][1]
  if "sampler/abs_logp_diff" in sums:
    metrics["sampler/max_abs_logp_diff"] = max_diff
  return new_state, metrics


def scored_spaces(objective: Objective, other_space_metrics: bool = False) -> tuple[str, ...]:
  """The spaces a step scores: the objective's, and the other one for its metrics if asked."""
  return (CONDITIONAL, MARGINAL) if other_space_metrics else objective.spaces


def _prompt_lengths(batch: RolloutBatch | PackedBatch):
  if isinstance(batch, PackedBatch):
    return batch.prompt_lengths
  return batch.prompt_mask


def make_train_step(graphdef, objective: Objective, optimizer, *, group_size: int,
                    micro_batches: int = 1, bos_id: int | None = None, temperature=1.0,
                    chunk_size: int | None = scoring.DEFAULT_CHUNK_SIZE,
                    other_space_metrics: bool = False, mesh: Mesh | None = None,
                    state: TrainState | None = None, packed: bool = False):
  """`train_step(state, batch) -> (state, metrics)` for one objective, jitted, state donated.

  packed: the batch is a PackedBatch (`prerl_jax.rl.packing.pack` of `scored_spaces(...)`, with
    the same micro_batches, placed by `packing.shard`); otherwise a RolloutBatch.

  bos_id: the marginal BOS, required when the marginal space is scored.
  other_space_metrics: see `micro_batch_loss` (costs one forward pass of the other space).
  mesh: shard the step; then `state` (any TrainState of the run) fixes the state shardings and
    the batch is split over the batch mesh axes. Call it positionally: `step(state, batch)`.

  Metrics (scalars): loss, grad_norm, update_skipped, skipped_updates, tokens/{prompt,response},
  <space>/{loss, clip_frac, dual_clip_frac, approx_kl, kept_frac, kept_tokens, entropy, ref_kl},
  sampler/{abs_logp_diff, max_abs_logp_diff, approx_kl} (sampler minus trainer conditional
  log-probs, so approx_kl estimates KL(sampler || trainer); only when the conditional is scored).
  """
  if MARGINAL in scored_spaces(objective, other_space_metrics) and bos_id is None:
    raise ValueError(f"objective {objective.name!r} scores the marginal space: pass bos_id= "
                     "(prerl_jax.models.tokenizer.chat_turn_start_id gives the reference's)")
  step = functools.partial(
      train_step, graphdef=graphdef, objective=objective, optimizer=optimizer,
      group_size=group_size, micro_batches=micro_batches, mesh=mesh, bos_id=bos_id,
      temperature=temperature, chunk_size=chunk_size, other_space_metrics=other_space_metrics)
  if mesh is None:
    return jax.jit(step, donate_argnames=("state",))
  if state is None:
    raise ValueError("make_train_step(mesh=...) needs state= (a TrainState of the run) to fix "
                     "the state shardings")
  state_shardings = train_state_shardings(state, mesh)
  batch_shardings = None if packed else sharding.batch_sharding(mesh, 1)  # Packed: as placed.
  return jax.jit(sharding.traced_on(mesh, step),
                 in_shardings=(state_shardings, batch_shardings),
                 out_shardings=(state_shardings, sharding.replicated(mesh)),
                 donate_argnames=("state",))
