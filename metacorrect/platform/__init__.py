"""Ray Train loop, checkpoints, collectives, MLflow tracking."""
