"""How close a quantized model's logits are to the reference's: build-time checks and tests."""

from __future__ import annotations

import torch


def logit_agreement(ref_logits: torch.Tensor, test_logits: torch.Tensor) -> dict[str, float]:
    """Logits [..., vocab] of the same positions -> {"kl": mean over positions of
    KL(ref || test) in nats, "top1": fraction of positions whose argmax agrees}. Computed in
    float64 so that a near-zero KL is not rounding noise of bfloat16/float32 logits."""
    if ref_logits.shape != test_logits.shape or ref_logits.ndim == 0:
        raise ValueError(
            f"logit_agreement: shapes {list(ref_logits.shape)} and {list(test_logits.shape)}"
        )
    vocab = ref_logits.shape[-1]
    ref = torch.log_softmax(ref_logits.detach().reshape(-1, vocab).to(torch.float64), dim=-1)
    test = torch.log_softmax(test_logits.detach().reshape(-1, vocab).to(torch.float64), dim=-1)
    p = ref.exp()
    # Tokens the reference gives no probability (masked, -inf logits) add nothing.
    terms = torch.where(p > 0, p * (ref - test), torch.zeros_like(p))
    kl = terms.sum(dim=-1).mean()
    top1 = (ref.argmax(dim=-1) == test.argmax(dim=-1)).to(torch.float64).mean()
    return {"kl": float(kl), "top1": float(top1)}
