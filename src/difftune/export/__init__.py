"""What leaves a run: the model card and Hub upload (hub), single-file checkpoints, LoRA
formats, and the `difftune export` verbs (verbs). Nothing is imported here, so that the
CLI's parser stays fast."""
