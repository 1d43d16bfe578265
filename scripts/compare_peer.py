#!/usr/bin/env python
"""Prints the README's speed comparison: our benchmark.json against scripts/bench_peer.py's JSON.

  python scripts/compare_peer.py runs/bench32/benchmark.json runs/peer/peer.json
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ddpm import benchmark  # noqa: E402


def main(argv):
  if len(argv) != 3:
    sys.exit(f"usage: {argv[0]} OUR_BENCHMARK_JSON PEER_JSON")
  try:
    with open(argv[1]) as f:
      ours = json.load(f)
    with open(argv[2]) as f:
      peer = json.load(f)
    print(benchmark.format_peer_comparison(ours, peer))
  except (OSError, ValueError, KeyError) as e:  # missing/corrupt file, runs not comparable
    sys.exit(f"{argv[0]}: {type(e).__name__}: {e}")


if __name__ == "__main__":
  main(sys.argv)
