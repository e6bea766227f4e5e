"""Which CPU settings change the default experiment's numbers: a short-run comparison.

  python benchmarks/cpu_reproducibility.py --out /tmp/cpu_repro --data_root /tmp/repro_data

About 1 minute per setting on a 2-core CPU (7 settings by default: ~7 minutes;
the synthetic data is generated once under --data_root on the first run).
Each setting runs the CLI on configs/synthetic.py for --rounds FedPav rounds
(no baseline, one evaluation at the end) in a fresh workdir under --out, with
its own XLA_FLAGS / oneDNN ISA cap / CPU affinity; `--reuse` re-tabulates
finished workdirs. Prints a host line (CPU model, SIMD flags, usable CPUs,
library versions, hash of the synthetic data: diff it between two machines)
and a table: round-1 training loss (full precision), final mean rank-1 / mAP
over clients (%), whether metrics.jsonl (timings aside) and the final
checkpoint are bit-identical to the first setting's, seconds per round
(rounds 2+, so compilation is excluded) and the settings.

What the settings probe (jax 0.10.2, XLA CPU): convolutions, dots and the
BatchNorm reductions run in YNNPACK fusions, whose kernels are chosen at run
time from CPUID (no flag caps them) and whose reductions split over the
intra-op threads, one per CPU in the affinity mask (`one_thread`).
`--xla_cpu_max_isa` caps only XLA's own LLVM code: AVX2 vs AVX-512 changes
nothing but the last bit of the logged loss here; SSE4_2 (no FMA) changes the
run. `--xla_cpu_multi_thread_eigen=false` changes nothing. With YNNPACK fusions
off (`ynn_off`), convolutions go to Eigen + oneDNN, whose kernels follow CPUID
unless ONEDNN_MAX_CPU_ISA caps them; `portable` fixes everything this script
can fix (see docs/evaluation_and_report.md on what that does and does not buy).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
NO_YNN = "--xla_cpu_experimental_ynn_fusion_type="  # empty list: no YNNPACK fusions
# name -> (XLA_FLAGS, extra environment, number of CPUs to pin to or None: all)
SETTINGS = {
    "default": ("", {}, None),
    "default_again": ("", {}, None),
    "isa_avx2": ("--xla_cpu_max_isa=AVX2", {}, None),
    "isa_sse42": ("--xla_cpu_max_isa=SSE4_2", {}, None),
    "eigen_single": ("--xla_cpu_multi_thread_eigen=false", {}, None),
    "one_thread": ("", {}, 1),
    "ynn_off": (NO_YNN, {}, None),
    "portable": (f"{NO_YNN} --xla_cpu_max_isa=AVX2", {"ONEDNN_MAX_CPU_ISA": "AVX2"}, 1),
}
DEFAULT_SETTINGS = ["default", "default_again", "isa_avx2", "isa_sse42", "one_thread", "ynn_off",
                    "portable"]


def final_params(workdir: str) -> list | None:
  """Leaves of the last Orbax checkpoint (None if it cannot be read)."""
  try:
    import orbax.checkpoint as ocp
    ckpts = os.path.join(workdir, "checkpoints")
    step = max(int(s) for s in os.listdir(ckpts) if s.isdigit())
    import jax
    return [np.asarray(x) for x in jax.tree.leaves(
        ocp.PyTreeCheckpointer().restore(os.path.join(ckpts, str(step), "state")))]
  except Exception as e:  # a changed checkpoint layout only loses this column
    logging.warning("could not read the checkpoint of %s: %s", workdir, e)
    return None


def host_fingerprint(data_root: str, seed: int) -> str:
  """CPU model and SIMD flags, usable CPUs, library versions, and a hash of the
  generated synthetic data: run this on two machines and diff the lines."""
  import importlib.metadata as md
  flags, model = set(), "?"
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          model = line.split(":", 1)[1].strip()
        elif line.startswith("flags"):
          flags = set(line.split(":", 1)[1].split())
  except OSError:
    pass
  simd = [f for f in ("sse4_2", "avx", "fma", "avx2", "avx512f", "avx512_bf16", "amx_tile")
          if f in flags]
  versions = []
  for pkg in ("jax", "jaxlib", "flax", "optax", "numpy", "pillow"):
    try:
      versions.append(f"{pkg} {md.version(pkg)}")
    except md.PackageNotFoundError:
      pass
  digest = hashlib.sha256()
  for folder, _, files in sorted(os.walk(data_root)):
    if f"seed{seed}_" in folder:
      for name in sorted(files):
        with open(os.path.join(folder, name), "rb") as f:
          digest.update(name.encode() + f.read())
  return (f"host: {model}; SIMD: {' '.join(simd)}; usable CPUs: {len(os.sched_getaffinity(0))}; "
          f"{', '.join(versions)}; synthetic data sha256: {digest.hexdigest()[:16]}")


def run_setting(name: str, args) -> dict:
  xla_flags, env_extra, cpus = SETTINGS[name]
  workdir = os.path.join(args.out, name)
  finished = os.path.exists(os.path.join(workdir, "results.json"))
  if not (args.reuse and finished):
    shutil.rmtree(workdir, ignore_errors=True)
  env = dict(os.environ, JAX_PLATFORMS="cpu", **env_extra)
  env["XLA_FLAGS"] = " ".join(f for f in (os.environ.get("XLA_FLAGS", ""), xla_flags) if f)
  config = str(ROOT / "configs" / "synthetic.py")
  cmd = [sys.executable, "-m", "fedreid_jax.main", "--config", config, "--workdir", workdir,
         f"--config.data.root={args.data_root}", f"--config.fed.rounds={args.rounds}",
         "--config.baselines=()",
         f"--config.eval.every_rounds={args.rounds}", "--config.eval.client_models=False",
         f"--config.seed={args.seed}"]

  def pin():  # the first `cpus` usable CPUs: XLA sizes its intra-op thread pool from these
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cpus])
  logging.info("%s: XLA_FLAGS=%r %s cpus=%s", name, env["XLA_FLAGS"], env_extra, cpus or "all")
  t0 = time.time()
  if args.reuse and finished:
    logging.info("%s: reusing %s", name, workdir)
  else:
    with open(workdir + ".log", "w", encoding="utf-8") as log:
      rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                          preexec_fn=pin if cpus else None, check=False).returncode
    if rc:
      sys.exit(f"error: setting {name} failed (exit {rc}); see {workdir}.log")
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    records = [json.loads(line) for line in f]
  train = [r for r in records if r["kind"] == "train"]
  final = [r for r in records if r["kind"] == "eval"][-1]
  per_client = lambda m: [v for k, v in final.items() if k.startswith("eval/") and k.endswith(m)]
  return {"name": name, "loss1": train[0]["train/loss"],
          "rank1": 100 * float(np.mean(per_client("/rank1"))),
          "mAP": 100 * float(np.mean(per_client("/mAP"))),
          "sec": float(np.mean([r["train/round_seconds"] for r in train[1:]] or [np.nan])),
          "wall": time.time() - t0,
          "records": [{k: v for k, v in r.items() if k != "train/round_seconds"} for r in records],
          "params": final_params(workdir),
          "how": " ".join(x for x in (xla_flags, *(f"{k}={v}" for k, v in env_extra.items()),
                                      f"cpus={cpus}" if cpus else "") if x) or "(none)"}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default="/tmp/cpu_repro", help="scratch folder for the workdirs")
  p.add_argument("--data_root", default="data", help="passed as --config.data.root")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS, choices=sorted(SETTINGS),
                 help="first one is the reference for 'bit-identical'")
  p.add_argument("--reuse", action="store_true", help="do not rerun finished workdirs")
  args = p.parse_args()
  args.out, args.data_root = os.path.abspath(args.out), os.path.abspath(args.data_root)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
  os.makedirs(args.out, exist_ok=True)
  rows = []
  for name in args.settings:
    rows.append(run_setting(name, args))
    logging.info("%s: round-1 loss %r, mean rank-1 %.2f%% (%.0f s)", name, rows[-1]["loss1"],
                 rows[-1]["rank1"], rows[-1]["wall"])
  ref, ref_params = rows[0]["records"], rows[0]["params"]

  def same_params(r):
    if ref_params is None or r["params"] is None:
      return "?"
    return "yes" if len(ref_params) == len(r["params"]) and all(
        np.array_equal(a, b) for a, b in zip(ref_params, r["params"])) else "no"

  print(f"\n**{args.rounds} FedPav rounds, seed {args.seed}; identical = bit-identical to "
        f"`{rows[0]['name']}` (metrics.jsonl without timings; final checkpoint)**\n")
  print(host_fingerprint(args.data_root, args.seed) + "\n")
  print("| Setting | Round-1 loss | Mean R-1 | Mean mAP | Same metrics | Same params | s/round "
        "| How |")
  print("|---|---:|---:|---:|:---:|:---:|---:|---|")
  for r in rows:
    same = "yes" if r["records"] == ref else "no"
    print(f"| {r['name']} | {r['loss1']!r} | {r['rank1']:.2f} | {r['mAP']:.2f} | {same} | "
          f"{same_params(r)} | {r['sec']:.1f} | `{r['how']}` |")


if __name__ == "__main__":
  main()
