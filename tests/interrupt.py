"""A training callback for tests: Ctrl-C (or SIGTERM, as a scheduler or `docker stop` sends) once, as a user
stopping a run would, at the start of one epoch or, after the fit, when the run starts testing; and a guard for
tests that send SIGTERM to their own process."""
import contextlib
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


@contextlib.contextmanager
def sigterm_fails_unless_handled():
    """Stands in for SIGTERM's default action, which would end pytest too: a SIGTERM the code under test leaves to
    it fails the test instead. Yields the stand-in, to check the code gave the signal back."""
    def default_action(signum, frame):
        raise AssertionError("SIGTERM took its default action")

    previous = signal.signal(signal.SIGTERM, default_action)
    try:
        yield default_action
    finally:
        signal.signal(signal.SIGTERM, previous)
