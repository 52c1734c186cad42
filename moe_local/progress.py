"""Progress for long phases: a tqdm bar when stdout is a terminal, plain lines otherwise."""

from __future__ import annotations

import sys

MODES = ("auto", "bar", "lines", "off")


class Progress:
    """``mode``: auto (bar on a terminal, else lines), bar, lines (only logged lines and the summary), off.
    ``unit``: what is counted (the bar shows its rate, e.g. records/s, and the time left)."""

    def __init__(self, total: int, desc: str, mode="auto", initial: int = 0, unit: str = "it"):
        if mode not in MODES:
            raise ValueError(f"progress mode must be one of {MODES}, got {mode!r}")
        if mode == "auto":
            mode = "bar" if sys.stdout.isatty() else "lines"
        self.mode = mode
        self.bar = None
        if mode == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, initial=initial, unit=unit, dynamic_ncols=True, leave=False)

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def log(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        elif self.mode != "off":
            print(line, flush=True)

    def close(self, summary: str | None = None) -> None:
        if self.bar is not None:
            self.bar.refresh()  # the final count, even when the phase ended within tqdm's redraw interval
            self.bar.close()
            self.bar = None
        if summary:
            self.log(summary)
