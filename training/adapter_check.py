"""The inference job's guard: attaching the adapter must leave the base model as it was.

The base model's logits on one probe prompt are taken before the adapter is attached, and
again through `disable_adapter()` after: they must agree. A layer that PEFT wrapped in a state
it does not expect (issue #8: bitsandbytes' CPU repack of 4-bit weights at the first forward)
then stops the job with a clear error instead of printing a silent 0.00 for every answer.
"""

from __future__ import annotations

# Identical math before and after (the same 4-bit kernels, the adapter bypassed), so any real
# corruption is far outside this; float reassociation is not.
RTOL = 1e-3
ATOL = 1e-3


class BaseModelChanged(RuntimeError):
    pass


def probe_logits(model, tokenizer, text: str):
    import torch

    batch = tokenizer([text], return_tensors="pt").to(next(model.parameters()).device)
    with torch.no_grad():
        return model(**batch).logits[0, -1].float().cpu()


def check_base_unchanged(peft_model, tokenizer, text: str, reference) -> float:
    """The largest logit difference on the probe; raises BaseModelChanged past the tolerance."""
    import torch

    with peft_model.disable_adapter():
        logits = probe_logits(peft_model, tokenizer, text)
    difference = float((logits - reference).abs().max())
    if not torch.allclose(logits, reference, rtol=RTOL, atol=ATOL):
        raise BaseModelChanged(
            "attaching the adapter changed the base model's weights: with the adapter disabled, "
            f"the logits on the probe prompt differ from the bare base model's by up to {difference:.4g} "
            f"(tolerance {ATOL} + {RTOL}×|logit|). Answers would be wrong; nothing was written."
        )
    return difference
