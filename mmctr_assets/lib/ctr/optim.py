"""The CTR trainer's optimiser: AdamW whose cost per step does not grow with the catalog.

The trainable id, tag and user tables are ``nn.Embedding(sparse=True)``: their gradient names only
the rows a batch looked up. :class:`RowAdamW` updates dense parameters exactly as
``torch.optim.AdamW`` does, and a table with a sparse gradient row-wise ("lazy" Adam, as
``torch.optim.SparseAdam``, TensorFlow's LazyAdam and torchrec's fused embedding optimisers do): only
the touched rows' moments, decoupled weight decay and values change; every other row stays
bit-identical. A dense table update would read and write the whole table (and its two moment
tables) every step, a cost that grows with the number of items.

With ``catch_up_shrink`` (a param-group option; the trainer sets it on the tables the model's L2
embedding regulariser covers) a row also gets, when a batch next touches it, the pull toward zero
the whole-table regulariser would have given it on each step it missed, in closed form: under the
constant-sign gradient ``lambda * w`` of a row no batch uses, Adam steps ``lr`` per coordinate
(``m / sqrt(v)`` -> sign), so the missed steps soft-threshold the row by the sum of their learning
rates (the lazy-regularisation trick of sparse SGD and FTRL, Carpenter 2008, here with Adam's step
size). Each row keeps the running learning-rate sum at its last update; :meth:`RowAdamW.flush`
settles every row at once before the weights are read (evaluation, saving).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch.optim.adam import adam


class RowAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) for dense gradients, its row-wise lazy form for sparse ones.

    A sparse row's moments advance only on steps that touch it; the bias correction uses the
    parameter's step count (SparseAdam's convention). State names match AdamW's
    (``step``, ``exp_avg``, ``exp_avg_sq``), so the optimiser's state_dict reads like AdamW's;
    ``catch_up_shrink`` adds ``lr_total`` (the learning rates summed over the table's steps) and
    ``lr_mark`` (its value at each row's last update), in the parameter's dtype, as torch's
    ``load_state_dict`` casts them: a resumed run continues bit for bit.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, catch_up_shrink: bool = False):
        if lr <= 0 or eps <= 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"RowAdamW: invalid lr={lr}, betas={betas}, eps={eps} or weight_decay={weight_decay}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                                  "catch_up_shrink": catch_up_shrink})

    def _state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            dense = [p for p in group["params"] if p.grad is not None and not p.grad.is_sparse]
            states = [self._state(p) for p in dense]
            if dense:  # the same call torch.optim.AdamW makes
                adam(dense, [p.grad for p in dense], [s["exp_avg"] for s in states],
                     [s["exp_avg_sq"] for s in states], [], [s["step"] for s in states],
                     amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
                     eps=group["eps"], maximize=False, decoupled_weight_decay=True)
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    _row_step(p, p.grad, self._state(p), group)
        return loss

    @torch.no_grad()
    def flush(self) -> None:
        """Apply every row's pending catch-up shrink now (one pass over the tables: call it before
        evaluating or saving, not per step), so the weights read as the dense optimiser's would."""
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if group["catch_up_shrink"] and state:
                    p.copy_(_caught_up(p, state, None))
                    state["lr_mark"].copy_(state["lr_total"].expand_as(state["lr_mark"]))


def _caught_up(value: torch.Tensor, state: dict, rows: torch.Tensor | None) -> torch.Tensor:
    """``value`` (the table's ``rows``; None: every row) soft-thresholded toward zero by the
    learning rates of the steps each row missed since its last update."""
    if "lr_mark" not in state:
        state["lr_total"] = value.new_zeros(())
        state["lr_mark"] = value.new_zeros(state["exp_avg"].shape[0])
    mark = state["lr_mark"] if rows is None else state["lr_mark"].index_select(0, rows)
    missed = (state["lr_total"] - mark).clamp_(min=0).unsqueeze(1)
    return value.sign() * (value.abs() - missed).clamp_(min=0)


def _row_step(p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
    """One AdamW step on the rows ``grad`` names (duplicates summed), as torch's Adam computes it;
    each row first caught up (``catch_up_shrink``). The rows are read and written once."""
    grad = grad.coalesce()
    rows, values = grad.indices()[0], grad.values()
    if rows.numel() == 0:
        return
    beta1, beta2 = group["betas"]
    lr, eps, decay = group["lr"], group["eps"], group["weight_decay"]
    state["step"] += 1
    step = float(state["step"])
    value = p.index_select(0, rows)
    if group["catch_up_shrink"]:
        value = _caught_up(value, state, rows)
    exp_avg = state["exp_avg"].index_select(0, rows).lerp_(values, 1 - beta1)
    exp_avg_sq = state["exp_avg_sq"].index_select(0, rows).mul_(beta2).addcmul_(values, values, value=1 - beta2)
    state["exp_avg"].index_copy_(0, rows, exp_avg)
    state["exp_avg_sq"].index_copy_(0, rows, exp_avg_sq)
    denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2 ** step)).add_(eps)
    if decay:
        value.mul_(1 - lr * decay)
    p.index_copy_(0, rows, value.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1 ** step)))
    if group["catch_up_shrink"]:
        state["lr_total"] += lr
        state["lr_mark"].index_fill_(0, rows, state["lr_total"])


def coalesce_sparse_grads(params: Iterable[torch.Tensor]) -> None:
    """Sum the duplicate rows of each sparse gradient (one entry per lookup until then), so norms
    and clipping see each row's real gradient."""
    for p in params:
        if p.grad is not None and p.grad.is_sparse:
            p.grad = p.grad.coalesce()


def add_row_penalty(tables: Iterable[torch.nn.Embedding], weight: float) -> torch.Tensor:
    """The L2 regulariser ``weight / 2 * ||rows||^2`` over the rows each table's (coalesced) sparse
    gradient names, applied where autograd would put it: ``weight * row`` added to each such row's
    gradient. Returns the penalty's value (for the reported loss). A table without a gradient this
    step adds nothing; a padding row is never named (an ``nn.Embedding``'s sparse gradient leaves
    its ``padding_idx`` out), so it is not penalised."""
    terms = []
    for table in tables:
        grad = table.weight.grad
        if grad is None:
            continue
        rows = table.weight.detach().index_select(0, grad.indices()[0])
        grad.values().add_(rows, alpha=weight)  # values() of a coalesced gradient: a view
        terms.append(rows.pow(2).sum())
    return weight / 2 * torch.stack(terms).sum() if terms else torch.zeros(())


def clip_grad_norm_(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for a mix of dense and (coalesced) sparse gradients."""
    grads = [p.grad for p in params if p.grad is not None]
    if not any(g.is_sparse for g in grads):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    norms = [(g._values() if g.is_sparse else g).norm() for g in grads]
    total = torch.stack(norms).norm()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        (g._values() if g.is_sparse else g).mul_(coef)
    return total
