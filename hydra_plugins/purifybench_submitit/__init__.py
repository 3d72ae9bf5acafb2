"""purifybench's Slurm launcher for Hydra (``hydra/launcher=slurm_local`` and ``slurm``): see ``launcher.py``."""
