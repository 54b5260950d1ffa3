"""SLURM: render and submit `merino-pl fit` jobs (one task per GPU, checkpoint + requeue on SIGUSR1)."""
