"""Stage 4 of the pipeline: prompts -> images and the cross-attention maps of their class tokens."""
