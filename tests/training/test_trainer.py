"""Trainer reliability: kill -9 and resume, interrupted and unreadable checkpoints, non-finite
steps, config errors, and two jax.distributed processes against one."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

import run_fixtures
from prerl_jax import errors
from prerl_jax.training import evaluator, trainer
from prerl_jax.training.checkpointing import Checkpointer

TPU_RUN = os.path.join(run_fixtures.REPO_ROOT, "launch", "tpu_run.py")
VOLATILE = ("time/", "sample/tokens_per_s")  # Wall-clock metrics differ between runs.


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  return run_fixtures.save_tiny_chat_model(str(tmp_path_factory.mktemp("tiny_chat")))


def _command(model_dir, run_dir, steps, *extra):
  return [sys.executable, TPU_RUN, "--config=configs/w_reinforce.py",
          *run_fixtures.tiny_run_overrides(model_dir, run_dir, steps),
          "--config.train.export_hf=true", *extra]


def _env(devices: int = 1):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return env


def _run(command, env=None, timeout=600):
  result = subprocess.run(command, cwd=run_fixtures.REPO_ROOT, env=env or _env(),
                          capture_output=True, text=True, timeout=timeout)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def _metrics(run_dir):
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in records]


def _logged_steps(run_dir) -> set[int]:
  """The steps metrics.jsonl holds so far (a line still being written is skipped)."""
  try:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
      lines = f.readlines()
  except FileNotFoundError:
    return set()
  steps = set()
  for line in lines:
    try:
      steps.add(json.loads(line)["step"])
    except json.JSONDecodeError:
      pass
  return steps


def _exported(run_dir):
  return load_file(os.path.join(run_dir, "hf_export", "model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(model_dir, tmp_path_factory):
  run_dir = str(tmp_path_factory.mktemp("uninterrupted"))
  _run(_command(model_dir, run_dir, steps=4))
  return run_dir


def test_kill_minus_9_then_resume_equals_uninterrupted_run(model_dir, uninterrupted, tmp_path):
  run_dir = str(tmp_path / "killed")
  command = _command(model_dir, run_dir, steps=4)
  process = subprocess.Popen(command, cwd=run_fixtures.REPO_ROOT, env=_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  # Killed once step 3 is logged: checkpoint 2 is written or still being written (saves are
  # asynchronous; then the rerun starts over), and step 4 is not done. (Waiting for checkpoint
  # 2's directory instead raced: under load its asynchronous write can finish just before
  # checkpoint 4's.)
  deadline = time.time() + 300
  while time.time() < deadline and 3 not in _logged_steps(run_dir):
    assert process.poll() is None, "the run ended before it could be killed"
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert Checkpointer(os.path.join(run_dir, "checkpoints")).latest_step() in (2, None)
  result = _run(command)
  assert "run directory" in result.stdout
  assert _metrics(run_dir) == _metrics(uninterrupted)
  expected, got = _exported(uninterrupted), _exported(run_dir)
  assert expected.keys() == got.keys()
  for name in expected:
    np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def test_checkpoint_interrupted_while_written_is_never_loaded(uninterrupted, tmp_path):
  checkpoints = str(tmp_path / "checkpoints")
  shutil.copytree(os.path.join(uninterrupted, "checkpoints"), checkpoints)
  partial = os.path.join(checkpoints, "6.orbax-checkpoint-tmp-1234567")
  shutil.copytree(os.path.join(checkpoints, "4"), partial)
  os.remove(os.path.join(partial, "_CHECKPOINT_METADATA"))
  assert Checkpointer(checkpoints).latest_step() == 4


def _truncate_largest_file(directory) -> str:
  """Cuts the largest file under `directory` to half its size (a full disk, a cut copy)."""
  files = [os.path.join(root, name) for root, _, names in os.walk(directory) for name in names]
  largest = max(files, key=os.path.getsize)
  os.truncate(largest, os.path.getsize(largest) // 2)
  return largest


def _copy_with_truncated_checkpoints(uninterrupted, run_dir, *steps) -> str:
  shutil.copytree(uninterrupted, run_dir)
  for step in steps:
    _truncate_largest_file(os.path.join(run_dir, "checkpoints", str(step)))
  return run_dir


def test_unreadable_checkpoint_is_set_aside_and_the_run_resumes_from_the_one_before(
    model_dir, uninterrupted, tmp_path):
  """Checkpoint 4 truncated: the rerun names it in one line, renames it 4.corrupt, resumes from
  checkpoint 2 (its metrics after step 2 dropped) and ends as the uninterrupted run did."""
  run_dir = _copy_with_truncated_checkpoints(uninterrupted, str(tmp_path / "run"), 4)
  result = _run(_command(model_dir, run_dir, steps=4) + ["--json"])
  assert json.loads(result.stdout[result.stdout.index("{"):])["resumed_from"] == 2
  checkpoints = os.path.join(run_dir, "checkpoints")
  assert sorted(os.listdir(checkpoints)) == ["2", "4", "4.corrupt"]
  (line,) = [l for l in result.stderr.splitlines() if "cannot be read" in l]
  assert line.endswith(f"set aside as {checkpoints}/4.corrupt") and f"{checkpoints}/4 " in line
  assert "Traceback" not in result.stderr
  assert _metrics(run_dir) == _metrics(uninterrupted)
  expected, got = _exported(uninterrupted), _exported(run_dir)
  for name in expected:
    np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def _restore(model_dir, run_dir, *overrides):
  """A tiny run's Trainer._restore on run_dir: the step it resumes from."""
  run = trainer.Trainer(run_fixtures.tiny_config("w_reinforce", model_dir, run_dir, steps=4,
                                                 overrides=overrides))
  try:
    return run._restore(run.batches())
  finally:
    run.close()


def test_unreadable_checkpoint_with_on_bad_checkpoint_fail_is_named_and_kept(
    model_dir, uninterrupted, tmp_path):
  run_dir = _copy_with_truncated_checkpoints(uninterrupted, str(tmp_path / "run"), 4)
  with pytest.raises(errors.UserError, match=rf"^{run_dir}/checkpoints/4 cannot be read \(.*\) "
                     r"\(train\.on_bad_checkpoint=fail; =previous sets it aside"):
    _restore(model_dir, run_dir, "--config.train.on_bad_checkpoint=fail")
  assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["2", "4"]
  assert len(_metrics(run_dir)) == 4


def test_no_readable_checkpoint_left_stops_unless_restart_is_asked(
    model_dir, uninterrupted, tmp_path):
  stopped = _copy_with_truncated_checkpoints(uninterrupted, str(tmp_path / "stopped"), 2, 4)
  with pytest.raises(errors.UserError, match=r"no readable checkpoint is left in .*stopped/"
                     r"checkpoints \(set aside: .*/4\.corrupt, .*/2\.corrupt\); "
                     r"train\.on_bad_checkpoint=restart starts the run over from step 0"):
    _restore(model_dir, stopped)
  assert len(_metrics(stopped)) == 4  # Nothing restarted: the logged steps are kept.
  restarted = _copy_with_truncated_checkpoints(uninterrupted, str(tmp_path / "restarted"), 2, 4)
  assert _restore(model_dir, restarted, "--config.train.on_bad_checkpoint=restart") == 0
  assert sorted(os.listdir(os.path.join(restarted, "checkpoints"))) == ["2.corrupt", "4.corrupt"]
  assert _metrics(restarted) == []


def test_checkpoint_of_another_state_is_named_and_not_set_aside(model_dir, uninterrupted,
                                                                tmp_path):
  """A config that builds another state (a KL reference) does not call the checkpoint corrupt."""
  run_dir = str(tmp_path / "run")
  shutil.copytree(uninterrupted, run_dir)
  with pytest.raises(errors.UserError, match=r"checkpoints/4 holds another state than this run "
                     r"config builds \(\d+ arrays differ, e.g. reference/.*stored None"):
    _restore(model_dir, run_dir, "--config.objective.kl_coef=0.001")
  assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["2", "4"]


def test_run_killed_before_its_first_checkpoint_restarts_its_metrics(model_dir, tmp_path):
  """Steps logged by a run killed before any checkpoint completed are dropped on restart."""
  stale = [{"step": step, "loss": 1.0} for step in (1, 2, 3)]
  with open(tmp_path / "metrics.jsonl", "w") as f:
    f.writelines(json.dumps(record) + "\n" for record in stale)
  run = trainer.Trainer(run_fixtures.tiny_config("w_reinforce", model_dir, str(tmp_path), steps=1))
  try:
    assert run._restore(run.batches()) == 0
  finally:
    run.close()
  assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_non_finite_update_is_skipped_counted_and_logged(model_dir, tmp_path):
  config = run_fixtures.tiny_config("w_reinforce", model_dir, str(tmp_path), steps=3)
  config.train.log_both_spaces = 2  # The marginal space is also scored on steps 1 and 3.
  run = trainer.Trainer(config)
  scorer = run.data.scorer
  calls = []

  def poisoned(responses, problems):  # The second step's rewards are NaN.
    scored = scorer(responses, problems)
    calls.append(1)
    if len(calls) == 2:
      scored.rewards[:] = np.nan
    return scored

  run.data.scorer = poisoned
  try:
    summary = run.run()
  finally:
    run.close()
  records = _metrics(str(tmp_path))
  assert [r["update_skipped"] for r in records] == [0.0, 1.0, 0.0]
  assert records[-1]["skipped_updates"] == 1 and summary["skipped_updates"] == 1
  assert all(np.isfinite(r["grad_norm"]) for r in (records[0], records[2]))
  assert ["marginal/entropy" in r for r in records] == [True, False, True]


def test_mistyped_config_key_fails_at_start_naming_it(model_dir, tmp_path):
  result = subprocess.run(_command(model_dir, str(tmp_path), 2, "--config.rollout.gruop_size=4"),
                          cwd=run_fixtures.REPO_ROOT, env=_env(), capture_output=True, text=True,
                          timeout=120)
  assert result.returncode != 0
  assert "unknown config key 'gruop_size'" in result.stderr


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("engine", [
    (),
    # 4 live rows per fsdp shard: the two processes sample on 8 rows, each over its own pool.
    ("--config.rollout.engine=continuous", "--config.rollout.live_rows=4",
     "--config.rollout.page_size=4")], ids=["static", "continuous"])
def test_two_processes_give_the_params_of_one(model_dir, tmp_path, engine):
  """Two jax.distributed processes (fsdp=2) train as one process does, and in every run the
  sampler's log-probs match the trainer's within 1e-4 on both steps (the one-process continuous
  run samples on 4 live rows: the 4 samples of the second prompt wait for the first's rows)."""
  single = str(tmp_path / "single")
  _run(_command(model_dir, single, 2, *engine))
  multi = str(tmp_path / "multi")
  port = _free_port()
  processes = [
      subprocess.Popen(_command(model_dir, multi, 2, *engine, "--config.mesh.fsdp=2",
                                f"--coordinator_address=localhost:{port}",
                                "--num_processes=2", f"--process_id={index}"),
                       cwd=run_fixtures.REPO_ROOT, env=_env(1), stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True)
      for index in range(2)]
  for process in processes:
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
  expected, got = _exported(single), _exported(multi)
  # Two devices sum gradients in another order; Adam divides by sqrt(v), so an element whose
  # gradient is ~0 can move by a visible fraction of a step (lr 0.01): allow 1% of one step.
  # Elsewhere the runs agree to 0.1% of a step (seen: 3 of 2,048 gate_proj elements at 2.5e-6).
  for name in expected:
    np.testing.assert_allclose(got[name], expected[name], atol=1e-4, rtol=0, err_msg=name)
    assert np.mean(np.abs(got[name] - expected[name]) <= 1e-5) > 0.999, name
  assert _metrics(multi)[-1]["step"] == 2
  for run_dir in (single, multi):
    assert [r["sampler/max_abs_logp_diff"] <= 1e-4 for r in _metrics(run_dir)] == [True, True]


def test_evaluate_cli_reads_the_latest_checkpoint(model_dir, uninterrupted):
  command = [sys.executable, os.path.join(run_fixtures.REPO_ROOT, "launch", "evaluate.py"),
             "--config=configs/w_reinforce.py", f"--checkpoint={uninterrupted}", "--json",
             *run_fixtures.tiny_run_overrides(model_dir, uninterrupted),
             "--config.eval.samples_per_problem=2", "--config.eval.max_new_tokens=4"]
  report = json.loads(_run(command).stdout)
  assert report["step"] == 4
  (result,) = report["results"]
  assert result["samples_per_problem"] == 2 and result["num_problems"] >= 1
  assert set(result["pass_at_k"]) == {"1", "2"}


def test_evaluate_cli_names_an_unreadable_checkpoint_in_one_line(model_dir, uninterrupted,
                                                                 tmp_path):
  run_dir = str(tmp_path / "cut")
  shutil.copytree(uninterrupted, run_dir)
  state = os.path.join(run_dir, "checkpoints", "4", "state")  # Every file: params included.
  for path in [os.path.join(root, name) for root, _, names in os.walk(state) for name in names]:
    os.truncate(path, os.path.getsize(path) // 2)
  command = [sys.executable, os.path.join(run_fixtures.REPO_ROOT, "launch", "evaluate.py"),
             "--config=configs/w_reinforce.py", f"--checkpoint={run_dir}", "--json",
             *run_fixtures.tiny_run_overrides(model_dir, run_dir),
             "--config.eval.samples_per_problem=2", "--config.eval.max_new_tokens=4"]
  result = subprocess.run(command, cwd=run_fixtures.REPO_ROOT, env=_env(1), capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith(f"evaluate.py: {run_dir}/checkpoints/4 cannot be read"), last


def test_unknown_rollout_engine_is_named():
  config = run_fixtures.parse_config("w_reinforce", overrides=["--config.rollout.engine=paged"])
  with pytest.raises(ValueError, match="rollout.engine='paged': expected one of"):
    evaluator.rollout_sampler(None, None, config.rollout)


def test_packed_update_equals_the_padded_one_and_matches_the_sampler(model_dir, tmp_path):
  """One DSRL-style step scored in both spaces: the packed update (optim.pack) and the padded
  one see the same rollout and give the same loss and metrics; the sampler's log-probs match the
  packed trainer's."""
  metrics = {}
  for pack in (True, False):
    config = run_fixtures.tiny_config("grpo", model_dir, str(tmp_path / str(pack)), steps=1)
    config.optim.pack = pack
    run = trainer.Trainer(config)
    try:
      metrics[pack], _ = run.train_step(1, next(run.batches()))
    finally:
      run.close()
  packed, padded = metrics[True], metrics[False]
  assert packed["sample/tokens"] == padded["sample/tokens"] > 0
  for key in ("loss", "grad_norm", "conditional/entropy", "marginal/entropy",
              "sampler/abs_logp_diff"):
    assert float(packed[key]) == pytest.approx(float(padded[key]), abs=1e-5), key
  assert float(packed["sampler/max_abs_logp_diff"]) <= 1e-4
