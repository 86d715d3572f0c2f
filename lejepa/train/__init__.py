"""The pretrain stage: launching ranks (local, hostfile, Slurm, Kubernetes) and the per-rank program."""
