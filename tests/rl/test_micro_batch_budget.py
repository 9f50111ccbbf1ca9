"""optim.micro_batches=auto: the fewest valid count whose compiled update fits the chip's HBM (a
fake HBM on CPU), for the trainer and the dry run; explicit counts unchanged."""

import dataclasses
import logging
import types

import jax
import numpy as np
import pytest

import configs
import run_fixtures
from configs import common
from prerl_jax import sharding
from prerl_jax.aot import abstract_state, programs as program_lib, targets, update_programs
from prerl_jax.errors import UserError
from prerl_jax.generate import pool_budget
from prerl_jax.models.config import ModelConfig
from prerl_jax.rl import micro_batch_budget
from prerl_jax.training import trainer

TINY = ModelConfig("llama", vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=16)
COUNTS = (1, 2, 4)  # The counts that split 2 prompts x 2 responses on one device.


def tiny_config():
  config = configs.get_config("grpo", "cpu,prompts=2,group=2,new_tokens=128")
  config.data.max_prompt_length = 64
  config.train.log_both_spaces = 0
  config.optim.micro_batches = "auto"
  return config


def simulated_target(hbm_bytes: float) -> targets.Target:
  """h100x8 as the dry run simulates it (XLA:CPU, no LLVM optimization: its memory analysis is
  XLA:CPU's, quick to compile) with `hbm_bytes` of HBM."""
  target = dataclasses.replace(targets.get_target("h100x8"), hbm_bytes=hbm_bytes)
  assert target.compiler == "simulated"
  return target


@pytest.fixture(scope="module", autouse=True)
def without_xla_gpu():
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(targets, "xla_gpu_installed", lambda: False)
    yield


def hbm_leaving(available: float) -> float:
  """The HBM whose margin (1 GiB + 5%) leaves `available` bytes for the update."""
  return (available + pool_budget.MARGIN_BYTES) / (1 - pool_budget.MARGIN_SHARE)


@pytest.fixture(scope="module")
def shapes():
  mesh = sharding.make_mesh(fsdp=1, devices=jax.devices()[:1])
  return abstract_state.step_shapes(tiny_config(), mesh, TINY)


@pytest.fixture(scope="module")
def peaks(shapes):
  """count -> the compiled update's micro_batch_budget.Tried (the dry run's compiles)."""
  target = simulated_target(2**40)
  found = {}
  with jax.set_mesh(shapes.mesh):
    for count in COUNTS:
      (program,) = [program_lib.compile_program(p, target)
                    for p in update_programs.train_programs(tiny_config(), shapes, count)]
      found[count] = micro_batch_budget.Tried(count, program["compiler_peak_bytes"],
                                              program["temp_bytes"])
  return found


def resolve(shapes, peaks, monkeypatch, hbm: float | None):
  """The trainer's resolution on the abstract state, each count's compile looked up in `peaks`;
  (the Choice, the counts compiled)."""
  compiled = []

  def measure(count, programs, state):
    compiled.append(count)
    assert [objective.name for objective, _, _ in programs] == ["grpo"]
    return peaks[count]

  monkeypatch.setattr(micro_batch_budget, "compile_and_measure", measure)
  monkeypatch.setattr(pool_budget, "device_hbm_and_in_use", lambda mesh: None if hbm is None else
                      (hbm, shapes.bytes["params"] + shapes.bytes["opt_state"]))
  with jax.set_mesh(shapes.mesh):
    choice = micro_batch_budget.resolve(tiny_config(), shapes.graphdef, shapes.optimizer,
                                        shapes.state, shapes.mesh, prompt_width=64, bos_id=0,
                                        share_prompts=True)
  return choice, compiled


def test_peaks_fall_with_the_count(peaks):
  assert peaks[1].peak_bytes > peaks[2].peak_bytes > peaks[4].peak_bytes > 0


@pytest.mark.parametrize("fewest", [2, 4])
def test_auto_takes_the_fewest_count_whose_compiled_peak_fits(shapes, peaks, monkeypatch,
                                                              fewest):
  below = COUNTS[COUNTS.index(fewest) - 1]
  available = (peaks[fewest].peak_bytes + peaks[below].peak_bytes) / 2
  choice, compiled = resolve(shapes, peaks, monkeypatch, hbm_leaving(available))
  assert peaks[fewest].peak_bytes <= choice.available_bytes < peaks[below].peak_bytes
  assert choice.available_bytes == pytest.approx(available)
  assert choice.micro_batches == fewest
  assert compiled[0] == 1 and set(compiled) <= set(COUNTS) and below in compiled
  assert "micro-batches, the fewest whose update fits" in choice.describe()


def test_no_count_fitting_is_one_error_naming_the_key_and_numbers(shapes, peaks, monkeypatch):
  with pytest.raises(UserError) as raised:
    resolve(shapes, peaks, monkeypatch, hbm_leaving(peaks[4].peak_bytes / 2))
  message = str(raised.value)
  assert "\n" not in message
  assert message.startswith("optim.micro_batches=auto: no count fits the update on a chip: HBM ")
  assert f"4: {peaks[4].peak_bytes / 2**30:.2f}" in message  # The largest count was compiled.
  assert "4 is the most that split 4 rows evenly on each of 1 batch device(s)" in message


def test_without_a_memory_limit_auto_is_the_fewest_valid_count(shapes, peaks, monkeypatch):
  choice, compiled = resolve(shapes, peaks, monkeypatch, None)
  assert (choice.micro_batches, compiled, choice.tried) == (1, [], ())
  assert "no memory limit" in choice.describe()
  assert micro_batch_budget.valid_counts(1024, 8) == [1, 2, 4, 8, 16, 32, 64, 128]
  assert micro_batch_budget.valid_counts(24, 4) == [1, 2, 3, 6]


def test_the_dry_run_makes_the_same_choice_and_reports_the_counts_tried(shapes, peaks):
  available = (peaks[1].peak_bytes + peaks[2].peak_bytes) / 2
  target = simulated_target(hbm_leaving(available))
  with jax.set_mesh(shapes.mesh):
    programs, choice = update_programs.update_stage(tiny_config(), shapes, target)
  assert choice["micro_batches"] == 2
  assert [(t["micro_batches"], t["peak_bytes"]) for t in choice["tried"]] == [
      (1, peaks[1].peak_bytes), (2, peaks[2].peak_bytes)]
  (program,) = programs  # The chosen count's, as compiled in the search.
  assert program["compiler_peak_bytes"] == peaks[2].peak_bytes and program["fits"]


def test_the_config_takes_auto_or_a_count_that_splits_a_step():
  config = configs.get_config("grpo", "cpu")
  assert configs.get_config("dsrl", "paper").optim.micro_batches == "auto"
  for value, problem in (("auto", None), (4, None),
                         (0, "optim.micro_batches=0: must be an int >= 1"),
                         ("atuo", "optim.micro_batches='atuo': must be an int >= 1 or auto"),
                         (3, "optim.micro_batches=3: must split a step's")):
    config.optim.micro_batches = value
    found = [p for p in common.rules.problems(config, common.SETTINGS, jax.devices()[:1],
                                                disk=False) if "micro_batches" in p]
    assert (found[0] if found else None) is None if problem is None else found[0].startswith(
        problem), (value, found)


def test_an_explicit_count_is_kept_without_compiling(monkeypatch):
  monkeypatch.setattr(micro_batch_budget, "resolve", None)  # Calling it would fail.
  config = configs.get_config("grpo", "cpu")
  config.optim.micro_batches = 4
  assert trainer.Trainer._micro_batches(types.SimpleNamespace(config=config)) == 4


def test_a_tiny_run_with_auto_resolves_it_at_start_and_trains(tmp_path, monkeypatch, caplog):
  """A fake 64 GiB device: the trainer compiles its real update (the run's state, the largest
  packed batch) and takes the fewest count, 1; then a step trains with it."""
  model_dir = run_fixtures.save_tiny_chat_model(str(tmp_path / "model"))
  config = run_fixtures.tiny_config("grpo", model_dir, str(tmp_path / "run"), steps=1,
                                    overrides=["--config.optim.micro_batches=auto"])
  monkeypatch.setattr(pool_budget, "device_hbm_and_in_use", lambda mesh: (64 * 2**30, 0.0))
  with caplog.at_level(logging.INFO):
    run = trainer.Trainer(config)
  try:
    assert run.micro_batches == 1
    (line,) = [r.getMessage() for r in caplog.records
               if r.getMessage().startswith("optim.micro_batches=auto")]
    peak = float(line.split("tried (micro-batches: peak GiB) 1: ")[1].split()[0])
    assert 0 < peak < 1  # GiB: the tiny model's compiled update.
    metrics, _ = run.train_step(1, next(run.batches()))
    assert np.isfinite(float(metrics["loss"])) and metrics["update_skipped"] == 0
    assert metrics["tokens/response"] > 0 and int(run.state.step) == 1
  finally:
    run.close()
