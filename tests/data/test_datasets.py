"""Tests for problem sources: the shared RL parquet files, JSONL, bad rows, reasoning-gym."""

import json
import pathlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import run_fixtures

from prerl_jax.data import datasets

DATA_DIR = pathlib.Path(run_fixtures.SHARED_DATA)
SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
needs_data = pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"{DATA_DIR} not present")


@needs_data
@pytest.mark.parametrize("name, rows, skipped, unique, truth, source, index, user_start", [
    ("math_train", 7496, 4, 7496, "0", "qwen_math_train", "0", "Let \\[f(x) = \\left\\{"),
    ("aime_2024_20times", 600, 0, 30, "540", "qwen_aime_2024", "aime_2024_0",
     "Find the largest possible real part of"),
    ("aime_2025_20times", 600, 0, 30, "70", "qwen_aime_2025", "aime_2025_0",
     "Find the sum of all integer bases $b>9$"),
    ("amc2023_20times", 800, 0, 40, "27", "qwen_amc2023", "amc2023_0",
     "Cities $A$ and $B$ are $45$ miles apart."),
])
def test_shared_files_load(name, rows, skipped, unique, truth, source, index, user_start):
  loaded = datasets.load_rl_file(str(DATA_DIR / f"{name}.parquet"), on_bad_row="skip")
  assert (len(loaded.problems), loaded.skipped) == (rows, skipped)
  problems = loaded.problems
  first = problems[0]
  assert (first.ground_truth, first.data_source, first.index) == (truth, source, index)
  assert first.messages[0] == {"role": "system", "content": SYSTEM}
  assert first.messages[1]["role"] == "user"
  assert first.user_message.startswith(user_start)
  assert len(datasets.dedupe_problems(problems)) == unique
  assert len(datasets.dedupe_problems(problems, key="index")) == unique


@needs_data
def test_math_train_rows_with_empty_ground_truth():
  path = str(DATA_DIR / "math_train.parquet")
  with pytest.raises(datasets.DataError, match=r"math_train\.parquet, row 5341: .*ground_truth"):
    datasets.load_rl_file(path)
  problems, _ = datasets.load_rl_file(path, on_bad_row="skip")
  assert [p.ground_truth for p in problems[:5]] == ["0", "98", "4", "17", "6"]
  assert [p.index for p in problems[5340:5343]] == ["5340", "5342", "5344"]
  assert problems[-1].index == "7499"


def _write_jsonl(path, rows):
  path.write_text("".join(json.dumps(row) + "\n" for row in rows))
  return str(path)


def _row(question="What is 1+1?", truth="2"):
  return {"prompt": [{"role": "user", "content": question}],
          "reward_model": {"ground_truth": truth}}


BAD_ROWS = [
    ({"prompt": [{"role": "user", "content": "q"}], "reward_model": {}}, "ground_truth"),
    ({"prompt": "What is 1+1?", "reward_model": {"ground_truth": "2"}}, "list of chat messages"),
    ({"prompt": [{"role": "user", "content": "q"}], "reward_model": {"ground_truth": 2}},
     "non-empty string"),
    ({"prompt": [{"role": "user"}], "reward_model": {"ground_truth": "2"}}, "not a"),
    ({"prompt": [{"role": "system", "content": "s"}], "reward_model": {"ground_truth": "2"}},
     "no user message"),
]


@pytest.mark.parametrize("bad_row, reason", BAD_ROWS)
def test_bad_row_error_names_file_and_row(tmp_path, bad_row, reason):
  path = _write_jsonl(tmp_path / "train.jsonl", [_row(), _row(), bad_row])
  with pytest.raises(datasets.DataError, match=rf"train\.jsonl, row 2: .*{reason}"):
    datasets.load_rl_file(path)


def test_bad_rows_skipped_and_counted(tmp_path, caplog):
  path = _write_jsonl(tmp_path / "train.jsonl", [bad for bad, _ in BAD_ROWS] + [_row(truth="7")])
  problems, skipped = datasets.load_rl_file(path, on_bad_row="skip")
  assert skipped == len(BAD_ROWS)
  assert [(p.ground_truth, p.index, p.data_source) for p in problems] == [
      ("7", "train_5", "train")]
  assert "train.jsonl, row 1" in caplog.text


def test_parquet_column_of_wrong_type(tmp_path):
  path = tmp_path / "bad.parquet"
  pq.write_table(pa.table({"prompt": ["plain text", "more"],
                           "reward_model": [{"ground_truth": "1"}, {"ground_truth": "2"}]}), path)
  with pytest.raises(datasets.DataError, match=r"bad\.parquet, row 0: .*list of chat messages"):
    datasets.load_rl_file(str(path))
  with pytest.raises(datasets.DataError, match=r"bad\.parquet: none of its 2 rows is usable"):
    datasets.load_rl_file(str(path), on_bad_row="skip")


def test_empty_and_invalid_files(tmp_path):
  (tmp_path / "empty.jsonl").write_text("")
  with pytest.raises(datasets.DataError, match=r"empty\.jsonl: the file has no rows"):
    datasets.load_rl_file(str(tmp_path / "empty.jsonl"))
  (tmp_path / "broken.jsonl").write_text(json.dumps(_row()) + "\n{oops\n")
  with pytest.raises(datasets.DataError, match=r"broken\.jsonl, line 2: not valid JSON"):
    datasets.load_rl_file(str(tmp_path / "broken.jsonl"))
  with pytest.raises(datasets.DataError, match="missing.parquet: no such file"):
    datasets.load_rl_file(str(tmp_path / "missing.parquet"))


def test_gym_train_and_heldout_splits():
  config = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}
  _, train, heldout = datasets.gym_train_heldout("chain_sum", 50, 20, seed=1, **config)
  assert len(train) == 50 and 0 < len(heldout) <= 20
  first = train[0]
  assert first.user_message == ("State the final answer to the following arithmetic problem: "
                                "4 - 1 =\nGive your final answer inside <answer></answer> tags.")
  assert (first.ground_truth, first.data_source, first.index) == ("3", "reasoning_gym/chain_sum",
                                                                   "chain_sum_1_0")
  assert first.gym_entry["answer"] == "3"
  assert not {p.user_message for p in heldout} & {p.user_message for p in train}
  _, again, _ = datasets.gym_train_heldout("chain_sum", 50, 20, seed=1, **config)
  assert [p.user_message for p in again] == [p.user_message for p in train]


def test_gym_errors():
  with pytest.raises(ValueError, match=r"Unknown reasoning-gym task 'chain_summ'.*'chain_sum'"):
    datasets.gym_dataset("chain_summ", 4, 0)
  with pytest.raises(ValueError, match=r"'chain_sum' rejects config \{'bogus': 1\}"):
    datasets.gym_dataset("chain_sum", 4, 0, bogus=1)
  with pytest.raises(ValueError, match="heldout_seed must differ"):
    datasets.gym_train_heldout("chain_sum", 4, 4, seed=2, heldout_seed=2)


def test_invalid_utf8_names_file_and_line(tmp_path):
  rows = [json.dumps(_row()).encode(), json.dumps(_row()).encode().replace(b"?", b"?\xff")]
  assert b"\xff" in rows[1]
  (tmp_path / "latin.jsonl").write_bytes(b"\n".join(rows) + b"\n")
  with pytest.raises(datasets.DataError, match=r"latin\.jsonl, line 2: not valid UTF-8 \(byte "
                     r"\d+ of the line is 0xff\)"):
    datasets.load_rl_file(str(tmp_path / "latin.jsonl"))
