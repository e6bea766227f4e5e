"""Command line: build the TFDS copies of the real datasets.

    python -m fedreid_jax.data prepare --dataset market1501 \
        --manual_dir /path/to/Market-1501-v15.09.15 [--data_dir data/tfds] \
        [--overwrite] [--skip_corrupt] [--split_seed 0]
    python -m fedreid_jax.data prepare --dataset all --manual_dir /path/to/datasets

With `--dataset all`, `--manual_dir` is a folder holding one folder per
dataset (release names such as `Market-1501-v15.09.15`, `MSMT17_V1`,
`cuhk03-np`, `prid_2011`, or the reference's `Market`, `prid`, ...). With several
datasets, those already prepared are kept (pass `--overwrite` to rebuild) and
the others built. Exit status: 1 when a dataset could not be built (missing,
corrupt image) or, asked for alone, is already prepared; 0 otherwise.
"""
from __future__ import annotations

import argparse
import logging
import sys

from fedreid_jax.data import prepare, specs


class OneLineParser(argparse.ArgumentParser):
  """argparse whose usage errors are one line (`error: ...`, status 2)."""

  def error(self, message):
    self.exit(2, f"error: {message}; see {self.prog} --help\n")


def _parser() -> argparse.ArgumentParser:
  p = OneLineParser(prog="python -m fedreid_jax.data",
                    description="Prepare the re-ID datasets as TFDS array_record.")
  sub = p.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
  prep = sub.add_parser("prepare", help="build one dataset, or all")
  prep.add_argument("--dataset", required=True,
                    help=f"one of {', '.join(specs.ALL)}, a comma-separated list, "
                         "or 'all'")
  prep.add_argument("--manual_dir", required=True,
                    help="the extracted dataset folder (or, with 'all', their parent)")
  prep.add_argument("--data_dir", default=prepare.DEFAULT_DATA_DIR,
                    help="where the TFDS copies go (default: %(default)s)")
  prep.add_argument("--overwrite", action="store_true", help="rebuild an existing copy")
  prep.add_argument("--skip_corrupt", action="store_true",
                    help="skip undecodable images (and report how many) instead of stopping")
  prep.add_argument("--split_seed", type=int, default=0,
                    help="seed of our split for the small datasets (default: %(default)s)")
  return p


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  kwargs = dict(overwrite=args.overwrite, skip_corrupt=args.skip_corrupt,
                split_seed=args.split_seed)
  if args.dataset.lower() == "all":
    names = specs.ALL
  else:
    try:
      names = tuple(specs.resolve_name(n) for n in args.dataset.split(",") if n.strip())
    except KeyError as e:
      print(f"error: {e.args[0]}", file=sys.stderr)
      return 1
  done, failed, kept = prepare.prepare_all(args.manual_dir, args.data_dir, names=names,
                                           **kwargs)
  if done:
    print(prepare.summary_table(done))
    for p in done:
      for m in p.mismatches:
        print(f"warning: {m}")
      if p.skipped:
        print(f"{p.name}: skipped {len(p.skipped)} corrupt image(s): "
              + ", ".join(p.skipped[:5]) + (" ..." if len(p.skipped) > 5 else ""))
  for msg in kept.values():
    if len(names) == 1:
      print(f"error: {msg}", file=sys.stderr)
    else:
      print(f"kept: {msg}")
  for msg in failed.values():
    print(f"error: {msg}", file=sys.stderr)
  return 1 if failed or (kept and len(names) == 1) else 0


if __name__ == "__main__":
  sys.exit(main())
