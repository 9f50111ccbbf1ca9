"""Per-chip peak of one update micro-batch compiled for a TPU topology (libtpu, on this CPU):
`JAX_PLATFORMS=cpu python launch/update_peak.py --model qwen3-4b --topology v5p:2x2x2
--tokens 9216 --rows-per-chip 1 --attention splash --remat full [--json]`."""

import argparse
import json
import time

from prerl_jax.aot import update_peak
from prerl_jax.models import attention, presets, remat


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--model", default="qwen3-4b")
  parser.add_argument("--topology", default="v5p:2x2x2")
  parser.add_argument("--tokens", type=int, default=9216)
  parser.add_argument("--rows-per-chip", type=int, default=1)
  parser.add_argument("--attention", choices=attention.BACKENDS, default="splash")
  parser.add_argument("--remat", choices=remat.POLICIES, default="full")
  parser.add_argument("--json", action="store_true")
  args = parser.parse_args()
  config = presets.preset_model_config(args.model, param_dtype="float32", dtype="bfloat16",
                                       remat=args.remat, attention=args.attention)
  mesh = update_peak.topology_mesh(args.topology)
  rows = args.rows_per_chip * mesh.size
  start = time.perf_counter()
  compiled = update_peak.compile_update(config, mesh, rows, args.tokens)
  result = {**vars(args), "chips": mesh.size, "rows": rows,
            "compile_s": round(time.perf_counter() - start, 1),
            **{f"{k}_gib": round(v / 2**30, 2) for k, v in
               update_peak.per_chip_bytes(compiled).items()}}
  if args.json:
    print(json.dumps(result))
  else:
    print(f"{args.model} update micro-batch, {rows} rows x {args.tokens} tokens on "
          f"{args.topology} ({mesh.size} chips), attention={args.attention}, remat={args.remat}: "
          f"per chip peak {result['peak_gib']} GiB (arguments {result['arguments_gib']}, "
          f"temporaries {result['temporaries_gib']}); compiled in {result['compile_s']} s")


if __name__ == "__main__":
  main()
