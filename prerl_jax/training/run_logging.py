"""Run logs: metrics.jsonl (one object per step), TensorBoard scalars and texts, on process 0."""

import json
import os

import jax
import numpy as np
from tensorboardX import SummaryWriter


def _plain(value):
  if isinstance(value, (np.generic, np.ndarray, jax.Array)):
    value = np.asarray(value)
    return value.item() if value.ndim == 0 else value.tolist()
  return value


class RunLogger:
  """Appends per-step metrics to metrics.jsonl and TensorBoard; a no-op on other processes."""

  def __init__(self, run_dir: str):
    self.active = jax.process_index() == 0
    self.run_dir = run_dir
    if self.active:
      os.makedirs(run_dir, exist_ok=True)
      self._jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a", buffering=1)
      self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))

  def write(self, step: int, metrics: dict) -> None:
    if not self.active:
      return
    record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(record, sort_keys=True) + "\n")
    for key, value in record.items():
      if key != "step" and isinstance(value, (int, float)) and np.isfinite(value):
        self._tb.add_scalar(key.replace("@", "_at_"), value, step)  # '@' is not a legal tag.

  def write_texts(self, step: int, tag: str, texts: list[str]) -> None:
    if self.active:
      self._tb.add_text(tag, "\n\n---\n\n".join(f"```\n{t}\n```" for t in texts), step)

  def close(self) -> None:
    if self.active:
      self._jsonl.close()
      self._tb.close()


def truncate_metrics_after(run_dir: str, step: int) -> None:
  """Drops metrics.jsonl records after `step`, so a resumed run rewrites them exactly once."""
  path = os.path.join(run_dir, "metrics.jsonl")
  if jax.process_index() != 0 or not os.path.exists(path):
    return
  with open(path) as f:
    kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
  with open(path, "w") as f:
    f.writelines(kept)
