"""Linear cross-entropy over token blocks with a one-kernel softmax/gradient pass (Triton).

The same computation as :func:`hgrn2.ops.cross_entropy.linear_cross_entropy` (which is its PyTorch twin and
runs wherever Triton does not): for each block of tokens the logits ``h Wᵀ`` are formed in the compute dtype,
and one program per token reads its row twice (log-sum-exp with argmax, then the gradient) and writes
``(softmax − onehot) / n_valid`` over the logits in place. The block's contributions to d h and d W are
formed right there in the forward pass (d W accumulates in float32), so neither full logits nor their
float32 copies ever exist and the backward only scales two saved gradients.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from hgrn2.ops.cross_entropy import check_inputs, linear_cross_entropy
from hgrn2.ops.kernel_utils import unused
from hgrn2.ops.reference import output_dtype

__all__ = ["cross_entropy_rows", "fused_linear_cross_entropy"]

_BLOCK_V = 2048


@triton.jit
def ce_rows_kernel(
    logits_ptr, labels_ptr, loss_ptr, correct_ptr, scale_ptr, V, ignore_index, BLOCK_V: tl.constexpr,
    STORE_GRAD: tl.constexpr,
):  # fmt: skip
    # one program per token: pass 1 finds max, sum of exp and argmax over the row; pass 2 writes the gradient
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * V
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    target = tl.where(valid, label, 0)
    o_v = tl.arange(0, BLOCK_V)
    m = tl.zeros([], dtype=tl.float32) - float("inf")
    s = tl.zeros([], dtype=tl.float32)
    best = tl.zeros([], dtype=tl.float32) - float("inf")
    best_idx = tl.zeros([], dtype=tl.int64)
    for start in range(0, V, BLOCK_V):
        cols = start + o_v
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        block_max = tl.max(x, axis=0)
        block_arg = tl.argmax(x, axis=0, tie_break_left=True)
        new_m = tl.maximum(m, block_max)
        s = s * tl.exp(m - new_m) + tl.sum(tl.exp(x - new_m), axis=0)
        m = new_m
        better = block_max > best  # strict: the first maximum over the whole row wins, as torch.argmax
        best_idx = tl.where(better, start + block_arg.to(tl.int64), best_idx)
        best = tl.maximum(best, block_max)
    lse = m + tl.log(s)
    target_logit = tl.load(base + target).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(valid, lse - target_logit, 0.0))
    tl.store(correct_ptr + row, (valid & (best_idx == target)).to(tl.int32))
    if STORE_GRAD:
        scale = tl.where(valid, tl.load(scale_ptr), 0.0)
        for start in range(0, V, BLOCK_V):
            cols = start + o_v
            mask = cols < V
            x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
            grad = tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)
            tl.store(base + cols, (grad * scale).to(logits_ptr.dtype.element_ty), mask=mask)


def cross_entropy_rows(logits: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor | None, ignore_index: int):
    """Per-row loss (float32 ``[n]``, 0 where ignored) and correct flags (int32 ``[n]``) of contiguous logits
    ``[n, V]``; with ``scale`` (a float32 one-element tensor) the logits are overwritten by their gradient
    ``scale · (softmax − onehot)`` (0 on ignored rows)."""
    n, vocab = logits.shape
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    correct = torch.empty(n, dtype=torch.int32, device=logits.device)
    if n:
        ce_rows_kernel[(n,)](
            logits, labels, loss, correct, scale if scale is not None else unused(logits.device), vocab, ignore_index,
            BLOCK_V=min(_BLOCK_V, triton.next_power_of_2(vocab)), STORE_GRAD=scale is not None, num_warps=8,
        )  # fmt: skip
    return loss, correct


@functools.cache
def _has_mixed_addmm(device_type: str) -> bool:
    """Whether ``torch.addmm(..., out_dtype=float32)`` takes bfloat16 operands here (CUDA builds of torch>=2.8)."""
    try:
        c = torch.zeros(1, 1, device=device_type)
        a = torch.zeros(1, 1, dtype=torch.bfloat16, device=device_type)
        torch.addmm(c, a, a, out_dtype=torch.float32, out=c)
        return True
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def _accumulate(grad_weight: torch.Tensor, grad_logits: torch.Tensor, h: torch.Tensor) -> None:
    """grad_weight (float32) += grad_logitsᵀ h, with float32 accumulation of low-precision operands."""
    if grad_logits.dtype == torch.float32:
        grad_weight.addmm_(grad_logits.T, h)
    elif _has_mixed_addmm(grad_logits.device.type):
        torch.addmm(grad_weight, grad_logits.T, h, out_dtype=torch.float32, out=grad_weight)
    else:
        grad_weight += grad_logits.T @ h


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, block_size):
        dtype = output_dtype(hidden.dtype, hidden.device)
        h_all, w = hidden.to(dtype), weight.to(dtype)
        n_valid = (labels != ignore_index).sum()
        scale = 1.0 / n_valid.clamp_min(1).float().reshape(1)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_h else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        losses, corrects = [], []
        for start in range(0, hidden.shape[0], block_size):
            h = h_all[start : start + block_size]  # [n, D]
            logits = h @ w.T  # [n, V], becomes the gradient in place
            target = labels[start : start + block_size]
            loss, correct = cross_entropy_rows(logits, target, scale if need_h or need_w else None, ignore_index)
            losses.append(loss)
            corrects.append(correct)
            if need_h:
                grad_hidden[start : start + block_size] = logits @ w
            if need_w:
                _accumulate(grad_weight, logits, h)
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype) if need_w else None)
        correct = torch.cat(corrects).sum() if corrects else torch.zeros((), dtype=torch.int64, device=hidden.device)
        ctx.mark_non_differentiable(correct)
        loss = torch.cat(losses).sum() * scale[0] if losses else scale[0] * 0
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        grad_hidden, grad_weight = ctx.saved_tensors
        d_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype) if grad_hidden is not None else None
        d_weight = grad_weight * grad_loss.to(grad_weight.dtype) if grad_weight is not None else None
        return d_hidden, d_weight, None, None, None


def _default_block(vocab: int) -> int:
    """Tokens per block: about 2^28 logit elements (512 MiB in bf16) at a time."""
    return max(1024, (1 << 28) // vocab // 1024 * 1024)


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    block_size: int | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``labels`` and the count of correct argmax predictions.

    Arguments and results as in :func:`hgrn2.ops.cross_entropy.linear_cross_entropy`; the logits are formed
    in the compute dtype (bfloat16 under bf16 autocast, as an autocast Linear would give them) and the
    softmax statistics in float32. ``backend``: ``"auto"`` (Triton on CUDA, the PyTorch twin elsewhere),
    ``"triton"`` (also on the CPU under TRITON_INTERPRET=1) or ``"torch"``. ``block_size`` defaults to about
    2^28 logits at a time.
    """
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    check_inputs(hidden, weight, labels)
    block_size = block_size or _default_block(weight.shape[0])
    use_triton = backend == "triton" or (backend == "auto" and hidden.is_cuda)
    if not use_triton or output_dtype(hidden.dtype, hidden.device) == torch.float64:
        return linear_cross_entropy(hidden, weight, labels, ignore_index=ignore_index, block_size=block_size)
    labels = labels.contiguous()
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _FusedLinearCrossEntropy.apply(hidden, weight, labels, ignore_index, block_size)
    with torch.no_grad():
        return _FusedLinearCrossEntropy.forward(_NoGrad(), hidden, weight, labels, ignore_index, block_size)


class _NoGrad:
    """A stand-in autograd context for the forward without gradients."""

    needs_input_grad = (False, False, False, False, False)

    def save_for_backward(self, *tensors):
        pass

    def mark_non_differentiable(self, *tensors):
        pass
