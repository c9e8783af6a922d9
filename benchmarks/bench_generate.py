"""Pairs/s of the engine against a reference-style loop; see magicseg_engine.bench.generate.

    python benchmarks/bench_generate.py --preset tiny --json benchmarks/results/generate-cpu.json

is the same as `magicseg-engine bench generate ...`.
"""

from magicseg_engine.cli import app

if __name__ == "__main__":
    import sys

    app(["bench", "generate", *sys.argv[1:]])
