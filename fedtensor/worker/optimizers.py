"""The local update's optimizers: torch's SGD and Adam, stepped through torch's functional API.

Theory of operation
-------------------
``torch.optim.SGD`` and ``torch.optim.Adam`` import ``torch._dynamo`` the first time
one is made or stepped (torch 2.13): ``Optimizer.add_param_group`` and
``zero_grad`` are wrapped by ``torch._compile._disable_dynamo``, whose first call
imports it, and ``step``'s ``_use_grad_for_differentiable`` imports it on every
call. That import brings ``sympy`` and ``mpmath`` with it: 823 modules, about 73 MB
of a worker process's memory for the rest of its life, for a compiler a worker
never runs. With two worker processes training 10,000 simulated clients, it was
the difference between 0.9 and 1.05 GB.

:class:`FunctionalOptimizer` does what those optimizers' ``step`` and
``zero_grad`` do, with the same arithmetic: torch's functional API
(:func:`torch.optim.sgd.sgd`, :func:`torch.optim.adam.adam`, documented as "the
functional API that performs the SGD (Adam) algorithm computation", which the
optimizer classes call themselves), and the state those classes keep (a momentum
buffer per parameter once it has one; Adam's step count, first and second
moments, initialised as ``Adam._init_group`` does), under ``torch.no_grad()``
as ``step`` runs. Only the options :mod:`fedtensor.worker.local_update` uses are
modelled: SGD's ``lr``, ``momentum``, ``weight_decay`` and Adam's ``lr``,
``weight_decay``; everything else at torch's defaults. It is a
``torch.optim.Optimizer`` for the code that takes one (DP-SGD,
:mod:`fedtensor.worker.dp`), with the attributes ``state`` and ``param_groups``
laid out as torch's, but its constructor does not call
``Optimizer.__init__`` (whose ``add_param_group`` imports the compiler).

``tests/test_worker_memory.py`` checks that several steps of each, with and
without momentum and weight decay, leave parameters and state bit-identical to
``torch.optim``'s, and that a local update in a fresh process imports neither
``torch._dynamo`` nor ``sympy``: a torch upgrade that changes either fails them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch
from torch.optim.adam import adam as _adam
from torch.optim.sgd import sgd as _sgd

__all__ = ["FunctionalOptimizer"]

#: Adam's defaults (torch.optim.Adam): betas and eps.
_BETAS = (0.9, 0.999)
_EPS = 1e-8


class FunctionalOptimizer(torch.optim.Optimizer):
    """SGD (``kind="sgd"``) or Adam (``"adam"``) over ``parameters``, as torch.optim's."""

    def __init__(
        self,
        kind: str,
        parameters: Iterable[torch.Tensor],
        *,
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ) -> None:
        # Not Optimizer.__init__: its add_param_group imports torch._dynamo (see the header).
        if kind not in ("sgd", "adam"):
            raise ValueError(f"unknown optimizer {kind!r}")
        self.kind = kind
        self.defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
        self.state: defaultdict[torch.Tensor, Any] = defaultdict(dict)
        self.param_groups = [{"params": list(parameters), **self.defaults}]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for parameter in self.param_groups[0]["params"]:
            grad = parameter.grad
            if grad is None:
                continue
            if set_to_none:
                parameter.grad = None
            else:  # as torch.optim.Optimizer.zero_grad
                if grad.grad_fn is not None:
                    grad.detach_()
                else:
                    grad.requires_grad_(False)
                grad.zero_()

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise TypeError("a local update's optimizer takes no closure")
        group = self.param_groups[0]
        params = [parameter for parameter in group["params"] if parameter.grad is not None]
        grads = [parameter.grad for parameter in params]
        with torch.no_grad():
            if self.kind == "sgd":
                self._sgd(params, grads, group)
            else:
                self._adam(params, grads, group)

    def _sgd(self, params: list[torch.Tensor], grads: list[Any], group: dict[str, Any]) -> None:
        momentum = group["momentum"]
        buffers = [self.state[p].get("momentum_buffer") for p in params] if momentum else []
        _sgd(
            params,
            grads,
            buffers,
            weight_decay=group["weight_decay"],
            momentum=momentum,
            lr=group["lr"],
            dampening=0,
            nesterov=False,
            maximize=False,
            has_sparse_grad=any(grad.is_sparse for grad in grads),
            foreach=None,
            fused=None,
            grad_scale=None,
            found_inf=None,
        )
        for parameter, buffer in zip(params if momentum else [], buffers, strict=True):
            self.state[parameter]["momentum_buffer"] = buffer

    def _adam(self, params: list[torch.Tensor], grads: list[Any], group: dict[str, Any]) -> None:
        scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
        for parameter in params:
            state = self.state[parameter]
            if not state:  # as Adam._init_group
                state["step"] = torch.tensor(0.0, dtype=scalar, device="cpu")
                state["exp_avg"] = torch.zeros_like(parameter, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(
                    parameter, memory_format=torch.preserve_format
                )
        states = [self.state[parameter] for parameter in params]
        _adam(
            params,
            grads,
            [state["exp_avg"] for state in states],
            [state["exp_avg_sq"] for state in states],
            [],
            [state["step"] for state in states],
            foreach=None,
            capturable=False,
            differentiable=False,
            fused=None,
            grad_scale=None,
            found_inf=None,
            has_complex=any(torch.is_complex(parameter) for parameter in params),
            decoupled_weight_decay=False,
            amsgrad=False,
            beta1=_BETAS[0],
            beta2=_BETAS[1],
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=_EPS,
            maximize=False,
        )
