"""L2Wrap: a small push on the largest logit, hidden in the backward pass (notebook 04).

This is the real custom `torch.autograd.Function` of notebook 04, and its backward is *not*
the derivative of its forward. Forward hands the loss back untouched; backward passes the
loss gradient through and adds, for every position, a gradient on that position's
largest logit:

    d/d logits[b, t, argmax] += 1e-4 / (B*T) * max_logit[b, t]

That is the gradient of the penalty 1e-4/(B*T) * sum over positions of max_logit^2 / 2,
which is never added to the reported loss. It keeps the logits from drifting upward
(softmax does not care about a constant shift, so nothing else stops them), which
matters in bfloat16 where large logits lose precision (docs/rwkv4.md, section 12).

    loss = L2Wrap.apply(F.cross_entropy(logits.view(-1, V), targets.view(-1)), logits)
"""

from __future__ import annotations

import torch

PENALTY = 1e-4  # the RWKV-4 coefficient, before dividing by the number of positions


class L2Wrap(torch.autograd.Function):
    @staticmethod
    def forward(ctx, loss: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(logits)
        return loss

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        (logits,) = ctx.saved_tensors
        positions = logits.numel() // logits.shape[-1]  # B*T for (B, T, V) logits
        max_logit, where = logits.max(dim=-1, keepdim=True)
        grad_logits = torch.zeros_like(logits)
        # Not scaled by grad_output: the push is a fixed regularizer, as in RWKV-4.
        grad_logits.scatter_(-1, where, max_logit * (PENALTY / positions))
        return grad_output, grad_logits


def l2wrap(loss: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """`L2Wrap.apply` under a name that reads like a function."""
    return L2Wrap.apply(loss, logits)
