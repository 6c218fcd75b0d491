"""A training callback for tests: Ctrl-C (or SIGTERM, as a scheduler or `docker stop` sends) once, as a user
stopping a run would, at the start of one epoch or, after the fit, when the run starts testing."""
import os
import signal
from pathlib import Path

import lightning as L


class InterruptOnce(L.Callback):
    def __init__(self, marker: str, at_epoch: int | None = None, at_test: bool = False, by_sigterm: bool = False):
        self.at_epoch = at_epoch
        self.at_test = at_test
        self.by_sigterm = by_sigterm
        self.marker = Path(marker)

    def _interrupt_once(self) -> None:
        if not self.marker.exists():
            self.marker.touch()
            if self.by_sigterm:  # Lightning's handler stops the fit after the running batch
                os.kill(os.getpid(), signal.SIGTERM)
            else:
                raise KeyboardInterrupt

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.at_epoch:
            self._interrupt_once()

    def on_test_start(self, trainer, pl_module):
        if self.at_test:
            self._interrupt_once()
