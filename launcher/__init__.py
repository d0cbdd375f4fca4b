"""qlaunch: grids of QLoRA fine-tuning runs on Slurm, Kubernetes or this machine."""

__version__ = "0.1.0"
