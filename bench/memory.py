"""Peak memory of a process tree while a query runs (a worker: its node process and every
execution process it started; the single-process side: that one process), sampled by a thread.

What is counted is anonymous resident memory (`RssAnon` of /proc/PID/status: the heap, where
the engine's data lives), summed over the tree at each sample; the peak is the largest sum.
Resident file pages are left out on purpose: a worker's processes share the mapped binary, and
summing their RSS would count its text once per process, as no single process pays.
"""

import threading
from pathlib import Path


def tree(pid: int) -> list[int]:
    """`pid` and its descendants (through /proc/PID/task/*/children)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return found


def rss_anon(pid: int) -> int:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakSampler:
    """Samples every `interval` seconds the anonymous memory of each named process tree."""

    def __init__(self, roots: dict[str, int], interval: float = 0.02):
        self.roots, self.interval = dict(roots), interval
        self.peaks: dict[str, int] = {name: 0 for name in roots}
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stopped.wait(self.interval):
            self.sample()

    def sample(self):
        with self.lock:
            for name, root in self.roots.items():
                self.peaks[name] = max(self.peaks[name], sum(rss_anon(p) for p in tree(root)))

    def reset(self):
        with self.lock:
            self.peaks = {name: 0 for name in self.roots}
        self.sample()

    def peak_bytes(self) -> dict[str, int]:
        self.sample()
        with self.lock:
            return dict(self.peaks)

    def stop(self):
        self.stopped.set()
        self.thread.join()
