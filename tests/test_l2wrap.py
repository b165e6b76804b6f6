import torch
import torch.nn.functional as F

from rwkv_lib.l2wrap import PENALTY, L2Wrap, l2wrap


def _logits_and_targets(B: int = 3, T: int = 5, V: int = 11):
    g = torch.Generator().manual_seed(1)
    logits = (3 * torch.randn(B, T, V, generator=g, dtype=torch.float64)).requires_grad_()
    targets = torch.randint(0, V, (B, T), generator=g)
    return logits, targets


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def test_loss_value_is_unchanged():
    logits, targets = _logits_and_targets()
    loss = _cross_entropy(logits, targets)
    assert torch.equal(L2Wrap.apply(loss, logits), loss)


def test_gradient_is_cross_entropy_plus_push_on_the_largest_logit():
    logits, targets = _logits_and_targets(B=3, T=5, V=11)
    (ce_grad,) = torch.autograd.grad(_cross_entropy(logits, targets), logits)
    (grad,) = torch.autograd.grad(l2wrap(_cross_entropy(logits, targets), logits), logits)

    # By hand: each of the B*T = 15 positions gets 1e-4/15 * max on its argmax entry.
    expected = ce_grad.clone()
    flat = logits.detach().reshape(-1, 11)
    for pos in range(15):
        j = int(flat[pos].argmax())
        b, t = divmod(pos, 5)
        expected[b, t, j] += 1e-4 / 15 * flat[pos, j]
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-15)


def test_push_is_the_gradient_of_a_squared_max_penalty():
    logits, targets = _logits_and_targets(B=2, T=4, V=7)
    (ce_grad,) = torch.autograd.grad(_cross_entropy(logits, targets), logits)
    (grad,) = torch.autograd.grad(l2wrap(_cross_entropy(logits, targets), logits), logits)
    penalty = PENALTY / (2 * 4) * (logits.max(dim=-1).values ** 2).sum() / 2
    (penalty_grad,) = torch.autograd.grad(penalty, logits)
    torch.testing.assert_close(grad - ce_grad, penalty_grad)


def test_positions_counted_from_all_leading_dims():
    # (B, T, V) and the same logits as (B*T, V) must give the same push per position.
    logits, targets = _logits_and_targets(B=4, T=3, V=5)
    flat = logits.detach().reshape(12, 5).requires_grad_()
    (g3,) = torch.autograd.grad(l2wrap(_cross_entropy(logits, targets), logits), logits)
    loss2 = F.cross_entropy(flat, targets.flatten())
    (g2,) = torch.autograd.grad(l2wrap(loss2, flat), flat)
    torch.testing.assert_close(g3.reshape(12, 5), g2)


def test_gradient_reaches_the_model_through_both_paths():
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 6)
    x = torch.randn(2, 3, 4)
    logits = layer(x)
    loss = l2wrap(_cross_entropy(logits, torch.zeros(2, 3, dtype=torch.long)), logits)
    loss.backward()
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()
