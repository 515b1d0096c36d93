"""Side-by-side wall-clock timing on a shared, noisy machine."""
from __future__ import annotations

import time
from typing import Callable, Mapping


def interleaved_best(fns: Mapping[str, Callable[[], object]], repeats: Mapping[str, int]) -> dict[str, float]:
    """Best wall time (s) of each function, the calls interleaved round by round so that every
    function sees the same spells of load (``repeats[name]`` calls of each)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(max(repeats.values())):
        for name, fn in fns.items():
            if round_ < repeats[name]:
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}
