"""Per-parameter statistics for TensorBoard/wandb, as GPT-NeoX's ``log_param_norm``, ``log_grad_norm``,
``log_grad_pct_zeros`` and ``log_optimizer_states`` write them.

Names follow GPT-NeoX: ``parameter_norms/<name>``, ``gradient_norms/<name>``, ``pct_grad_zeros/<name>``
(percent of exactly-zero gradient entries) and ``optimizer_state_norms/<state>_<name>``, with ``<name>`` the
module's parameter name. Gradients exist only between backward and the optimizer step, so they are read
inside the step (``NonFiniteStepGuard`` calls :meth:`capture`) and only on iterations that are logged.

Per-parameter gradients and optimizer states are whole tensors of the module's own parameters only at ZeRO
stage 0; validation refuses the gradient/optimizer keys with ZeRO >= 1 rather than log partial values.
All values are of this rank's module: on a pipeline they cover rank 0's stage (GPT-NeoX logs rank 0 too).
"""
from typing import Dict

import torch


class ParameterStatistics:
    def __init__(self, module: torch.nn.Module, optimizer, settings):
        self.named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
        self.optimizer = optimizer
        self.param_norm = settings.log_param_norm
        self.grad_norm = settings.log_grad_norm
        self.grad_zeros = settings.log_grad_pct_zeros
        self.optimizer_states = settings.log_optimizer_states
        self.armed = False
        self._captured: Dict[str, float] = {}

    @property
    def enabled(self) -> bool:
        return self.param_norm or self.grad_norm or self.grad_zeros or self.optimizer_states

    def arm(self) -> None:
        """The next optimizer step belongs to a logged iteration: read its gradients."""
        self.armed = self.enabled

    @torch.no_grad()
    def capture(self) -> None:
        """Called inside the optimizer step, before the update: the gradients are complete here."""
        if not self.armed:
            return
        self.armed = False
        out = {}
        for name, p in self.named:
            if p.grad is None:
                continue
            grad = p.grad.float()
            if self.grad_norm:
                out[f"gradient_norms/{name}"] = grad.norm()
            if self.grad_zeros:
                out[f"pct_grad_zeros/{name}"] = (grad == 0).sum() * (100.0 / grad.numel())
        self._captured = out

    @torch.no_grad()
    def collect(self) -> Dict[str, float]:
        """The values of the last logged iteration (after its step: parameters and states are updated)."""
        out = dict(self._captured)
        self._captured = {}
        if self.param_norm:
            for name, p in self.named:
                out[f"parameter_norms/{name}"] = p.detach().float().norm()
        if self.optimizer_states and self.optimizer is not None:
            for name, p in self.named:
                for key, value in self.optimizer.state.get(p, {}).items():
                    if torch.is_tensor(value) and value.numel() > 1:
                        out[f"optimizer_state_norms/{key}_{name}"] = value.float().norm()
        if not out:
            return {}
        # One device-to-host copy for all of them.
        values = torch.stack([v.reshape(()) for v in out.values()]).tolist()
        return dict(zip(out.keys(), values))
