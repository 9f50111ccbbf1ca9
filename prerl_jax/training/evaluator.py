"""What a run needs to sample and evaluate, without an optimizer: model, tokenizer, data, sampler.

The trainer builds one and evaluates its current params with it; `launch/evaluate.py` builds one
alone and evaluates params restored from a checkpoint (no optimizer state is built or read).
Sampling runs from the rollout copy of the params (`rollout.weights`,
`prerl_jax.generate.rollout_weights`) on the copy's mesh; an evaluation makes its copy and drops
it when it returns.
"""

import dataclasses
import json
import os

import jax
import ml_collections

from prerl_jax import sharding
from prerl_jax.data import prompts
from prerl_jax.data.task_data import load_task_data
from prerl_jax.evals import evaluation
from prerl_jax.generate.continuous import ContinuousSampler, PoolConfig
from prerl_jax.generate.rollout_weights import RolloutWeights, device_hbm_bytes
from prerl_jax.generate.sampler import Sampler, SamplingConfig, prompt_batch
from prerl_jax.models.loading import load_model
from prerl_jax.training import caches

ROLLOUT_ENGINES = ("static", "continuous")


def rollout_sampler(model, mesh, rollout: ml_collections.ConfigDict):
  """The sampler `rollout.engine` names on `mesh` (the rollout copy's): `Sampler`, or
  `ContinuousSampler` over a page pool."""
  if rollout.engine not in ROLLOUT_ENGINES:
    raise ValueError(f"rollout.engine={rollout.engine!r}: expected one of {ROLLOUT_ENGINES}")
  if rollout.engine == "static":
    return Sampler(model, mesh)
  return ContinuousSampler(model, PoolConfig.from_rollout(rollout), mesh)


class Evaluator:
  """The model, tokenizer, task data and sampler of a run config; params are passed per call."""

  def __init__(self, config: ml_collections.ConfigDict, mesh=None):
    self.config = config
    if config.train.compilation_cache:
      caches.enable_compilation_cache()
    self.mesh = sharding.make_mesh(**config.mesh) if mesh is None else mesh
    model_cfg = config.model
    self.model, self.tokenizer = load_model(
        model_cfg.name, path=model_cfg.path or None, mesh=self.mesh,
        param_dtype=model_cfg.param_dtype, dtype=model_cfg.dtype, remat=model_cfg.remat,
        attention=model_cfg.attention, allow_unused_weights=model_cfg.allow_unused_weights)
    self.data = load_task_data(config.data, config.reward)
    rollout = config.rollout
    self.rollout_weights = RolloutWeights.build(rollout.weights, self.model.config, self.mesh,
                                                device_hbm_bytes(self.mesh))
    self.sampler = rollout_sampler(self.model, self.rollout_weights.mesh, rollout)
    self.sampling = SamplingConfig.from_tokenizer(
        self.tokenizer, rollout.max_new_tokens, temperature=rollout.temperature,
        top_k=rollout.top_k, top_p=rollout.top_p, n=rollout.group_size)

  def encode(self, problem):
    """A problem's prompt ids under the task's prompt config."""
    return prompts.encode_prompt(self.tokenizer, problem.messages, self.data.prompt_config)

  def decode(self, tokens_NxM, lengths_N) -> list[str]:
    """Texts of the first lengths_N[i] tokens of each row, special tokens dropped."""
    return [self.tokenizer.decode(row[:length], skip_special_tokens=True)
            for row, length in zip(tokens_NxM, lengths_N)]

  def eval_sampling(self) -> SamplingConfig:
    """The rollout's sampling with the eval section's length and temperature (0: greedy)."""
    ev = self.config.eval
    return dataclasses.replace(self.sampling, max_new_tokens=ev.max_new_tokens,
                               temperature=ev.temperature, greedy=ev.temperature == 0)

  def generate(self, weights, sampling: SamplingConfig, key):
    """An evaluation.Generate over `weights`, the rollout copy of the params
    (`self.rollout_weights.copy(params)`), with a fixed key for comparable evals."""
    mesh = self.rollout_weights.mesh

    def generate(prompt_ids, n):
      config = dataclasses.replace(sampling, n=n)
      tokens, mask = sharding.shard_batch(prompt_batch(prompt_ids, config), mesh)
      with jax.set_mesh(mesh):  # As the trainer samples: kernels see the mesh.
        out = sharding.to_host(self.sampler.sample(weights, tokens, mask, key, config))
      texts = self.decode(out.tokens_NxM, out.lengths_N)
      return [texts[i * n:(i + 1) * n] for i in range(len(prompt_ids))]
    return generate

  def sample_responses(self, params, problems, n: int = 1, seed: int = 0) -> list[list[str]]:
    """n responses to each problem from `params`, with the evaluation settings."""
    generate = self.generate(self.rollout_weights.copy(params), self.eval_sampling(),
                             jax.random.key(seed))
    return generate([self.encode(p).ids for p in problems], n)

  def evaluate(self, params, step: int, logger=None,
               run_dir: str | None = None) -> list[evaluation.DatasetResult]:
    """Evaluates every eval set on `params`; logs `eval/<set>/...` at `step` to `logger` and
    writes `eval_step_<step>.json` under run_dir where given."""
    ev = self.config.eval
    generate = self.generate(self.rollout_weights.copy(params), self.eval_sampling(),
                             jax.random.key(self.config.train.seed + 10_000))
    results = []
    for name, problems in self.data.eval_sets:
      result = evaluation.evaluate_dataset(
          name, problems, generate, self.data.scorer, self.encode,
          samples_per_problem=ev.samples_per_problem,
          count_tokens=lambda s: len(self.tokenizer.encode(s, add_special_tokens=False)),
          max_response_tokens=ev.max_new_tokens, prompts_per_call=ev.prompts_per_call)
      results.append(result)
      if logger is not None:
        scalars = {f"eval/{name}/mean@{result.samples_per_problem}": result.mean_at_n}
        scalars.update({f"eval/{name}/pass@{k}": v for k, v in result.pass_at_k.items()})
        scalars.update({f"eval/{name}/{k}": v for k, v in result.behaviour.items()})
        logger.write(step, scalars)
    if run_dir is not None:
      with open(os.path.join(run_dir, f"eval_step_{step}.json"), "w") as f:
        json.dump(evaluation.results_as_dicts(results), f, indent=2)
    return results

  def close(self) -> None:
    self.data.close()
