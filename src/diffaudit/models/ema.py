"""Exponential moving average of model weights, with the usual warm-up so early steps are not averaged away."""

from __future__ import annotations

import torch


class EMA:
    """Shadow copy of a module's floating-point parameters and buffers.

    The effective decay is ``min(decay, (1 + step) / (10 + step))``: close to 0 at the start (the shadow follows
    the weights) and ``decay`` later. The update is one fused ``_foreach_lerp_`` over all tensors, so it costs
    little next to a training step.
    """

    def __init__(self, module: torch.nn.Module, decay: float = 0.999) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items()}
        self._pairs: tuple[list[torch.Tensor], list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]] | None = (
            None
        )

    def _tensor_pairs(self, module: torch.nn.Module):
        # Walking state_dict() every step costs a few ms of Python on a small U-Net; the tensors are the same
        # objects from step to step, so the (shadow, live) pairs are collected once.
        if self._pairs is None:
            state = module.state_dict()
            floats = [k for k, v in state.items() if v.dtype.is_floating_point]
            others = [(self.shadow[k], state[k]) for k in state if k not in set(floats)]
            self._pairs = ([self.shadow[k] for k in floats], [state[k].detach() for k in floats], others)
        return self._pairs

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        shadow, live, others = self._tensor_pairs(module)
        torch._foreach_lerp_(shadow, live, 1.0 - d)
        for target, value in others:
            target.copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:3]}")
        self.shadow = {k: state[k].to(self.shadow[k].device, copy=True) for k in self.shadow}
        self._pairs = None
