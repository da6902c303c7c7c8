"""Peak resident-set growth of one callable, and the capture bound it is compared with.

Shared by the benchmarks that report memory. Run each measurement in a fresh process: the
allocator reuses memory that earlier work freed, so a figure taken after other runs can only
under-count.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


def peak_rss_growth(fn: Callable[[], object], interval_s: float = 0.002) -> int:
    """Run ``fn`` and return the peak RSS during it minus the RSS just before, in bytes.

    The resident set is sampled every ``interval_s`` seconds, so a spike shorter than that can be
    missed: the figure is a lower bound of what ``fn`` needs.
    """
    import psutil

    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(interval_s)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    peak[0] = max(peak[0], proc.memory_info().rss)
    return peak[0] - base


def capture_bound_bytes(response_tokens: int, num_blocks: int, hidden_size: int) -> int:
    """The capture buffers' bound ``R·(B+1)·3·d·4`` bytes: three float32 ``d``-vectors per boundary and token."""
    return response_tokens * (num_blocks + 1) * 3 * hidden_size * 4
