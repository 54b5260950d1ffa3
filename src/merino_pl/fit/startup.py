"""Start-up lines held back until a run really starts, so that a bad value is the only line printed.

Lightning prints "Seed set to", the device lines ("GPU available ..."), a tip and "Restoring
states ..." while it builds the Trainer and restores a checkpoint; ``fit`` adds its W&B notice.
A data source, tokenizer or shard problem is found only after that (when the datamodule is built
or set up), so its one-line error used to come after five lines of banner. Here those lines are
buffered (a ``logging.handlers.MemoryHandler`` in place of Lightning's own handlers) and written
once training, validation or test starts (``ReleaseStartupLines``); on a ``MerinoError`` they are
dropped, on any other failure written before it propagates.
"""

from __future__ import annotations

import logging
import sys
from logging.handlers import MemoryHandler

import lightning as L

LOGGERS = ("lightning.pytorch", "lightning.fabric")


class HeldLines:
    """Lightning's log records and our own notices, in the order they came, until ``release``."""

    def __init__(self) -> None:
        self._saved: list[tuple[logging.Logger, list[logging.Handler], bool]] = []
        self._memory: MemoryHandler | None = None
        self._notices: list[tuple[int, str]] = []  # (records held before it, text)

    @property
    def holding(self) -> bool:
        return self._memory is not None

    def hold(self) -> None:
        if self.holding:
            return
        self._memory = MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1)
        for name in LOGGERS:
            log = logging.getLogger(name)
            self._saved.append((log, log.handlers[:], log.propagate))
            log.handlers, log.propagate = [self._memory], False

    def say(self, message: str) -> None:
        """Print ``message`` on stderr now, or with the held lines when holding."""
        if self._memory is not None:
            self._notices.append((len(self._memory.buffer), message))
        else:
            print(message, file=sys.stderr, flush=True)

    def release(self, emit: bool = True) -> None:
        """Restore Lightning's handlers and write what was held (``emit=False``: drop it)."""
        memory, self._memory = self._memory, None
        if memory is None:
            return
        for log, handlers, propagate in self._saved:
            log.handlers, log.propagate = handlers, propagate
        self._saved = []
        records, notices, self._notices = list(memory.buffer), self._notices, []
        memory.buffer.clear()
        if not emit:
            return
        for i, record in enumerate([*records, None]):
            for position, text in notices:
                if position == i:
                    print(text, file=sys.stderr, flush=True)
            if record is not None:
                logging.getLogger(record.name).handle(record)


STARTUP = HeldLines()


class ReleaseStartupLines(L.Callback):
    """Writes the held start-up lines when the loop begins (the data has been set up by then)."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        STARTUP.release()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        STARTUP.release()

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        STARTUP.release()
