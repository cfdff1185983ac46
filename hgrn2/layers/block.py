"""The residual block around a token mixer, and the loop that runs a stack of them.

Every model (LM, LRA, vision) is a stack of :class:`Block`; fused or not, pre- or post-norm, with dropout, stochastic
depth or a convolution in front of the mixer, each is an option of this one module, run by :func:`run_blocks`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence

import torch
from timm.layers import DropPath
from torch import nn
from torch.utils.checkpoint import checkpoint

from hgrn2.layers.glu import GLU
from hgrn2.layers.norm import add_and_norm, make_norm, runs_fused_kernels
from hgrn2.layers.short_conv import GridConvolution, ShortConvolution

# a token mixer applied to the normalised input: h -> (y, state or None)
Mix = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


class Block(nn.Module):
    """A token mixer (HGRU2, HGRU1 or a non-causal variant), then a GLU channel mixer, each on a residual branch.

    Pre-norm (default): ``x + drop(mixer(conv(norm(x))))``, then ``x + drop(GLU(norm(x)))``. Post-norm
    (``prenorm=False``): ``norm(x + drop(mixer(conv(x))))``, then ``norm(x + drop(GLU(x)))``.

    * ``glu_hidden_size=0`` drops the channel mixer.
    * ``short_conv=k`` puts a causal depthwise convolution of k taps in front of the mixer
      (:class:`ShortConvolution`); such a block runs whole sequences only. ``grid_conv=k`` puts a k×k depthwise
      convolution of the pixel grid there instead, dilated by ``grid_conv_dilation`` (:class:`GridConvolution`).
    * ``dropout`` applies to each branch's output. ``drop_path`` is stochastic depth (pre-norm only): in training
      each sample skips the whole block, both branches together, with that probability, and the kept samples'
      branches are scaled by 1 / (1 - drop_path) (timm's ``DropPath``).
    * ``fused``: wherever the mixer's recurrence runs on Triton (:func:`hgrn2.layers.norm.runs_fused_kernels`),
      each residual add and the RMS norm after it run as one kernel, whose output is in the autocast dtype, and
      the GLU runs on :func:`hgrn2.ops.fused_glu.fused_glu`; the math is the same. The mixer has its own option.
    """

    def __init__(
        self,
        mixer: nn.Module,
        glu_hidden_size: int,
        norm: str = "simple_rmsnorm",
        glu_activation: str = "identity",
        bias: bool = False,
        *,
        prenorm: bool = True,
        dropout: float = 0.0,
        drop_path: float = 0.0,
        short_conv: int = 0,
        grid_conv: int = 0,
        grid_conv_dilation: int = 1,
        fused: bool = False,
    ):
        super().__init__()
        if not 0.0 <= dropout < 1.0 or not 0.0 <= drop_path <= 1.0:
            raise ValueError(f"need 0 <= dropout < 1 and 0 <= drop_path <= 1, got {dropout} and {drop_path}")
        if drop_path and not prenorm:
            raise ValueError(
                "drop_path skips a pre-norm block's residual branches; a post-norm block normalises its output "
                "and has none to skip: use drop_path=0 with prenorm=False"
            )
        if short_conv and grid_conv:
            raise ValueError("short_conv (causal, over time) and grid_conv (over the pixel grid) exclude each other")
        dim = mixer.hidden_size
        self.prenorm, self.fused = prenorm, fused
        self.mixer_norm = make_norm(norm, dim)
        self.mixer = mixer
        self.glu_norm = make_norm(norm, dim) if glu_hidden_size else None
        self.glu = GLU(dim, glu_hidden_size, glu_activation, bias=bias) if glu_hidden_size else None
        self.short_conv = ShortConvolution(dim, short_conv) if short_conv else None
        self.grid_conv = GridConvolution(dim, grid_conv, grid_conv_dilation) if grid_conv else None
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path else None

    def runs_fused(self, x: torch.Tensor) -> bool:
        """Whether the norms and the GLU run on the fused kernels for ``x``: ``fused``, on a Triton recurrence."""
        return self.fused and runs_fused_kernels(getattr(self.mixer, "backend", "torch"), x.device)

    def forward(
        self,
        x: torch.Tensor,
        lower_bound: torch.Tensor | None = None,
        *,
        pending: torch.Tensor | None = None,
        return_pending: bool = False,
        **mixer_kwargs,
    ) -> tuple[torch.Tensor, ...]:
        """x ``[B, T, D]`` -> ``(x', mixer state or None)``; ``mixer_kwargs`` go to the mixer (``initial_state``,
        ``output_final_state``, ``cu_seqlens``; ``grid_size`` and ``mask`` for the non-causal mixers).

        In a stack, each block can leave its last residual add to the next one, which folds it into its first norm:
        ``pending`` ``[B, T, D]`` is the branch output still to be added to x, and ``return_pending=True`` returns
        ``(x', pending', state)`` with the block's output ``x' + pending'`` (pending' is None when nothing is left).
        """
        carries_state = mixer_kwargs.get("initial_state") is not None or bool(mixer_kwargs.get("output_final_state"))
        self._check_whole_sequences(carries_state)

        def mix(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            if self.short_conv is not None:
                h = self.short_conv(h, mixer_kwargs.get("cu_seqlens"))
            if self.grid_conv is not None:
                h = self.grid_conv(h, grid_size=mixer_kwargs.get("grid_size"))
            return self.mixer(h, lower_bound=lower_bound, **mixer_kwargs)

        x, pending, state = self._residual(x, pending, mix, self.runs_fused(x))
        if return_pending:
            return x, pending, state
        return (x if pending is None else x + pending), state

    def step(
        self, x: torch.Tensor, state: torch.Tensor | None = None, lower_bound: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoding step: x ``[B, D]`` -> ``(x', new state)``, the same residual wiring around the mixer's step."""
        self._check_whole_sequences(carries_state=True)
        x, pending, state = self._residual(x, None, lambda h: self.mixer.step(h, state, lower_bound=lower_bound), False)
        return (x if pending is None else x + pending), state

    def _residual(
        self, x: torch.Tensor, pending: torch.Tensor | None, mix: Mix, fused: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Both residual branches around ``mix``: ``(x', pending', state)`` as in :meth:`forward`."""
        if not self.prenorm:
            return self._post_norm(x if pending is None else x + pending, mix, fused)
        normed, x = add_and_norm(self.mixer_norm, x, pending, fused=fused)
        y, state = mix(normed)
        y = self.dropout(y)
        if self.glu is None:
            return x, (y if self.drop_path is None else self.drop_path(y)), state
        normed, mixed = add_and_norm(self.glu_norm, x, y, fused=fused)
        g = self.dropout(self.glu(normed, fused=fused))
        if self.drop_path is not None and self.training:
            return x, self.drop_path(y + g), state  # one draw per sample for both branches
        return mixed, g, state

    def _post_norm(self, x: torch.Tensor, mix: Mix, fused: bool) -> tuple[torch.Tensor, None, torch.Tensor | None]:
        # the output is a norm's: nothing is left pending, and the stream keeps x's dtype under autocast too
        y, state = mix(x)
        x, _ = add_and_norm(self.mixer_norm, x, self.dropout(y), fused=fused, out_dtype=x.dtype)
        if self.glu is not None:
            g = self.dropout(self.glu(x, fused=fused))
            x, _ = add_and_norm(self.glu_norm, x, g, fused=fused, out_dtype=x.dtype)
        return x, None, state

    def _check_whole_sequences(self, carries_state: bool) -> None:
        if self.short_conv is not None and carries_state:
            raise ValueError(
                "a model with short_conv > 0 runs whole sequences only: its recurrent state does not hold the "
                "convolution's last inputs, so it cannot be carried across segments or decoded step by step; "
                "use short_conv=0 for state carrying and generation"
            )


def run_blocks(
    blocks: Sequence[nn.Module],
    x: torch.Tensor,
    lower_bounds: Sequence[torch.Tensor | None],
    *,
    checkpointing: bool = False,
    states: Sequence[torch.Tensor | None] | None = None,
    output_final_state: bool = False,
    **mixer_kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor | None]]:
    """Run ``blocks`` in order, β ``lower_bounds[i]`` for block i, each leaving its last residual add to the next.

    Returns ``(x, pending, final states)``: the stack's output is ``x + pending`` (pending may be None), which the
    caller folds into its final norm (:func:`hgrn2.layers.norm.add_and_norm`) or adds. ``states`` (one per block,
    or None) and ``output_final_state`` go to causal mixers, ``mixer_kwargs`` to every mixer. ``checkpointing``
    recomputes each block's activations in the backward pass instead of keeping them (when autograd records).
    Blocks are called as modules, so their hooks (FSDP's, for one) run.
    """
    pending, final_states = None, []
    for i, (block, beta) in enumerate(zip(blocks, lower_bounds, strict=True)):
        kwargs = dict(mixer_kwargs, pending=pending, return_pending=True)
        if states is not None or output_final_state:
            kwargs.update(initial_state=None if states is None else states[i], output_final_state=output_final_state)
        if checkpointing and torch.is_grad_enabled():
            context = functools.partial(_recompute_context, block)
            x, pending, state = checkpoint(block, x, beta, use_reentrant=False, context_fn=context, **kwargs)
        else:
            x, pending, state = block(x, beta, **kwargs)
        final_states.append(state)
    return x, pending, final_states


def _recompute_context(block: nn.Module) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """``checkpoint``'s ``context_fn``: nothing around the first forward, BatchNorm statistics kept around the
    recomputation."""
    return contextlib.nullcontext(), _running_statistics_kept(block)


@contextlib.contextmanager
def _running_statistics_kept(module: nn.Module) -> Iterator[None]:
    """While a checkpointed block recomputes its forward, its BatchNorms must not count the batch a second time:
    momentum 0 keeps their running statistics, and the batch counter is put back."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, count) in zip(norms, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)
