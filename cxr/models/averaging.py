"""Exponential moving average of the weights, validated, checkpointed and tested as the model.

Lightning's EMAWeightAveraging validates the averaged weights and saves them as the checkpoint's
`state_dict` (the raw weights go to `current_model_state`, to resume training). When `trainer.test`
later loads that checkpoint, Lightning's callback would put the raw weights back into the module, so
the test metrics would describe other weights than the ones cxr-eval and cxr-serve load. Outside
fitting this subclass leaves the averaged `state_dict` in place.
"""
from __future__ import annotations

from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.trainer.states import TrainerFn


class EMAWeights(EMAWeightAveraging):
    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
