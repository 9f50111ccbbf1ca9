"""The training loop: sample, score, update by phase; evaluate, checkpoint, log, resume.

Every host runs the same loop over the same global batch (read by each host, so no host needs
another's data); devices receive only their shards. Only process 0 writes logs.
"""

import logging
import os
import resource
import time

import jax
import ml_collections
import numpy as np
import tqdm
from flax import nnx

from prerl_jax.evals import behaviour, evaluation
from prerl_jax.data import padding, pipeline as data_pipeline
from prerl_jax import sharding
from prerl_jax.errors import UserError
from prerl_jax.data.task_data import data_files
from prerl_jax.rl.schedule import schedule_from_config
from prerl_jax.training.checkpointing import Checkpointer, UnreadableCheckpoint
from prerl_jax.models import attention
from prerl_jax.models.export import export_hf
from prerl_jax.training.run_logging import RunLogger, truncate_metrics_after
from prerl_jax.generate.sampler import prompt_batch
from prerl_jax.training.evaluator import Evaluator
from prerl_jax.models.tokenizer import chat_turn_start_id
from prerl_jax.rl import micro_batch_budget, packing
from prerl_jax.rl.batch import RolloutBatch, from_samples
from prerl_jax.rl.train_step import (enter_phase, init_train_state, make_optimizer,
                                     make_train_step, scored_spaces)


def check_train_fills_a_step(config: ml_collections.ConfigDict, num_problems: int) -> None:
  """Fails, naming the config keys, when the train split holds fewer problems than one step."""
  prompts_per_step = config.rollout.prompts_per_step
  if num_problems < prompts_per_step:
    source = (f"data.train_size = {config.data.train_size}"
              if config.data.source == "reasoning_gym" else "data.train_files")
    raise UserError(f"config {source} gives {num_problems} training problems, fewer than one "
                    f"step's rollout.prompts_per_step = {prompts_per_step}")


class Trainer:
  """Holds the model, data, sampler and compiled steps of one run; `run()` trains to the end.

  Its config's values are checked beforehand (configs/common.py `check_config`, which
  launch/tpu_run.py calls before anything loads).
  """

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.run_dir = config.train.run_dir.format(name=config.name)
    self.mesh = sharding.make_mesh(**config.mesh)
    self.schedule = schedule_from_config(config.objective)
    data_files(config.data)  # A missing data file fails here, before the model loads.
    self.evaluator = Evaluator(config, self.mesh)
    self.model, self.tokenizer = self.evaluator.model, self.evaluator.tokenizer
    self.data, self.sampler, self.sampling = (self.evaluator.data, self.evaluator.sampler,
                                              self.evaluator.sampling)
    check_train_fills_a_step(config, len(self.data.train))
    self.optimizer = make_optimizer(config.optim.learning_rate, config.optim.weight_decay,
                                    config.optim.grad_clip, config.optim.b1, config.optim.b2)
    kl_on = any(p.objective.kl_spaces for p in self.schedule.phases)
    self.graphdef, self.state = init_train_state(self.model, self.optimizer,
                                                 seed=config.train.seed,
                                                 with_reference=kl_on, mesh=self.mesh)
    bos = config.model.marginal_bos_id
    self.bos_id = bos if bos >= 0 else chat_turn_start_id(self.tokenizer)
    self.micro_batches = self._micro_batches()
    self._steps = {}
    self.checkpointer = Checkpointer(os.path.join(self.run_dir, "checkpoints"),
                                     keep=config.train.keep_checkpoints)
    self.logger = RunLogger(self.run_dir)

  def _micro_batches(self) -> int:
    """optim.micro_batches, `auto` resolved once for the device's HBM (logged:
    prerl_jax/rl/micro_batch_budget.py)."""
    count = self.config.optim.micro_batches
    if count != "auto":
      return count
    with jax.set_mesh(self.mesh):  # The train step is traced under the run's mesh.
      return micro_batch_budget.resolve(
          self.config, self.graphdef, self.optimizer, self.state, self.mesh,
          prompt_width=self.sampling.bucket(self.config.data.max_prompt_length),
          bos_id=self.bos_id, share_prompts=self._share_prompts()).micro_batches

  # -- pieces of a step ---------------------------------------------------------------------

  def _train_step_for(self, objective, both_spaces: bool):
    if (objective, both_spaces) not in self._steps:
      self._steps[objective, both_spaces] = make_train_step(
          self.graphdef, objective, self.optimizer, group_size=self.config.rollout.group_size,
          micro_batches=self.micro_batches, bos_id=self.bos_id,
          temperature=self.config.rollout.temperature, other_space_metrics=both_spaces,
          mesh=self.mesh, state=self.state, packed=self.config.optim.pack)
    return self._steps[objective, both_spaces]

  def sample_responses(self, problems, n: int = 1, seed: int = 0) -> list[list[str]]:
    """n responses to each problem from the current params, with the evaluation settings."""
    return self.evaluator.sample_responses(self.state.params, problems, n, seed)

  def evaluate(self, step: int) -> list[evaluation.DatasetResult]:
    """Evaluates every eval set on the current params; logs `eval/<set>/...` at `step`."""
    return self.evaluator.evaluate(self.state.params, step, self.logger,
                                   self.run_dir if self.logger.active else None)

  # -- the loop -----------------------------------------------------------------------------

  def batches(self):
    """The resumable iterator of prompt batches for config.train.steps steps.

    Their order follows data.seed and the run's train.seed (which also keys the sampling), so
    runs that differ only in train.seed see the same problems in different orders.
    """
    cfg = self.config
    steps_per_epoch = max(1, len(self.data.train) // cfg.rollout.prompts_per_step)
    epochs = -(-cfg.train.steps // steps_per_epoch)
    order_seed = int(np.random.SeedSequence([cfg.data.seed, cfg.train.seed]).generate_state(1)[0])
    batches = data_pipeline.prompt_batches(
        self.data.train, self.evaluator.encode, global_batch_size=cfg.rollout.prompts_per_step,
        num_epochs=epochs, seed=order_seed, pad_id=self.tokenizer.pad_token_id,
        max_prompt_tokens=cfg.data.max_prompt_length, process_index=0, process_count=1)
    return data_pipeline.resumable_iterator(batches)

  def _restore(self, iterator) -> int:
    """Resumes from the latest complete checkpoint that can be read; returns its step (0: none).

    One that cannot be read is handled by train.on_bad_checkpoint: `fail` stops naming it;
    `previous` sets it aside (renamed <step>.corrupt) and tries the one before, and stops when
    none is left; `restart` does as `previous`, then starts over. Metrics logged after the step
    resumed from (by a run killed before its next checkpoint, or before any) are dropped.
    """
    policy = self.config.train.on_bad_checkpoint
    set_aside, resumed = [], 0
    for step in reversed(self.checkpointer.steps()):
      try:
        self.state, data_state = self.checkpointer.restore(step, self.state)
      except UnreadableCheckpoint as error:
        if policy == "fail":
          raise UserError(f"{error} (train.on_bad_checkpoint=fail; =previous sets it aside and "
                          "resumes from the checkpoint before it)") from error
        set_aside.append(self.checkpointer.set_aside(step))
        logging.warning("%s; set aside as %s", error, set_aside[-1])
        continue
      iterator.set_state(data_state["iterator"])
      resumed = step
      break
    else:
      if set_aside and policy != "restart":
        raise UserError(f"no readable checkpoint is left in {self.run_dir}/checkpoints (set "
                        f"aside: {', '.join(set_aside)}); train.on_bad_checkpoint=restart "
                        "starts the run over from step 0")
    truncate_metrics_after(self.run_dir, resumed)
    if resumed or set_aside:
      (logging.warning if set_aside else logging.info)("Resuming %s from step %d", self.run_dir,
                                                       resumed)
    return resumed

  def _rollout(self, batch, step: int):
    """Samples G responses per prompt and scores them; returns (host RolloutBatch, host
    metrics, texts).

    Samples from the rollout copy of the params (`rollout.weights`), made here by one
    resharding transfer (`time/reshard`) and dropped when this returns, before the update.
    """
    cfg = self.config
    times = {}
    start = time.perf_counter()
    rollout_weights = self.evaluator.rollout_weights
    weights = jax.block_until_ready(rollout_weights.copy(self.state.params))
    times["time/reshard"] = time.perf_counter() - start
    start = time.perf_counter()
    prompt_ids = [row[-length:] for row, length in zip(batch["prompt_ids"],
                                                       batch["prompt_lengths"])]
    tokens_BxP, mask_BxP = sharding.shard_batch(prompt_batch(prompt_ids, self.sampling),
                                                rollout_weights.mesh)
    key = jax.random.fold_in(self.state.rng, step)
    with jax.set_mesh(rollout_weights.mesh):
      out = sharding.to_host(
          self.sampler.sample(weights, tokens_BxP, mask_BxP, key, self.sampling))
    del weights  # Dropped before scoring and the update, which takes its memory.
    lengths_N, truncated_N = out.lengths_N, out.truncated_N
    times["time/sample"] = time.perf_counter() - start

    start = time.perf_counter()
    texts = self.evaluator.decode(out.tokens_NxM, lengths_N)
    group = cfg.rollout.group_size
    problems = [p for p in batch["problems"] for _ in range(group)]
    scored = self.data.scorer(texts, problems)
    rewards_N = np.asarray(scored.rewards, np.float32)
    times["time/score"] = time.perf_counter() - start

    # The update's response columns: a doubling bucket, so a run compiles few update programs.
    width = padding.doubling_bucket(int(lengths_N.max()), out.tokens_NxM.shape[1])
    train_batch = from_samples(out, rewards_N, response_width=width)
    host = {
        "reward/mean": float(rewards_N.mean()),
        "reward/accuracy": float((rewards_N >= 1.0).mean()),
        "response/tokens_mean": float(lengths_N.mean()),
        "response/tokens_max": int(lengths_N.max()),
        "response/lengths": lengths_N.tolist(),  # Prompt i's samples at i*G..i*G+G-1 (dry run).
        "response/truncated_fraction": float(truncated_N.mean()),
        "response/update_width": width,
        "prompt/truncated": int(batch["prompt_truncated"].sum()),
        "sample/tokens": int(lengths_N.sum()),
        **{f"reward/{k}": v for k, v in scored.counts.items()},
        **{f"behaviour/{k}": v for k, v in behaviour.behaviour_metrics(
            texts, list(lengths_N), list(truncated_N), rewards_N, group).items()},
        **times,
    }
    return train_batch, host, texts

  def _layout(self, rollout: RolloutBatch, objective, both_spaces: bool):
    """The update's batch on the mesh: packed rows (optim.pack) or the padded RolloutBatch."""
    optim = self.config.optim
    if not optim.pack:
      return sharding.shard_batch(rollout, self.mesh)
    packed = packing.pack(
        rollout, scored_spaces(objective, both_spaces),
        micro_batches=self.micro_batches, row_tokens=optim.row_tokens, bos_id=self.bos_id,
        multiple_of=sharding.batch_devices(self.mesh), share_prompts=self._share_prompts())
    return packing.shard(packed, self.mesh)

  def _share_prompts(self) -> bool:
    """optim.share_prompts where the model's attention backend can (logged once where not)."""
    backend = self.model.config.attention
    if self.config.optim.share_prompts and not attention.supports_branches(backend):
      attention.log_once(f"optim.share_prompts: model.attention={backend} on "
                         f"{jax.default_backend()} cannot share prompts; each response is "
                         "scored with its own copy")
      return False
    return self.config.optim.share_prompts

  def train_step(self, step: int, batch) -> tuple[dict, list[str]]:
    """One RL step on a prompt batch: sample, score, update by the phase of `step`.

    Returns (metrics with `time/{reshard,sample,score,update,step}`, the decoded responses).
    Runs under the run's mesh (`jax.set_mesh`; sampling under the rollout copy's), so kernels
    that need it in context (splash attention under `model.attention=auto` on TPU) are traced
    with it.
    """
    with jax.set_mesh(self.mesh):
      return self._train_step(step, batch)

  def _train_step(self, step: int, batch) -> tuple[dict, list[str]]:
    phase = self.schedule.phase_at(step)
    if self.schedule.is_switch(step):
      self.state = enter_phase(self.state, phase, self.optimizer)
    rollout, host, texts = self._rollout(batch, step)
    start = time.perf_counter()
    every = self.config.train.log_both_spaces
    both_spaces = every > 0 and (step - 1) % every == 0
    update = self._train_step_for(phase.objective, both_spaces)
    self.state, metrics = update(self.state, self._layout(rollout, phase.objective, both_spaces))
    metrics = sharding.to_host(metrics)
    host["time/update"] = time.perf_counter() - start
    host["time/step"] = sum(host[f"time/{part}"]
                            for part in ("reshard", "sample", "score", "update"))
    host["sample/tokens_per_s"] = host["sample/tokens"] / host["time/sample"]
    host["phase"] = self.schedule.phases.index(phase)
    host["objective"] = phase.objective.name
    return {**host, **metrics}, texts

  def run(self) -> dict:
    """Trains for config.train.steps steps (resuming if possible); returns a summary."""
    cfg = self.config
    if self.logger.active:
      with open(os.path.join(self.run_dir, "config.json"), "w") as f:
        f.write(cfg.to_json_best_effort(indent=2))
    iterator = self.batches()
    done = self._restore(iterator)
    summary = {"run_dir": self.run_dir, "resumed_from": done}
    if cfg.eval.at_start and done == 0:
      summary["eval_before"] = self.evaluate(0)
    progress = tqdm.tqdm(total=cfg.train.steps, initial=done, desc=cfg.name,
                         disable=not self.logger.active, dynamic_ncols=True)
    for step in range(done + 1, cfg.train.steps + 1):
      metrics, texts = self.train_step(step, next(iterator))
      self.logger.write(step, metrics)
      if cfg.train.log_samples:
        self.logger.write_texts(step, "samples", texts[:cfg.train.log_samples])
      progress.set_postfix(objective=metrics["objective"],
                           acc=f"{metrics['reward/accuracy']:.2f}",
                           loss=f"{float(metrics['loss']):.4f}")
      progress.update()
      if cfg.eval.every and step % cfg.eval.every == 0 and step != cfg.train.steps:
        self.evaluate(step)
      if step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps:
        self.checkpointer.save(step, self.state, {"iterator": iterator.get_state()})
    progress.close()
    self.checkpointer.wait()
    if cfg.eval.at_end:
      summary["eval_after"] = self.evaluate(cfg.train.steps)
    if cfg.train.export_hf:
      model = nnx.merge(self.graphdef, self.state.params)
      summary["export"] = export_hf(model, os.path.join(self.run_dir, "hf_export"),
                                    self.tokenizer)
    summary["skipped_updates"] = int(sharding.to_host(self.state.skipped))
    summary["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return summary

  def close(self) -> None:
    self.checkpointer.close()
    self.logger.close()
    self.evaluator.close()
