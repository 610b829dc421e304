"""Draw the benchmark PNGs from recorded results (same as `fastlstm bench --from ... --plot DIR`).

    python benchmarks/plot.py                               # all of benchmarks/results
    python benchmarks/plot.py benchmarks/results/cpu-*.jsonl --out-dir /tmp/plots
"""
import argparse
import os
import sys

from fastlstm.bench import plot, records

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="*", default=[os.path.join(HERE, "results")],
                        help="JSON-lines files or folders of them (default benchmarks/results)")
    parser.add_argument("--out-dir", default=os.path.join(HERE, "results", "plots"))
    args = parser.parse_args(argv)
    made = records.load(args.results)
    if not made:
        print(f"plot: no records in {' '.join(args.results)}", file=sys.stderr)
        return 1
    for path in plot.draw(made, args.out_dir):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
