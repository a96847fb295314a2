"""Training engine: one loop for every variant and the dVAE, with checkpoints, resume and DDP."""
