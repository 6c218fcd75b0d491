"""A training callback for tests: Ctrl-C once, as a user stopping a run would, at the start of one epoch or, after
the fit, when the run starts testing."""
from pathlib import Path

import lightning as L


class InterruptOnce(L.Callback):
    def __init__(self, marker: str, at_epoch: int | None = None, at_test: bool = False):
        self.at_epoch = at_epoch
        self.at_test = at_test
        self.marker = Path(marker)

    def _interrupt_once(self) -> None:
        if not self.marker.exists():
            self.marker.touch()
            raise KeyboardInterrupt

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.at_epoch:
            self._interrupt_once()

    def on_test_start(self, trainer, pl_module):
        if self.at_test:
            self._interrupt_once()
