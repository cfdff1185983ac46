"""FSDP support shared by the LightningModules: one FSDP unit per block, gradient clipping over shards, and
the full weights gathered on demand.

Lightning's ``FSDPStrategy`` calls ``LightningModule.configure_model`` inside
``torch.distributed.fsdp.wrap.enable_wrap``, so ``wrap(module)`` there turns ``module`` into its own FSDP unit
with the Trainer's settings (mixed precision from ``precision``, ``sharding_strategy``, ``use_orig_params``, ...);
under any other strategy ``wrap`` returns the module unchanged. :func:`shard_modules` wraps every selected
submodule of a backbone (the blocks), then the backbone itself, so that the parameters outside the blocks
(embeddings, heads, norms) are sharded too. Because the LightningModule then holds FSDP units already,
Lightning does not wrap it a second time.

With ``use_orig_params=True`` (Lightning's default) the original ``nn.Parameter`` objects survive as views
into the shards, so ``configure_optimizers`` can keep building its weight-decay groups from module types.
"""

from __future__ import annotations

from collections.abc import Callable

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.distributed.fsdp import FullStateDictConfig, StateDictType
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import wrap

UnitFilter = Callable[[str, nn.Module], bool]


def _selected(backbone: nn.Module, is_unit: UnitFilter) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the modules ``is_unit`` selects, outermost first, none inside another one. Names and
    modules are those of the backbone as built: FSDP's wrappers are looked through (a unit's name without their
    ``_fsdp_wrapped_module`` parts, the module they wrap)."""
    selected: list[tuple[str, nn.Module]] = []
    for name, module in backbone.named_modules():
        name = name.replace("._fsdp_wrapped_module", "").replace("_fsdp_wrapped_module.", "")
        if isinstance(module, FSDP) or name in ("", "_fsdp_wrapped_module") or not is_unit(name, module):
            continue
        if not any(name.startswith(outer + ".") for outer, _ in selected):
            selected.append((name, module))
    return selected


def shard_modules(backbone: nn.Module, is_unit: UnitFilter) -> nn.Module:
    """Inside Lightning's FSDP context: each selected submodule becomes an FSDP unit, then ``backbone`` the
    root unit, which is returned. Elsewhere: ``backbone`` unchanged. Calling it again is a no-op.

    ``is_unit(name, module)`` picks the units by qualified name and module, e.g. ``isinstance(module, Block)``.
    A unit's parameters are gathered only when its ``forward`` runs, so pick modules that the backbone calls
    as a whole (not ones whose children it calls directly).
    """
    if any(isinstance(module, FSDP) for module in backbone.modules()):
        return backbone
    for name, module in _selected(backbone, is_unit):
        backbone.set_submodule(name, wrap(module))
    return wrap(backbone)


def check_compile_mode(mode: str | None) -> None:
    """A ``compile_mode`` that ``torch.compile`` knows (None: its default), else a ``ValueError`` naming them."""
    from torch._inductor import list_mode_options

    if mode is not None and mode not in list_mode_options():
        raise ValueError(
            f"compile_mode {mode!r} is not a mode of torch.compile; use one of {', '.join(list_mode_options())} "
            "(reduce-overhead replays each compiled block as CUDA graphs) or null for its default"
        )


def compile_units(backbone: nn.Module, is_unit: UnitFilter, mode: str | None = None) -> list[str]:
    """Put each module ``is_unit`` selects (as in :func:`shard_modules`, by its name outside any FSDP wrapper)
    through ``torch.compile`` in place, in its ``mode`` (None: its default; see :func:`check_compile_mode`)
    (``nn.Module.compile``: the same parameters and state-dict keys, so checkpoints load either way; compiled at its
    first call, and again for each new input shape), and say so in one line on rank 0. Returns the names of the
    modules it compiled; those compiled already are left as they are, so calling it again is a no-op."""
    check_compile_mode(mode)
    compiled: list[str] = []
    for name, module in _selected(backbone, is_unit):
        if getattr(module, "_compiled_call_impl", None) is None:
            module.compile(mode=mode)
            compiled.append(name)
    if compiled:
        rank_zero_info(
            f"compile_blocks: {len(compiled)} blocks ({compiled[0]} ... {compiled[-1]}) through torch.compile"
            f"{f' in mode {mode}' if mode else ''}; each compiles at its first call, so the first steps of each "
            "stage take longer"
        )
    return compiled


def fsdp_roots(module: nn.Module) -> list[FSDP]:
    """The outermost FSDP units inside ``module`` (empty when nothing is sharded)."""
    if isinstance(module, FSDP):
        return [module]
    return [root for child in module.children() for root in fsdp_roots(child)]


def clip_gradients(
    module: pl.LightningModule,
    optimizer: torch.optim.Optimizer,
    gradient_clip_val: float | None,
    gradient_clip_algorithm: str | None,
) -> None:
    """``configure_gradient_clipping`` that also clips sharded gradients by their global norm, and clips for
    fused optimizers when nothing scales the loss.

    Lightning's FSDP precision plugin refuses norm clipping because ``torch.nn.utils.clip_grad_norm_`` would
    only see the local shards; FSDP's root unit computes the norm over all of them. Value clipping is
    element-wise, so it and everything unsharded go to Lightning's ``clip_gradients``.

    Lightning's mixed-precision plugin also refuses to clip for an optimizer that unscales gradients inside its
    ``step`` (fused AdamW), even under ``bf16-mixed``, where no loss scaler exists and the gradients are already
    unscaled; there the clipping is done here. Under ``16-mixed`` such an optimizer cannot be clipped: the error
    says what to change.
    """
    if not gradient_clip_val:
        return
    roots = fsdp_roots(module)
    if roots and gradient_clip_algorithm in (None, "norm"):
        if len(roots) > 1:
            raise ValueError(
                f"norm clipping needs one root FSDP unit holding every parameter, found {len(roots)}; "
                "wrap the whole backbone (shard_modules does) or clip by value"
            )
        roots[0].clip_grad_norm_(gradient_clip_val)
        return
    if getattr(optimizer, "_step_supports_amp_scaling", False):  # fused: unscales inside step()
        precision = module.trainer.precision_plugin
        if getattr(precision, "scaler", None) is not None:
            raise RuntimeError(
                f"gradient clipping (gradient_clip_val={gradient_clip_val}) with a fused optimizer needs unscaled "
                "gradients, which 16-mixed only gives inside the optimizer step: use precision bf16-mixed, or "
                "set the optimizer's fused: false"
            )
        if gradient_clip_algorithm == "value":  # the plugin's own helpers, past the check that refuses fused
            precision.clip_grad_by_value(optimizer, gradient_clip_val)
        else:
            precision.clip_grad_by_norm(optimizer, gradient_clip_val)
        return
    module.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` with every FSDP unit's full tensors, on the CPU, on global rank 0 (empty on the
    other ranks); names as without FSDP. Collective: every rank must call it.

    For code that runs submodules outside ``forward`` (generation): FSDP gathers a unit's weights only
    inside its ``forward``, so such code needs an unsharded copy built from these tensors.
    """
    config = FullStateDictConfig(offload_to_cpu=True, rank0_only=True)
    with FSDP.state_dict_type(module, StateDictType.FULL_STATE_DICT, config):
        return module.state_dict()
