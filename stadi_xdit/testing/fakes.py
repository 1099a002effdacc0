"""Stand-ins for a process group in unit tests that need no processes."""

from __future__ import annotations


class TwoRankGroup:
    """A group of two ranks (a Ulysses group) whose other rank reports `peer` in every all-gather of a float;
    what this rank sent is kept in `sent`."""

    world_size = 2

    def __init__(self, peer: float):
        self.peer, self.sent = peer, []

    def all_gather_floats(self, value: float, device) -> list[float]:
        self.sent.append(value)
        return [value, self.peer]
