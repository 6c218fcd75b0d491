"""A training callback for tests: Ctrl-C once, at the start of one epoch, as a user stopping a run would."""
from pathlib import Path

import lightning as L


class InterruptOnce(L.Callback):
    def __init__(self, at_epoch: int, marker: str):
        self.at_epoch = at_epoch
        self.marker = Path(marker)

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.at_epoch and not self.marker.exists():
            self.marker.touch()
            raise KeyboardInterrupt
