"""notebooks/dsrl_demo.ipynb runs end to end at its smoke size (PRERL_NOTEBOOK_SMOKE=1)."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

import run_fixtures

NOTEBOOK = os.path.join(run_fixtures.REPO_ROOT, "notebooks", "dsrl_demo.ipynb")


@pytest.mark.slow
def test_dsrl_demo_notebook_runs_and_reports_both_methods(tmp_path, monkeypatch):
  monkeypatch.setenv("PRERL_NOTEBOOK_SMOKE", "1")
  monkeypatch.setenv("XLA_FLAGS", "")  # One CPU device, as in Colab.
  # Inside a checkout: its root (configs/) on the kernel's path, as in Colab after the clone.
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      filter(None, (run_fixtures.REPO_ROOT, os.environ.get("PYTHONPATH")))))
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  NotebookClient(notebook, timeout=900, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute()
  outputs = {i: "".join(o.get("text", "") for o in cell.get("outputs", []))
             for i, cell in enumerate(notebook.cells) if cell.cell_type == "code"}
  text = "\n".join(outputs.values())
  assert "2 steps of 2 prompts x 4 samples, 16 new tokens" in text
  assert "grpo done" in text and "dsrl done" in text
  # Before and after tables for both methods: four rows for the held-out chain_sum set.
  assert sum(line.startswith("chain_sum ") for line in text.splitlines()) == 4
  assert "===== GRPO" in text and "===== DSRL" in text and text.count("before: ") == 8
  images = [o for cell in notebook.cells for o in cell.get("outputs", [])
            if "image/png" in o.get("data", {})]
  assert len(images) == 1
  for method in ("grpo", "dsrl"):
    with open(tmp_path / "runs" / "notebook" / method / "metrics.jsonl") as f:
      steps = [line for line in f if '"reward/accuracy"' in line]
    assert len(steps) == 2
