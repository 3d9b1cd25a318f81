"""Which SuperNodes take part: wait for the expected fleet once, then use whoever is connected.

Flower's own sampler waits forever for `min_available_nodes`; a killed SuperNode would then hang
the run. Here the wait is bounded and later rounds continue with the nodes still connected.
"""

from __future__ import annotations

import time
from logging import INFO, WARNING

from flwr.common.logger import log
from flwr.serverapp import Grid


class FleetError(RuntimeError):
    """Not enough SuperNodes to run a round."""


def wait_for_nodes(grid: Grid, expected: int, timeout: float, poll: float = 1.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= expected:
            return nodes
        if time.monotonic() >= deadline:
            if nodes:
                log(
                    WARNING,
                    "Only %d of %d SuperNodes connected after %.0f s; continuing",
                    len(nodes),
                    expected,
                    timeout,
                )
                return nodes
            raise FleetError(f"no SuperNode connected within {timeout:.0f} s (expected {expected})")
        log(INFO, "Waiting for SuperNodes: %d of %d connected", len(nodes), expected)
        time.sleep(poll)


class Fleet:
    """Remembers whether the initial wait happened; afterwards never blocks for long."""

    def __init__(self, expected: int, startup_timeout: float, round_timeout: float) -> None:
        self.expected = expected
        self.startup_timeout = startup_timeout
        self.round_timeout = round_timeout
        self._started = False

    def nodes(self, grid: Grid) -> list[int]:
        if not self._started:
            self._started = True
            return wait_for_nodes(grid, self.expected, self.startup_timeout)
        return wait_for_nodes(grid, 1, self.round_timeout)
