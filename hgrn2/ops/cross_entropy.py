"""Cross-entropy of a linear head without materialising the full logits.

For N tokens and a vocabulary of V the logits are ``N × V`` (8 × 2048 tokens × 50k words in fp32 is 3.3 GB,
plus as much again for their gradient). Here the head and the loss run over blocks of tokens: each block's
logits live only while that block is processed, and the gradients for the hidden states and the head weight
are computed right there, in the forward pass, so the backward pass only scales them.
"""

from __future__ import annotations

import torch

from hgrn2.ops.reference import output_dtype


def _block_statistics(h, weight, target, mask):
    """Logits ``[n, V]`` (fp32), their log-normaliser, and the block's summed loss and correct count."""
    logits = (h @ weight.T).float()
    log_norm = logits.logsumexp(dim=-1)
    target_logit = logits.gather(1, target.clamp_min(0)[:, None])[:, 0]
    loss = ((log_norm - target_logit) * mask).sum()
    correct = ((logits.argmax(dim=-1) == target) & mask).sum()
    return logits, log_norm, loss, correct


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, block_size):
        dtype = output_dtype(hidden.dtype, hidden.device)
        hidden_c, weight_c = hidden.to(dtype), weight.to(dtype)
        valid = labels != ignore_index
        n_valid = valid.sum().clamp_min(1).float()
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.int64, device=hidden.device)
        for start in range(0, hidden.shape[0], block_size):
            h = hidden_c[start : start + block_size]  # [n, D]
            target = labels[start : start + block_size]
            mask = valid[start : start + block_size]
            logits, log_norm, block_loss, block_correct = _block_statistics(h, weight_c, target, mask)  # [n, V]
            loss += block_loss
            correct += block_correct
            # d loss / d logits = (softmax - onehot) / n_valid on valid rows, 0 elsewhere
            grad_logits = (logits - log_norm[:, None]).exp_()
            rows = torch.arange(logits.shape[0], device=logits.device)
            grad_logits[rows, target.clamp_min(0)] -= 1.0
            grad_logits *= (mask.float() / n_valid)[:, None]
            grad_logits = grad_logits.to(dtype)
            grad_hidden[start : start + block_size] = grad_logits @ weight_c
            grad_weight.addmm_(grad_logits.T.float(), h.float())
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        ctx.mark_non_differentiable(correct)
        return loss / n_valid, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            grad_hidden * grad_loss.to(grad_hidden.dtype),
            grad_weight * grad_loss.to(grad_weight.dtype),
            None,
            None,
            None,
        )


def check_inputs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> None:
    """hidden ``[N, D]``, weight ``[V, D]`` and int64 labels ``[N]``, or a ValueError naming the mismatch."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden must be [N, D] and weight [V, D] with the same D, got {list(hidden.shape)}, {list(weight.shape)}"
        )
    if labels.shape != hidden.shape[:1] or labels.dtype != torch.int64:
        raise ValueError(
            f"labels must be int64 of shape [N] = [{hidden.shape[0]}], got {labels.dtype} {list(labels.shape)}"
        )


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    block_size: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``labels``, and the number of correct argmax predictions.

    Args:
        hidden: ``[N, D]`` final hidden states; weight: ``[V, D]`` head (or tied embedding) weight.
        labels: int64 ``[N]``; entries equal to ``ignore_index`` count neither in the loss nor in the mean.
        block_size: tokens whose logits are formed at once (memory ``block_size × V`` in fp32).

    Returns:
        ``(loss, correct)``: the mean loss over non-ignored tokens (float32, differentiable w.r.t. hidden and
        weight) and the count of non-ignored tokens whose argmax logit is the label.
    """
    check_inputs(hidden, weight, labels)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, labels, ignore_index, block_size)
    with torch.no_grad():
        dtype = output_dtype(hidden.dtype, hidden.device)
        valid = labels != ignore_index
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.int64, device=hidden.device)
        weight_c = weight.to(dtype)
        for start in range(0, hidden.shape[0], block_size):
            block = slice(start, start + block_size)
            _, _, block_loss, block_correct = _block_statistics(
                hidden[block].to(dtype), weight_c, labels[block], valid[block]
            )
            loss += block_loss
            correct += block_correct
        return loss / valid.sum().clamp_min(1), correct
