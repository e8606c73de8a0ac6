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

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        state = module.state_dict()
        floats = [k for k, v in state.items() if v.dtype.is_floating_point]
        torch._foreach_lerp_([self.shadow[k] for k in floats], [state[k].detach() for k in floats], 1.0 - d)
        for key, value in state.items():
            if not value.dtype.is_floating_point:
                self.shadow[key].copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:3]}")
        self.shadow = {k: state[k].clone() for k in self.shadow}
