"""A dry-run report in words: which knob makes a program fit, and the human summary."""

from prerl_jax.aot import response_lengths
from prerl_jax.rl import micro_batch_budget

GIB = 2**30


def attention_scores_bytes(report: dict) -> float:
  """Bytes per chip of one layer's [rows, heads, T, T] float32 scores in one micro-batch."""
  mesh, model = report["mesh"], report["model"]
  rows = report["rows"] / report["micro_batches"] / report["batch_devices"]
  heads = model["num_heads"] / (mesh["tensor"] if model["num_heads"] % mesh["tensor"] == 0 else 1)
  length = report["prompt_width"] + report["max_new_tokens"] - 1
  return max(rows, 1) * heads * length**2 * 4


def micro_batches_to_fit(report: dict, program: dict) -> int | None:
  """A lower bound on the micro-batches whose temporaries fit the chip, or None if none can.

  Temporaries shrink at most in proportion to the rows of a micro-batch (attention and other
  per-row buffers do; per-layer weights do not), so the proportional estimate is optimistic.
  Micro-batches must split the rows evenly over the batch devices.
  """
  return micro_batch_budget.proportional_fewest(
      report["micro_batches"], program["temp_bytes"],
      program["peak_bytes_per_chip"] - program["temp_bytes"], program["hbm_bytes_per_chip"],
      micro_batch_budget.valid_counts(report["rows"], report["batch_devices"]))


def advice(report: dict) -> list[str]:
  """Which knobs would make each program fit the chip's HBM (empty when everything fits)."""
  hbm = report["peaks"]["hbm_bytes"]
  b = report["bytes_per_chip"]
  state = b["params"] + b["opt_state"] + b["reference"]
  notes = []
  if state > hbm:
    notes.append(f"parameters + optimizer state alone ({state / GIB:.1f} GiB) exceed the "
                 f"{hbm / GIB:.1f} GiB of a {report['chip']}: shard over more fsdp chips, or keep "
                 "them in bfloat16 (model.param_dtype=bfloat16 halves params and Adam moments)")
  if report.get("pool", {}).get("error"):
    notes.append(report["pool"]["error"])
  for program in report["programs"]:
    if program["fits"]:
      continue
    head = (f"{program['name']} needs {program['peak_bytes_per_chip'] / GIB:.1f} GiB per chip "
            f"({program['temp_bytes'] / GIB:.1f} GiB temporaries): ")
    if program["stage"] == "sample" and report.get("engine") == "continuous":
      notes.append(head + (
          f"its page pool is {b['kv_cache'] / GIB:.1f} GiB: lower rollout.kv_cache_gib (the "
          "pool; fewer responses decode at once; auto sizes it from the HBM left) or "
          "rollout.live_rows, or split the weights and kv heads over a tensor axis "
          "(rollout.weights=tensor)"))
      continue
    if program["stage"] == "sample":
      notes.append(head + (
          f"its KV cache is {b['kv_cache'] / GIB:.1f} GiB for {report['rows']} rows x "
          f"{report['prompt_width'] + report['max_new_tokens'] - 1} slots: spread the rows "
          "over more data/fsdp chips, split kv heads over tensor, or sample fewer rows per call "
          "(rollout.prompts_per_step, rollout.group_size) or fewer rollout.max_new_tokens"))
      continue
    knobs = []
    if report["model"]["remat"] == "none":
      knobs.append("model.remat=full (rematerialize decoder layers)")
    needed = micro_batches_to_fit(report, program)
    if needed:
      knobs.append(f"optim.micro_batches of at least {needed} (now {report['micro_batches']}; "
                   "a lower bound, as temporaries shrink at most in proportion to rows; "
                   "optim.micro_batches=auto compiles the counts to find the fewest that fits)")
    knobs.append("more fsdp chips")
    notes.append(head + ", or ".join(knobs) + f" (one layer's float32 attention scores take "
                 f"{attention_scores_bytes(report) / GIB:.1f} GiB per chip; past one row per "
                 "chip only a fused attention kernel or shorter sequences shrink them)")
  return notes


def _gib(x: float) -> str:
  return f"{x / GIB:.2f}"


def rollout_line(report: dict) -> str:
  """What the samplers decode from: the layout, its mesh, the copy and its resharding."""
  layout = report["rollout_weights"]
  if layout == "trainer":
    return ("rollout weights: trainer (the fsdp params, cast inside the sampler programs; no "
            "copy)")
  copy = next(p for p in report["programs"] if p["name"] == "rollout:copy")
  moved = copy["collective_bytes_per_chip"]
  moved = "unknown" if moved is None else f"{_gib(moved['total'])} GiB"
  return (f"rollout weights: {layout} on mesh {report['rollout_mesh']}, a "
          f"{_gib(report['bytes_per_chip']['rollout_copy'])} GiB copy per chip made once per "
          f"step (resharding: {moved} per chip over the interconnect)")


def pool_line(pool: dict) -> str:
  """The continuous engine's pool: its setting, the budget, pages and the rows it feeds."""
  return (f"page pool (rollout.kv_cache_gib={pool['kv_cache_gib']}): {pool['pages_per_shard']} "
          f"pages per shard, {_gib(pool['bytes_per_chip'])} GiB per chip, of "
          f"{pool['budget']['text']} left for it; {pool['live_rows']} live rows per shard "
          f"(rollout.live_rows), {pool['rows_at_cap']} of them decoding at the cap (the pages "
          f"alone hold {pool['pool_rows_at_cap']}): {pool['waves']} waves, "
          f"{pool['decode_steps']} decode steps")


def format_report(report: dict) -> str:
  """A short human summary; every line of a simulated (GPU) target says it is simulated."""
  b, m, peaks = report["bytes_per_chip"], report["model"], report["peaks"]
  where = {"tpu": f"libtpu compiler, {report['chips']} x {report['chip']}",
           "xla-gpu": f"XLA:GPU compiler (deviceless), {report['chips']} x {report['chip']}"}.get(
               report["compiler"],
               f"SIMULATED on {report['chips']} XLA:CPU devices, not the {report['chip']} compiler")
  lines = [
      f"dry run {report['target']} ({where}): {m['num_layers']} layers, hidden "
      f"{m['hidden_size']}, params {m['param_dtype']}, compute {m['dtype']}, remat={m['remat']},"
      f" attention={m['attention']};"
      f" mesh {report['mesh']}; {report['rows']} rows, prompt {report['prompt_width']}, new "
      f"tokens {report['max_new_tokens']}, micro-batches {report['micro_batches']}"
      + (" (auto)" if "micro_batches_auto" in report else ""),
      *([f"optim.micro_batches=auto: {report['micro_batches_auto']['text']}"]
        if "micro_batches_auto" in report else []),
      f"per chip (GiB): params {_gib(b['params'])}, optimizer state {_gib(b['opt_state'])}, "
      f"reference {_gib(b['reference'])}, gradients (f32) {_gib(b['gradients'])}, rollout copy "
      f"{_gib(b['rollout_copy'])}, KV cache {_gib(b['kv_cache'])}; HBM {_gib(peaks['hbm_bytes'])}",
      rollout_line(report),
      *([pool_line(report["pool"])] if "pool" in report else []),
      "program              peak GiB  temp GiB  fits (headroom GiB)  TFLOP/chip/run   runs"
      "  projected s  comm s  comm GiB/chip/run",
  ]
  for p in report["programs"]:
    moved = p["collective_bytes_per_chip"]
    if moved is None:
      comm = "unknown: the compiler refused it, out of memory (peak: a lower bound)"
    else:
      kinds = ", ".join(f"{kind} {_gib(size)}" for kind, size in moved.items()
                        if kind != "total" and size)
      comm = f"{p['comm_s']:>6.1f}  {_gib(moved['total'])}" + (f" ({kinds})" if kinds else "")
    fits = f"{'yes' if p['fits'] else 'NO'} ({p['headroom_bytes'] / GIB:+.1f})"
    lines.append(f"{p['name']:<20} {_gib(p['peak_bytes_per_chip']):>8}  "
                 f"{_gib(p['temp_bytes']):>8}  {fits:<19}  {p['flops_per_chip'] / 1e12:>14.3f}"
                 f"  {p['runs']:>5}  {p['projected_s']:>8.1f} {p['bound'][:3]}  {comm}")
  unknown = (f", unknown for {', '.join(report['comm_unknown'])}" if report["comm_unknown"]
             else "")
  lines.append(
      f"projected step {report['projected_step_s']:.1f} s = sample "
      f"{report['projected_sample_s']:.1f} s + update {report['projected_update_s']:.1f} s, "
      f"communication {report['projected_comm_s']:.1f} s of it{unknown} (not overlapped; fully "
      f"overlapped: {report['projected_step_overlapped_s']:.1f} s) "
      f"({peaks['bf16_flops'] / 1e12:.0f} TFLOP/s, {peaks['hbm_bandwidth'] / 1e9:.0f} GB/s HBM, "
      f"{peaks['interconnect_bandwidth'] / 2 / 1e9:.0f} GB/s into a chip; {report['network']}; "
      f"early stopping: {report['early_stopping']})")
  lines.append(
      f"sample phase HBM roofline {report['projected_sample_roofline_s']:.1f} s (the decode's "
      "weights and keys and values read, prerl_jax/aot/dry_run.py): projected sampling is "
      f"{report['projected_sample_s'] / report['projected_sample_roofline_s']:.2f}x it")
  lines += [response_lengths.summary_line(report["lengths"])] if "lengths" in report else []
  lines.append(f"fits: {'yes' if report['fits'] else 'NO'}")
  lines += [f"does not fit: {note}" for note in report["advice"]]
  if report["compiler"] == "simulated":
    lines = [f"[simulated] {line}" for line in lines]
  return "\n".join(lines)
