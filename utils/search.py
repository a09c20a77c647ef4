"""The per-layer search of LLM-FP4 (formats and clipping ranges), as batched tensor operations.

Objective for a Linear with calibration inputs X [N, in] and weight W [out, in]:

    L = || Q_a(X) Q_w(W)^T - X W^T ||^2 / (N * out)

minimized by coordinate descent from the MinMax state. Each round: (1) for every weight format, the
range of every output row over the candidates (rows are independent given Q_a(X)), keep the format
with the lowest L; (2) for every activation format, the per-tensor range over the candidates (with
per-channel exponent shifts for FPQ), keep the format with the lowest L. The current state is always
one of the candidates, so L never increases and never ends above MinMax.

Candidates are multipliers g of the MinMax range (max_value = g * absmax), or, with
space="bias", of the MinMax exponent bias (the original code's behaviour). Losses of many candidates
are computed at once, chunked to a memory budget, by whichever of two exact forms is cheaper:
- weights, with the quantized input fixed: with U = Q_w(W) - W and D = Q_a(X) - X,
  L_row = u^T G u + 2 u . (P w) + w^T K w, G = Xq^T Xq, P = Xq^T D, K = D^T D (in x in, computed once),
  which needs no pass over tokens per candidate; or directly over tokens when N < in.
- activations, with the quantized weight Wq fixed: with R = X U^T,
  L = sum_n d_n^T (Wq^T Wq) d_n + 2 d_n . (R Wq)_n + |R|^2, costing N*in^2 instead of N*in*out
  per candidate when in < out (e.g. the output head); or directly when out <= in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quant_layers.formats import QuantFormat, exponent_bias_from_max, formats_of_width, max_from_exponent_bias
from quant_layers.quantize import quantize

TINY = 1e-30  # floor for ranges: an all-zero row or tensor keeps a finite scale


@dataclass(frozen=True)
class SearchSpace:
    """Candidates g_i = a + i (b - a) / n, i = 0..n-1, plus g = 1 (MinMax); space: "max" or "bias"."""

    low: float
    high: float
    count: int
    space: str = "max"

    def multipliers(self, device: torch.device | str = "cpu") -> torch.Tensor:
        i = torch.arange(self.count, dtype=torch.float64)
        g = torch.cat([self.low + i * (self.high - self.low) / self.count, torch.ones(1, dtype=torch.float64)])
        return torch.unique(g).to(device=device, dtype=torch.float32)

    def candidates(self, fmt: QuantFormat, absmax: torch.Tensor) -> torch.Tensor:
        """Candidate ranges [C, *absmax.shape] around the MinMax range absmax."""
        g = self.multipliers(absmax.device).view(-1, *([1] * absmax.dim()))
        absmax = absmax.clamp(min=TINY)
        if self.space == "max":
            return g * absmax
        return max_from_exponent_bias(fmt, g * exponent_bias_from_max(fmt, absmax)).clamp(min=TINY)


@dataclass
class LinearState:
    """Quantization parameters of one Linear: formats, per-row weight range [out], per-tensor input
    range [], per-input-channel shifts [in] (int, None without shifts) and the loss L they give."""

    weight_format: QuantFormat
    weight_max_value: torch.Tensor
    act_format: QuantFormat
    act_max_value: torch.Tensor
    act_channel_shift: torch.Tensor | None
    loss: float = float("nan")

    def act_range(self) -> torch.Tensor:
        """Per-channel clipping range m_a * 2^-k [in], or the per-tensor range []."""
        if self.act_channel_shift is None:
            return self.act_max_value
        return self.act_max_value * torch.exp2(-self.act_channel_shift.float())


def channel_shift(fmt: QuantFormat, act_max: torch.Tensor, channel_absmax: torch.Tensor) -> torch.Tensor:
    """LLM-FP4's integer shifts k_c = clamp(round(b_c) - round(b_a), 0, 2^E - 1).

    act_max: [C] candidate per-tensor ranges (bias b_a); channel_absmax: [in] calibration maxima (b_c).
    Returns [C, in] int64.
    """
    bias_tensor = exponent_bias_from_max(fmt, act_max.clamp(min=TINY)).round()
    bias_channel = exponent_bias_from_max(fmt, channel_absmax.clamp(min=TINY)).round()
    shift = (bias_channel.view(1, -1) - bias_tensor.view(-1, 1)).clamp(0, 2**fmt.exponent_bits - 1)
    return shift.to(torch.int64)


@dataclass(frozen=True)
class Budget:
    """Working memory for one batched loss evaluation, in bytes."""

    bytes: int

    def rows(self, row_elems: int, copies: int = 3) -> int:
        """How many rows of `row_elems` float32 values fit, `copies` live at once (at least 1)."""
        return max(1, self.bytes // (4 * copies * max(1, row_elems)))


def _token_chunks(x: torch.Tensor, budget: Budget, width: int):
    step = budget.rows(width, copies=4)
    for start in range(0, x.shape[0], step):
        yield x[start : start + step]


class LinearProblem:
    """Calibration inputs X [N, in] (float32) and weight W [out, in] of one Linear, with loss functions."""

    def __init__(self, x: torch.Tensor, weight: torch.Tensor, budget: Budget) -> None:
        self.x = x
        self.weight = weight.float()
        self.budget = budget
        self.tokens = x.shape[0]
        self.out_features, self.in_features = self.weight.shape
        self.weight_absmax = self.weight.abs().amax(dim=1)
        self.act_absmax = x.abs().amax()
        self.channel_absmax = x.abs().amax(dim=0)
        self._stats_for: tuple[QuantFormat, torch.Tensor] | None = None
        self._stats: tuple[torch.Tensor, torch.Tensor, torch.Tensor] = ()

    def normalize(self, loss: torch.Tensor) -> torch.Tensor:
        return loss / (self.tokens * self.out_features)

    def weight_losses(self, fmt: QuantFormat, candidates: torch.Tensor, act_format: QuantFormat,
                      act_range: torch.Tensor) -> torch.Tensor:
        """Per-row loss [C, out] (summed over tokens, not normalized) of weight candidates [C, out]."""
        w = self.weight
        if self.tokens < self.in_features:
            return self._weight_losses_direct(fmt, candidates, act_format, act_range)
        gram, v, const = self._weight_stats(act_format, act_range)
        losses = []
        step = self.budget.rows(self.out_features * self.in_features)
        for start in range(0, candidates.shape[0], step):
            u = quantize(w, fmt, candidates[start : start + step].unsqueeze(-1)) - w
            losses.append(((u @ gram) * u).sum(-1) + 2 * (u * v).sum(-1) + const)
        return torch.cat(losses)

    def _weight_stats(self, act_format: QuantFormat, act_range: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """G = Xq^T Xq [in, in], V = W (Xq^T D)^T [out, in], const = rows of |D W^T|^2 [out]; D = Xq - X.

        Kept for the last (act_format, act_range) asked: every weight format of a step reuses them.
        """
        if self._stats_for is not None and self._stats_for[0] == act_format and self._stats_for[1] is act_range:
            return self._stats
        w = self.weight
        gram = torch.zeros(self.in_features, self.in_features, device=w.device)
        cross = torch.zeros_like(gram)
        err_gram = torch.zeros_like(gram)
        for xt in _token_chunks(self.x, self.budget, self.in_features):
            xq = quantize(xt, act_format, act_range)
            d = xq - xt
            gram += xq.T @ xq
            cross += xq.T @ d
            err_gram += d.T @ d
        self._stats_for = (act_format, act_range)
        self._stats = (gram, w @ cross.T, ((w @ err_gram) * w).sum(dim=1))
        return self._stats

    def _weight_losses_direct(self, fmt, candidates, act_format, act_range) -> torch.Tensor:
        w = self.weight
        losses = torch.zeros(candidates.shape[0], self.out_features, device=w.device)
        step = self.budget.rows(self.out_features * self.in_features)
        for start in range(0, candidates.shape[0], step):
            wq = quantize(w, fmt, candidates[start : start + step].unsqueeze(-1))
            for xt in _token_chunks(self.x, self.budget, step * self.out_features):
                err = quantize(xt, act_format, act_range) @ wq.transpose(1, 2) - xt @ w.T
                losses[start : start + step] += err.square().sum(dim=1)
        return losses

    def act_losses(self, fmt: QuantFormat, ranges: torch.Tensor, weight_q: torch.Tensor) -> torch.Tensor:
        """Loss [C] (summed, not normalized) of activation ranges [C, in] or [C, 1] with weight_q fixed."""
        w = self.weight
        losses = torch.zeros(ranges.shape[0], device=w.device)
        input_space = self.in_features < self.out_features
        hessian = weight_q.T @ weight_q if input_space else None
        for xt in _token_chunks(self.x, self.budget, self.in_features + self.out_features):
            if input_space:
                r = xt @ (weight_q - w).T
                b = r @ weight_q
                losses += r.square().sum()
            else:
                y = xt @ w.T
            step = self.budget.rows(xt.shape[0] * max(self.in_features, self.out_features))
            for start in range(0, ranges.shape[0], step):
                xq = quantize(xt, fmt, ranges[start : start + step].unsqueeze(1))
                if input_space:
                    d = xq - xt
                    losses[start : start + step] += ((d @ hessian) * d).sum((1, 2)) + 2 * (d * b).sum((1, 2))
                else:
                    losses[start : start + step] += (xq @ weight_q.T - y).square().sum((1, 2))
        return losses

    def loss(self, state: LinearState) -> float:
        """Normalized L of a state."""
        wq = quantize(self.weight, state.weight_format, state.weight_max_value.view(-1, 1))
        ranges = state.act_range().reshape(1, -1)
        return float(self.normalize(self.act_losses(state.act_format, ranges, wq))[0])


def minmax_weight_max(problem: LinearProblem, per_tensor: bool) -> torch.Tensor:
    """MinMax weight ranges [out]: each row's absolute maximum, or the whole tensor's repeated per row."""
    weight_max = problem.weight_absmax.clamp(min=TINY)
    return weight_max.amax().expand_as(weight_max).clone() if per_tensor else weight_max


def minmax_state(problem: LinearProblem, weight_format: QuantFormat, act_format: QuantFormat,
                 per_tensor_weight: bool = False) -> LinearState:
    """Ranges from absolute maxima: per output row (or whole tensor) for W, per tensor for X."""
    weight_max = minmax_weight_max(problem, per_tensor_weight)
    state = LinearState(weight_format, weight_max, act_format, problem.act_absmax.clamp(min=TINY), None)
    state.loss = problem.loss(state)
    return state


def search_weight(problem: LinearProblem, state: LinearState, formats: list[QuantFormat],
                  space: SearchSpace, per_tensor: bool) -> LinearState:
    """Step (1): best per-row (or per-tensor) weight range for every format; keep the best format."""
    best = state
    act_range = state.act_range()
    base_absmax = minmax_weight_max(problem, per_tensor)
    for fmt in formats:
        candidates = space.candidates(fmt, base_absmax)
        if fmt == state.weight_format:
            candidates = torch.cat([candidates, state.weight_max_value.unsqueeze(0)])
        losses = problem.weight_losses(fmt, candidates, state.act_format, act_range)
        if per_tensor:
            index = losses.sum(dim=1).argmin().expand(problem.out_features)
        else:
            index = losses.argmin(dim=0)
        rows = torch.arange(problem.out_features, device=losses.device)
        total = float(problem.normalize(losses[index, rows].sum()))
        if total < best.loss:
            best = LinearState(fmt, candidates[index, rows], state.act_format, state.act_max_value,
                               state.act_channel_shift, total)
    return best


def search_act(problem: LinearProblem, state: LinearState, formats: list[QuantFormat],
               space: SearchSpace, shifts: bool) -> LinearState:
    """Step (2): best per-tensor input range (and shifts) for every format; keep the best format."""
    best = state
    weight_q = quantize(problem.weight, state.weight_format, state.weight_max_value.view(-1, 1))
    for fmt in formats:
        act_max = space.candidates(fmt, problem.act_absmax)
        shift = channel_shift(fmt, act_max, problem.channel_absmax) if shifts else None
        ranges = act_max.view(-1, 1) if shift is None else act_max.view(-1, 1) * torch.exp2(-shift.float())
        if fmt == state.act_format:
            current = state.act_range().reshape(1, -1).expand(1, ranges.shape[1])
            ranges = torch.cat([ranges, current])
        losses = problem.normalize(problem.act_losses(fmt, ranges, weight_q))
        index = int(losses.argmin())
        if float(losses[index]) < best.loss:
            if index == act_max.shape[0]:  # the current state of this format: nothing changes
                continue
            best = LinearState(state.weight_format, state.weight_max_value, fmt, act_max[index],
                               None if shift is None else shift[index], float(losses[index]))
    return best


def search_linear(problem: LinearProblem, weight_format: QuantFormat, act_format: QuantFormat,
                  space: SearchSpace, rounds: int, shifts: bool, per_tensor_weight: bool = False
                  ) -> tuple[LinearState, LinearState]:
    """Coordinate descent from MinMax over every format of the starting formats' widths.

    Returns (best state, MinMax state); best.loss <= minmax.loss.
    """
    start = minmax_state(problem, weight_format, act_format, per_tensor_weight)
    weight_formats = formats_of_width(weight_format.bits, weight_format.kind)
    act_formats = formats_of_width(act_format.bits, act_format.kind)
    state = start
    for _ in range(rounds):
        state = search_weight(problem, state, weight_formats, space, per_tensor_weight)
        state = search_act(problem, state, act_formats, space, shifts)
    return state, start


def search_table(weight: torch.Tensor, fmt: QuantFormat, space: SearchSpace | None, budget: Budget
                 ) -> tuple[QuantFormat, torch.Tensor, float, float]:
    """Weight-only search for a lookup table [rows, dim] (the token embedding): per-row range minimizing
    |Q(E) - E|^2 over every format of fmt's width; space None = MinMax.

    Returns (format, range [rows], searched MSE, MinMax MSE).
    """
    weight = weight.float()
    absmax = weight.abs().amax(dim=1).clamp(min=TINY)
    numel = weight.numel()
    minmax_loss = float((quantize(weight, fmt, absmax.view(-1, 1)) - weight).square().sum()) / numel
    best = (fmt, absmax, minmax_loss)
    if space is None:
        return (*best, minmax_loss)
    rows = torch.arange(weight.shape[0], device=weight.device)
    for candidate_format in formats_of_width(fmt.bits, fmt.kind):
        candidates = space.candidates(candidate_format, absmax)
        losses = []
        step = budget.rows(numel)
        for start in range(0, candidates.shape[0], step):
            q = quantize(weight, candidate_format, candidates[start : start + step].unsqueeze(-1))
            losses.append((q - weight).square().sum(dim=-1))
        index = torch.cat(losses).argmin(dim=0)
        total = float(torch.cat(losses)[index, rows].sum()) / numel
        if total < best[2]:
            best = (candidate_format, candidates[index, rows], total)
    return (*best, minmax_loss)
