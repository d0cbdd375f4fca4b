"""What runs inside a job: QLoRA supervised fine-tuning (`training.sft`) and inference (`training.infer`).

Imports torch/transformers/peft/trl lazily inside functions where the launcher might import a
helper from here; the job entrypoints import them at the top.
"""
