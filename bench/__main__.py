"""``python -m bench [NAME ...]``: run the benchmarks and print their tables."""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = {
    "cli": "bench.bench_cli",
    "clinic": "bench.bench_clinic",
    "decode": "bench.bench_decode",
    "firmware": "bench.bench_firmware",
    "latency": "bench.bench_latency",
    "linklevel": "bench.bench_linklevel",
    "service": "bench.bench_service",
    "storage": "bench.bench_storage",
    "virtual_time": "bench.bench_virtual_time",
}


def main(argv: list[str]) -> int:
    names = argv or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
        return 2
    results = {name: importlib.import_module(BENCHMARKS[name]).run() for name in names}
    verdicts = (f"{name} {'met' if ok else 'MISSED'}" for name, ok in results.items())
    print("\nsummary: " + ", ".join(verdicts))
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
