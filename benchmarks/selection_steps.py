"""Time the region-geometry steps that CROP's budget rule, fused CROP and PLC run per image, against the token
grid's size (Qwen2.5-VL grids of 1k, 4k and 16k tokens; a centred region of 1/9 of the image, and one of 8/9 as
an attention-found region may be): medians over repeats, in one run.

Usage: `python benchmarks/selection_steps.py [--repeats 5]`."""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

from crop.region import Region
from crop.strategies.crop_method import budget_cells
from crop.strategies.plc import PLC, group_cells

SIDES = (32, 64, 128)
REGIONS = {"1/9": Region(1 / 3, 1 / 3, 2 / 3, 2 / 3), "8/9": Region(0.0, 0.0, 1.0, 8 / 9)}


def median_seconds(step, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print("| grid | tokens | region | budget_cells ms | PLC group_cells ms |")
    print("|---|---|---|---|---|")
    for side in SIDES:
        for name, region in REGIONS.items():
            inside = region.token_mask(side, side)
            budget_ms = 1000 * median_seconds(partial(budget_cells, inside, side * side // 9), args.repeats)
            plc_ms = 1000 * median_seconds(partial(group_cells, inside, PLC(ratio=2)), args.repeats)
            print(f"| {side}x{side} | {side * side} | {name} | {budget_ms:.1f} | {plc_ms:.1f} |")

if __name__ == "__main__":
    main()
