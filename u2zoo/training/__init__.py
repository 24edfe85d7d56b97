"""Training: folder datasets, losses, the trainer, and distillation from a teacher."""
