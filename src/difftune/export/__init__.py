"""What leaves a run: the model card and Hub upload (hub), LoRA key formats (lora), and the
`difftune export` verbs (verbs), which ask the family for its single-file layouts.
Nothing is imported here, so that the CLI's parser stays fast."""
