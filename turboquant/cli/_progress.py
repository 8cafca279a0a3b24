"""Progress reporting of the command-line tool: tqdm when installed, else one stderr line."""

import sys
import time


class Progress:
    """A progress bar over ``total`` units (``with Progress(...) as bar: bar.update(n)``).

    Uses tqdm when it is installed and prints a plain line to stderr (rewritten
    at most every half second) otherwise; ``quiet`` prints nothing. Nothing is
    shown for work that ends within about a second.
    """

    def __init__(self, total, description, *, quiet=False, unit="it"):
        self.total, self.description, self.quiet, self.unit = total, description, quiet, unit
        self.done = 0
        self._bar = None
        self._start = self._shown = time.perf_counter()
        self._printed = False

    def __enter__(self):
        if not self.quiet:
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self._bar = tqdm(total=self.total, desc=self.description, unit=self.unit, file=sys.stderr,
                                 delay=1.0, leave=False, dynamic_ncols=True)
        return self

    def update(self, count):
        """Record ``count`` more units done."""
        self.done += count
        if self._bar is not None:
            self._bar.update(count)
            return
        now = time.perf_counter()
        if self.quiet or now - self._start < 1.0 or now - self._shown < 0.5:
            return
        self._shown = now
        share = f" {100 * self.done / self.total:.0f}%" if self.total else ""
        sys.stderr.write(f"\r{self.description}: {self.done}/{self.total or '?'} {self.unit}{share}")
        sys.stderr.flush()
        self._printed = True

    def __exit__(self, *exc_info):
        if self._bar is not None:
            self._bar.close()
        elif self._printed:
            sys.stderr.write("\n")
            sys.stderr.flush()
