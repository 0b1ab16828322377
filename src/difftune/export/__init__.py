"""What leaves a run: the model card and Hub upload, single-file checkpoints, LoRA formats."""

from difftune.export.hub import push_to_hub, write_model_card

__all__ = ["push_to_hub", "write_model_card"]
