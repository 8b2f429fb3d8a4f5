"""PromptLoader: epoch-based, seeded batching of Examples with an exactly resumable state."""

from __future__ import annotations

import random
from collections.abc import Iterator


class PromptLoader:
    """Yield lists of Examples, epoch by epoch, in a seeded order that a checkpoint can resume.

    Epoch ``e`` visits the examples in a permutation drawn from ``(seed, e)`` (or in order when
    ``shuffle=False``). ``state_dict()`` records (epoch, position, seed), where ``position`` counts
    the batches of the current epoch already handed out, so a loader restored with
    ``load_state_dict`` hands out exactly the batch an uninterrupted run would hand out next.

    ``for batch in loader`` runs over the rest of the current epoch, then moves to the next one;
    ``next_batch()`` crosses epoch boundaries by itself (for step-based training loops).
    """

    def __init__(self, examples: list[dict], batch_size: int, seed: int, shuffle: bool = True,
                 drop_last: bool = True):
        """Wrap ``examples``; at least one batch per epoch is required."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.examples, self.batch_size, self.seed = list(examples), batch_size, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.epoch, self.position = 0, 0
        if len(self) == 0:
            raise ValueError(f"{len(self.examples)} examples give no batch of {batch_size} "
                             f"(drop_last={drop_last}); lower the batch size or add data")

    def __len__(self) -> int:
        """Number of batches per epoch."""
        n, b = len(self.examples), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def _order(self, epoch: int) -> list[int]:
        """Index order of one epoch."""
        order = list(range(len(self.examples)))
        if self.shuffle:
            random.Random(f"prompt-loader:{self.seed}:{epoch}").shuffle(order)
        return order

    def next_batch(self) -> list[dict]:
        """Return the next batch, starting a new epoch when the current one is used up."""
        if self.position >= len(self):
            self.epoch, self.position = self.epoch + 1, 0
        start = self.position * self.batch_size
        idx = self._order(self.epoch)[start:start + self.batch_size]
        self.position += 1
        return [self.examples[i] for i in idx]

    def __iter__(self) -> Iterator[list[dict]]:
        """Iterate over the remaining batches of the current epoch; the next loop starts a new epoch."""
        if self.position >= len(self):
            self.epoch, self.position = self.epoch + 1, 0
        while self.position < len(self):
            yield self.next_batch()

    def state_dict(self) -> dict:
        """The loader's progress: ``epoch``, ``position`` (batches handed out this epoch), ``seed``."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_examples": len(self.examples)}

    def load_state_dict(self, state: dict) -> None:
        """Restore progress saved by ``state_dict`` (the examples must be the same list)."""
        if state.get("num_examples", len(self.examples)) != len(self.examples):
            raise ValueError(f"PromptLoader state was saved for {state['num_examples']} examples, this loader "
                             f"has {len(self.examples)}: resume with the same dataset")
        self.epoch, self.position, self.seed = int(state["epoch"]), int(state["position"]), state["seed"]
