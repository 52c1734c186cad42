"""The prefix cache: hidden states at the input of the first tuned layer, kept between tune steps.

Everything below the first tuned layer is frozen, so its output is computed once (in the
bank pass) and each step runs only the tuned suffix; when it would not fit the budget the prefix is
recomputed under no-grad instead.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

CACHE_MODES = ("auto", "memory", "disk", "recompute", "full")


class PrefixCache:
    """Hidden states at the input of the first tuned layer, per record, ragged, in the model's dtype.

    ``memory``: backend arrays; ``disk``: one memory-mapped file (exact bytes); ``recompute``: nothing
    kept, the prefix is run under no-grad at each step; ``full``: each step runs the whole model (the
    baseline the released code implies); ``auto``: memory when it fits ``budget_gb``, else recompute.
    """

    def __init__(self, model, encoded, layer: int, mode: str = "auto", budget_gb: float = 4.0, path=None, owned=None):
        self.model, self.layer, self.path = model, layer, path
        # ``owned``: the records this process keeps (a rank's shard); the others take no room.
        keep = None if owned is None else set(np.asarray(owned).tolist())
        self.lengths = [
            [len(s) for s in e.sequences] if keep is None or i in keep else [] for i, e in enumerate(encoded)
        ]
        self.tokens = sum(sum(x) for x in self.lengths)
        self.mode = mode
        self.budget = budget_gb * 1024**3
        self.rows: dict[int, list] = {}
        self.mmap = None
        self.offsets = np.concatenate([[0], np.cumsum([sum(x) for x in self.lengths])]).astype(np.int64)

    @property
    def stores(self) -> bool:
        return self.mode in ("memory", "disk", "auto")

    def _decide(self, sample) -> None:
        host = self.model.hidden_to_host(sample[:1])
        nbytes = self.tokens * host.shape[-1] * host.itemsize
        if self.mode == "auto":
            self.mode = "memory" if nbytes <= self.budget else "recompute"
        if self.mode == "disk":
            self.mmap = np.lib.format.open_memmap(
                str(self.path), mode="w+", dtype=host.dtype, shape=(self.tokens, host.shape[-1])
            )

    def put(self, batch, hidden: list) -> None:
        if not self.stores:
            return
        if self.mode == "auto" or (self.mode == "disk" and self.mmap is None):
            self._decide(hidden[0])
            if not self.stores:
                return
        for b, record in enumerate(batch.index):
            seqs = [hidden[s] for s in np.flatnonzero(batch.seq_sample == b)]
            if self.mmap is not None:
                at = self.offsets[record]
                for h in seqs:
                    self.mmap[at : at + h.shape[0]] = self.model.hidden_to_host(h)
                    at += h.shape[0]
                self.rows[int(record)] = True
            else:
                self.rows[int(record)] = seqs

    def get(self, batch) -> list:
        """The batch's per-sequence hidden states: cached, or computed now (no grad)."""
        if self.mode == "full":
            return self.model.prefix_hidden(batch, 0)
        if self.mode == "recompute" or not self.rows:
            return self.model.prefix_hidden(batch, self.layer)
        out = []
        for record in batch.index:
            if self.mmap is not None:
                at = self.offsets[record]
                for n in self.lengths[record]:
                    out.append(self.model.hidden_from_host(self.mmap[at : at + n]))
                    at += n
            else:
                out.extend(self.rows[int(record)])
        return out

    @property
    def start_layer(self) -> int:
        return 0 if self.mode == "full" else self.layer

    def close(self) -> None:
        self.rows.clear()
        if self.mmap is not None:
            del self.mmap
            self.mmap = None
            Path(self.path).unlink(missing_ok=True)
