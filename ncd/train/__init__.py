"""Training: the loop, its data and augmentations, checkpoints and the resume policy, prototype refinement."""
