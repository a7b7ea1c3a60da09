"""What the user touches: config, the `scratchgpt` CLI, stages, MLflow tracking and Slurm."""
