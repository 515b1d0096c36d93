"""Side-by-side wall-clock timing on a shared, noisy machine."""
from __future__ import annotations

import time
from typing import Callable, Mapping


def interleaved_best(fns: Mapping[str, Callable[[], object]], repeats: Mapping[str, int],
                     warm: bool = False) -> dict[str, float]:
    """Best wall time (s) of each function, the calls interleaved round by round so that every
    function sees the same spells of load (``repeats[name]`` timed calls of each).

    With ``warm`` each timed call follows an untimed call of the same function: the steady
    state of calling it repeatedly, not the state the previous function left (on the 2-core
    VM a chunkwise DeltaNet call right after 140 ms of the eager loop's one-thread, tiny-op
    work took ~25% longer than right after itself, and right after sleeping as long)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(max(repeats.values())):
        for name, fn in fns.items():
            if round_ < repeats[name]:
                if warm:
                    fn()
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}
