"""Non-causal HGRU2 mixers for classification: bidirectional (1-D) and four-direction (2-D).

Both compute the projections once and run the causal recurrence in other orders of the sequence (reversed, or
down the columns of a grid: the ops' ``reverse`` and ``columns``), summing the outputs before the shared norm and
output projection (the 2-D mixer's ``series`` mode does that twice: rows, then the columns of the rows' output).
Every scan is one call of the recurrence op, so it runs on the kernels, not on a loop over positions; the
step-by-step kernels of small states read every order where the data lie, the chunked kernels a reversed one, and
the rest scan reordered copies. The gates (output gate, lower-bounded log λ) are elementwise, so they are computed
once for all the scans, except where the Triton kernels (chunked and step-by-step) compute them inside
(:func:`hgrn2.ops.fuses_gates`).
"""

from __future__ import annotations

import torch

from hgrn2.layers.hgru2 import HGRU2
from hgrn2.ops import fuses_gates, hgrn2_recurrence, lower_bounded_log_forget
from hgrn2.ops.gates import activation


class _MultiScanHGRU2(HGRU2):
    def _scan_inputs(self, q_proj, value, forget_proj, lower_bound):
        """``(inputs, gated)``: what each scan takes. With ``gated`` the inputs are the raw projections and the
        kernels compute the gates; otherwise they are the gates themselves, ``(q, v, log λ)``, computed here
        once for every scan."""
        if fuses_gates(self.backend, q_proj, value):
            return (q_proj, value, forget_proj), True
        q = activation(q_proj, self.output_gate)
        return (q, value, lower_bounded_log_forget(forget_proj, lower_bound)), False

    def _scan(self, q, value, forget, lower_bound, gated: bool, **order):
        """One causal scan of :meth:`_scan_inputs`' tensors, in the ``order`` (reverse, columns) of the ops."""
        if gated:
            o, _ = self.gated_recurrence(q, value, forget, lower_bound, **order)
        else:
            o, _ = hgrn2_recurrence(
                q, value, forget, scale=self.scale, backend=self.backend, check_values=False, **order
            )
        return o

    def _scan_both_ways(self, gates, lower_bound, gated: bool, columns: int | None = None) -> torch.Tensor:
        """The scan of ``gates`` ``(q, v, log λ)`` ``[N, T, H, K]`` left to right plus the one right to left (with
        ``columns=W``: down and up the W columns of each row-major grid of T = h·W positions)."""
        forward = self._scan(*gates, lower_bound, gated, columns=columns)
        return forward + self._scan(*gates, lower_bound, gated, reverse=True, columns=columns)

    def step(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} is not causal: it has no recurrent decoding step")


class BidirectionalHGRU2(_MultiScanHGRU2):
    """HGRU2 over the sequence left-to-right plus right-to-left, summed (the LRA text tasks)."""

    def forward(
        self, x: torch.Tensor, lower_bound: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, None]:
        """x ``[B, T, D]`` -> ``(y [B, T, D], None)``.

        ``mask`` (bool ``[B, T]``, True on real tokens) makes padded positions no-ops in both scans: their
        forget gate is forced to 1 and so their key to 0, and the outputs at real positions do not depend
        on how much padding follows them.
        """
        self._check_input(x, 3)
        q_proj, value, forget_proj = self.project(x)
        if mask is not None:
            if mask.shape != x.shape[:2]:
                raise ValueError(f"mask must have shape [B, T] = {list(x.shape[:2])}, got {list(mask.shape)}")
            # logsigmoid(1e4) = 0 in every float dtype: λ = 1 whatever the lower bound
            forget_proj = forget_proj.masked_fill(~mask.bool()[..., None, None], 1e4)
        beta = self._head_lower_bound(lower_bound)
        gates, gated = self._scan_inputs(q_proj, value, forget_proj, beta)
        return self.finish(self._scan_both_ways(gates, beta, gated), self.runs_fused(x)), None


class HGRU2d(_MultiScanHGRU2):
    """HGRU2 over a grid: rows forward and backward, columns forward and backward.

    Input ``[B, T, D]`` is a row-major ``height × width`` grid (``T = height · width``), or ``[B, h, w, D]``.

    ``series=False`` (default) sums the four scans of one projection of the input, so that a pixel sees its row
    and its column. ``series=True`` runs two passes with the layer's weights: the row scans (projection, both
    directions, norm, output projection), then the column scans over that output, so that a pixel sees the
    whole grid within one layer, at twice the projections.
    """

    def __init__(self, *args, series: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.series = series

    def forward(
        self,
        x: torch.Tensor,
        lower_bound: torch.Tensor | None = None,
        grid_size: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, None]:
        """x ``[B, h·w, D]`` with ``grid_size=(h, w)`` (square by default), or ``[B, h, w, D]``."""
        if x.dim() == 4:
            batch, height, width, dim = x.shape
            x = x.reshape(batch, height * width, dim)
            unflatten = True
        else:
            self._check_input(x, 3)
            batch, length, _ = x.shape
            height, width = grid_size or (int(round(length**0.5)),) * 2
            if height * width != length:
                raise ValueError(f"sequence length {length} is not a {height}×{width} grid; pass grid_size=(h, w)")
            unflatten = False
        self._check_input(x, 3)
        beta = self._head_lower_bound(lower_bound)
        grid = (batch, height, width)
        if self.series:
            y = self._grid_pass(self._grid_pass(x, beta, grid, ("rows",)), beta, grid, ("columns",))
        else:
            y = self._grid_pass(x, beta, grid, ("rows", "columns"))
        return (y.reshape(batch, height, width, -1) if unflatten else y), None

    def _grid_pass(self, x: torch.Tensor, beta, grid: tuple[int, int, int], axes: tuple[str, ...]) -> torch.Tensor:
        """Project ``x`` ``[B, h·w, D]`` once, scan both ways along each of ``axes`` ("rows", "columns"), sum the
        scans, then norm and project out."""
        batch, height, width = grid
        gates, gated = self._scan_inputs(*self.project(x), beta)  # each [B, h·w, H, K]
        total = None
        for axis in axes:
            if axis == "rows":  # the rows as B·h sequences of w positions (a view)
                rows = [g.reshape(batch * height, width, *g.shape[2:]) for g in gates]
                out = self._scan_both_ways(rows, beta, gated)
                out = out.reshape(batch, height * width, *out.shape[2:])
            else:  # down and up each grid's columns
                out = self._scan_both_ways(gates, beta, gated, columns=width)
            total = out if total is None else total + out
        return self.finish(total, self.runs_fused(x))
