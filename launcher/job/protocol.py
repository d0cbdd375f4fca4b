"""Names the launcher and a job must spell the same way, beyond run.yaml, storage and progress
events (their own modules here): the job image and the laptop's qlaunch can be different
versions (issue #20), so changing one of these is a protocol change, made on purpose.

Exit codes live with the progress events (progress.py); the requeue variables with the requeue
rule (requeue.py).
"""

from __future__ import annotations

# accelerate's default rendezvous port (training.launch's --main-process-port default); only
# multi-node jobs use it.
MAIN_PROCESS_PORT = 29500

# Kubernetes: the inference Job waits, suspended, until its training Job's last step releases it
# (training/handoff.py) with these, which the training pod gets from its manifest.
RELEASE_JOB_ENV = "QLAUNCH_RELEASE_JOB"
RELEASE_PATCH_ENV = "QLAUNCH_RELEASE_PATCH"
RELEASE_CREDENTIALS_ENV = "QLAUNCH_RELEASE_CREDENTIALS"
# Set on an inference pod that waits for its training's adapter (training/infer.py).
WAIT_FOR_TRAINING_ENV = "QLAUNCH_WAIT_FOR_TRAINING"
