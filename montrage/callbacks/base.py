"""The callback protocol: typed no-op event methods, like transformers' TrainerCallback."""
from __future__ import annotations

from typing import Any, Dict, Optional


class MontrageCallback:
    """Override the events you need; every method is a no-op by default."""

    def on_train_begin(self, step: int = 0) -> None:
        """Before the first optimizer update of this process (``step`` > 0 when resuming)."""

    def on_step_end(self, step: int, loss: Optional[float] = None) -> None:
        """After optimizer update number ``step`` (1-based), with that step's training loss."""

    def on_checkpoint(self, step: int) -> None:
        """When the training loop saves a checkpoint at ``step``."""

    def on_train_end(self, step: int) -> None:
        """After the last update."""

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned, so a resumed run continues cleanly."""
