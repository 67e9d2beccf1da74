"""A digits task whose central evaluation waits at a gate: it holds a cloud inside a round's
aggregation for as long as a test needs (the test then kills it there).

The coordinator calls :meth:`central_data` in the middle of aggregating a round, after the
strategy has folded in every update and the new global weights are written, before the
round's record, the privacy ledger and the state are saved. While the ``open`` file does
not exist in the gate folder, the call writes ``reached`` there and waits for it (bounded).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from fl_tasks.digits import DigitsTask

HOLD_S = 120.0
"""A gate left closed this long is a broken test: the call fails and the round with it."""


class GatedDigitsTask(DigitsTask):
    """:class:`DigitsTask` held at a gate folder during central evaluation."""

    def __init__(self, gate: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.gate = Path(gate)

    def central_data(self) -> tuple[np.ndarray, np.ndarray]:
        """The held-out split, once the gate is open."""
        if not (self.gate / "open").exists():
            (self.gate / "reached").write_text(str(time.time()))
            deadline = time.monotonic() + HOLD_S
            while not (self.gate / "open").exists():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"gate {self.gate} stayed closed for {HOLD_S} s")
                time.sleep(0.01)
        return super().central_data()
