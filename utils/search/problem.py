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
- weights, with the quantized input fixed: with U = Q_w(W) - W (one fused kernel on CUDA) and D = Q_a(X) - X,
  L_row = u^T G u + 2 u . v + c, G = Xq^T Xq [in, in], V = (D W^T)^T Xq [out, in], c = |D W^T|^2 per
  row, computed once per activation state: no pass over tokens per candidate; or directly when N < in.
- activations, with the quantized weight Wq fixed: with R = X (Wq - W)^T, L = sum_n d_n^T (Wq^T Wq) d_n
  + 2 d_n . (R Wq)_n + |R|^2, costing N*in^2 instead of N*in*out per candidate when in < out (e.g. the
  output head); or directly when out <= in.
Activation candidates are first ranked on a strided subset of `coarse_tokens` tokens and the best
`refine` of them (plus the current state) re-scored on all tokens (SearchSpace; coarse_tokens=0 scores
every candidate on every token). With `weight_refine` > 0 (off by default), weight candidates are first
ranked per row by a proxy of L that keeps G's diagonal and its leading eigenvectors, and the best
`weight_refine` (plus the current range) re-scored exactly.

Numerics: quantized operands are standard-grid values times a scale, and grids are exact in bfloat16
(quant_layers/quantize.py). On CUDA with a bfloat16 model every matrix product of a grid and the
model's own bfloat16 X or W runs on bfloat16 tensor cores with float32 accumulation and output, which
is exact in its products; the two products of non-grid operands (U G, D H) round their operands to
bfloat16 (relative 2^-9) for ranking only, and V, Wq^T Wq and R Wq use TF32 (2^-11). Elsewhere
everything is float32.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

import torch

from quant_layers import kernels
from quant_layers.formats import QuantFormat, exponent_bias_from_max, formats_of_width, max_from_exponent_bias
from quant_layers.quantize import (abs_max, grid_candidates, grid_scale, quantize, residual_proxy, round_to_grid,
                                   weight_residuals)

TINY = 1e-30  # floor for ranges: an all-zero row or tensor keeps a finite scale


@dataclass(frozen=True)
class SearchSpace:
    """Candidates g_i = a + i (b - a) / n, i = 0..n-1, plus g = 1 (MinMax); space: "max" or "bias".

    coarse_tokens / refine: activation candidates are ranked on coarse_tokens tokens, the best `refine`
    re-scored on all (0: every candidate on every token).
    weight_refine / proxy_rank: weight candidates are ranked per row by a proxy of their loss that keeps G's
    diagonal and its proxy_rank leading eigenvectors, the best `weight_refine` (and the current range) re-scored
    exactly (0: every candidate exactly).
    """

    low: float
    high: float
    count: int
    space: str = "max"
    coarse_tokens: int = 4096
    refine: int = 8
    weight_refine: int = 0
    proxy_rank: int = 32

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

    def rows(self, row_bytes: int) -> int:
        """How many rows of `row_bytes` bytes each fit (at least 1)."""
        return max(1, self.bytes // max(1, row_bytes))


@lru_cache(maxsize=None)
def _bf16_products(device: torch.device) -> bool:
    """Whether this device multiplies bfloat16 matrices into a float32 result (torch.mm out_dtype)."""
    if device.type != "cuda":
        return False
    try:
        a = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError):
        return False


@contextmanager
def _tf32():
    """TF32 tensor cores for float32 products on CUDA (10-bit mantissa operands) inside the block."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """bfloat16 for a bfloat16 X on a device with bfloat16 x bfloat16 -> float32 products, else float32."""
    return torch.bfloat16 if x.dtype == torch.bfloat16 and _bf16_products(x.device) else torch.float32


def mm32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for 2-D a, b of one dtype, accumulated and returned in float32."""
    if a.dtype == torch.float32:
        return a @ b
    return torch.mm(a, b, out_dtype=torch.float32)


@dataclass(frozen=True)
class ActCandidates:
    """Activation candidates: per-tensor ranges max_value [C] and integer channel shifts [C, in] or None.

    Candidate c quantizes X column i with range max_value[c] * 2^-shift[c, i]."""

    fmt: QuantFormat
    max_value: torch.Tensor
    shift: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.max_value.shape[0]

    def scale(self) -> torch.Tensor:
        return grid_scale(self.fmt, self.max_value, self.max_value.device)

    def channel_scale(self) -> torch.Tensor | None:
        return None if self.shift is None else torch.exp2(self.shift.float())

    def select(self, index: torch.Tensor) -> "ActCandidates":
        return ActCandidates(self.fmt, self.max_value[index], None if self.shift is None else self.shift[index])

    @staticmethod
    def of_state(state: LinearState) -> "ActCandidates":
        shift = None if state.act_channel_shift is None else state.act_channel_shift.view(1, -1)
        return ActCandidates(state.act_format, state.act_max_value.reshape(1), shift)


def _chunks(total: int, step: int):
    for start in range(0, total, step):
        yield slice(start, min(total, start + step))


class LinearProblem:
    """Calibration inputs X [N, in] (the model's dtype) and weight W [out, in] of one Linear, with losses.

    W is held once, in the compute dtype: the model's own bfloat16 tensor where products run in bfloat16
    (every elementwise use upcasts it to float32, which is exact; no float32 copy: 0.9 GiB for Qwen's
    lm_head), else float32.
    """

    def __init__(self, x: torch.Tensor, weight: torch.Tensor, budget: Budget, use_kernel: bool | None = None) -> None:
        self.use_kernel = use_kernel  # quant_layers.quantize's choice of Triton kernel or reference (None: auto)
        self.dtype = compute_dtype(x)
        self.x = x.to(self.dtype)
        self.weight = weight.to(self.dtype)
        self.budget = budget
        self.tokens = x.shape[0]
        self.out_features, self.in_features = self.weight.shape
        self.weight_absmax = abs_max(self.weight, dim=1).float()
        self.channel_absmax = abs_max(self.x, dim=0).float()
        self.act_absmax = self.channel_absmax.amax()
        self._stats_key: tuple | None = None
        self._stats_for: ActCandidates | None = None
        self._stats: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | tuple = ()
        self._proxy: tuple = ()  # (rank, basis, values, diagonal) of the current G, see `_proxy_terms`

    def normalize(self, loss: torch.Tensor) -> torch.Tensor:
        return loss / (self.tokens * self.out_features)

    def _token_chunks(self, x: torch.Tensor, row_bytes: int):
        step = self.budget.rows(row_bytes)
        for rows in _chunks(x.shape[0], step):
            yield x[rows]

    def _act_grid(self, xt: torch.Tensor, acts: ActCandidates) -> torch.Tensor:
        """Grid values of xt for every candidate [C, n, in] in the compute dtype."""
        return grid_candidates(xt, acts.fmt, acts.scale(), acts.channel_scale(), self.dtype, self.use_kernel)

    def weight_grid(self, fmt: QuantFormat, max_value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(grid values [..., out, in] float32, grid scales [..., out, 1]) of weight ranges [..., out]."""
        scale = grid_scale(fmt, max_value, self.weight.device).unsqueeze(-1)
        return round_to_grid(self.weight, fmt, scale), scale

    def _weight_slices(self, candidates: int):
        """(candidate slice, row slice) pairs covering [candidates, out] whose [c, o, in] working set fits the budget
        at 16 bytes per element (u, u G and their product); a candidate over budget (lm_head) goes in row slices."""
        rows_per_step = self.budget.rows(self.in_features * 16)
        out_step = min(self.out_features, rows_per_step)
        for cands in _chunks(candidates, max(1, rows_per_step // self.out_features)):
            for outs in _chunks(self.out_features, out_step):
                yield cands, outs

    def weight_losses(self, fmt: QuantFormat, candidates: torch.Tensor, state: LinearState) -> torch.Tensor:
        """Per-row loss [C, out] (summed over tokens, not normalized) of weight candidates [C, out], with the
        activation quantizer of `state` fixed."""
        acts = self._stats_acts(state)
        if self.tokens < self.in_features:
            return self._weight_losses_direct(fmt, candidates, acts)
        gram, v, const = self._weight_stats(acts)
        losses = torch.empty(candidates.shape[0], self.out_features, device=self.x.device)
        for cands, outs in self._weight_slices(candidates.shape[0]):
            u = weight_residuals(self.weight[outs], fmt, candidates[cands, outs], self.dtype,  # q(W) - W
                                 self.use_kernel)
            ug = mm32(u.view(-1, self.in_features), gram).view(u.shape)
            losses[cands, outs] = (ug.add_(v[outs], alpha=2) * u).sum(-1) + const[outs]  # u G u + 2 u.v + c
        return losses

    def weight_proxy_losses(self, fmt: QuantFormat, candidates: torch.Tensor, state: LinearState, rank: int
                            ) -> torch.Tensor:
        """A proxy [C, out] of `weight_losses` for ranking, at C x out x in x (rank + 1) instead of C x out x in^2:
        G is replaced by E diag(l) E^T + diag(G - E diag(l) E^T), with E [in, rank] an orthonormal basis of G's
        leading eigenvectors (subspace iteration from a seeded start) and l their Rayleigh quotients
        (`quantize.residual_proxy`: one fused kernel on CUDA that never stores the residuals). Quadratic-form path
        only (tokens >= in)."""
        gram, v, const = self._weight_stats(self._stats_acts(state))
        basis, values, diagonal = self._proxy_terms(gram, rank)
        basis_c = basis.to(self.dtype)
        if self.use_kernel is not False and kernels.unavailable_reason(self.weight, fmt) is None:
            return residual_proxy(self.weight, fmt, candidates, diagonal, v, basis_c, values, True) + const  # one call

        losses = torch.empty(candidates.shape[0], self.out_features, device=self.x.device)
        for cands, outs in self._weight_slices(candidates.shape[0]):
            losses[cands, outs] = residual_proxy(self.weight[outs], fmt, candidates[cands, outs], diagonal, v[outs],
                                                 basis_c, values, self.use_kernel) + const[outs]
        return losses

    def _proxy_terms(self, gram: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(E [in, rank], l [rank], diag(G - E diag(l) E^T) [in]) of the current G, kept with it: every weight format
        of a step ranks with the same G."""
        if not self._proxy or self._proxy[0] != rank:
            gram = gram.float()  # one float32 copy ([in, in]) serves both
            basis, values = _leading_eigenpairs(gram, rank)
            self._proxy = (rank, basis, values, gram.diagonal() - (basis.square() * values).sum(-1))
        return self._proxy[1:]

    def release_weight_stats(self) -> None:
        """Free G, V and c (V is [out, in] float32: 0.9 GiB for Qwen's lm_head) before a step that does not use
        them; the next weight step recomputes them, to the same values."""
        self._stats_key, self._stats_for, self._stats, self._proxy = None, None, (), ()

    def _stats_acts(self, state: LinearState) -> ActCandidates:
        """The activation quantizer of state as one candidate; the same object for the same quantizer, so
        that `_weight_stats` can keep its statistics."""
        key = (state.act_format, state.act_max_value, state.act_channel_shift)
        if self._stats_key is None or key[0] != self._stats_key[0] or any(
                a is not b for a, b in zip(key[1:], self._stats_key[1:])):
            self._stats_key = key
            self._stats_for = ActCandidates.of_state(state)
            self._stats, self._proxy = (), ()
        return self._stats_for

    def _weight_stats(self, acts: ActCandidates) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """G = Xq^T Xq [in, in] (compute dtype), V = R^T Xq [out, in], c = |R|^2 per row [out], R = D W^T.

        Kept for the last activation quantizer asked: every weight format of a step reuses them.
        """
        if self._stats:
            return self._stats
        inverse = 1.0 / acts.scale()
        gram = torch.zeros(self.in_features, self.in_features, device=self.x.device)
        v = torch.zeros(self.out_features, self.in_features, device=self.x.device)
        const = torch.zeros(self.out_features, device=self.x.device)
        for xt in self._token_chunks(self.x, 12 * (self.in_features + self.out_features)):
            grid = self._act_grid(xt, acts)[0]
            gram += mm32(grid.T, grid)
            r = mm32(grid, self.weight.T).mul_(inverse) - mm32(xt, self.weight.T)
            grid_q = grid.float() * inverse
            with _tf32():  # V in row slices within the budget (one slice unless V is larger: lm_head)
                for outs in _chunks(self.out_features, self.budget.rows(4 * self.in_features)):
                    v[outs].add_(r[:, outs].T @ grid_q)
            const += r.square().sum(dim=0)
        self._stats = ((gram * inverse.square()).to(self.dtype), v, const)
        return self._stats

    def _weight_losses_direct(self, fmt: QuantFormat, candidates: torch.Tensor, acts: ActCandidates
                              ) -> torch.Tensor:
        losses = torch.zeros(candidates.shape[0], self.out_features, device=self.x.device)
        act_inverse = 1.0 / acts.scale()
        for rows in _chunks(candidates.shape[0], self.budget.rows(self.out_features * self.in_features * 8)):
            grid, scale = self.weight_grid(fmt, candidates[rows])  # [c, out, in], [c, out, 1]
            grid_t = grid.to(self.dtype).view(-1, self.in_features).T
            inverse = (act_inverse / scale).view(1, -1)
            row_bytes = 8 * grid.shape[0] * self.out_features + 2 * self.in_features
            for xt in self._token_chunks(self.x, row_bytes):
                err = mm32(self._act_grid(xt, acts)[0], grid_t).mul_(inverse)
                err = err.view(xt.shape[0], -1, self.out_features) - mm32(xt, self.weight.T).unsqueeze(1)
                losses[rows] += err.square().sum(dim=0)
        return losses

    def act_losses(self, acts: ActCandidates, weight_format: QuantFormat, weight_max_value: torch.Tensor,
                   x: torch.Tensor | None = None) -> torch.Tensor:
        """Loss [C] (summed over x's tokens, not normalized) of activation candidates with the weight
        quantized to (weight_format, weight_max_value [out]) fixed. x: token rows to use (default all)."""
        x = self.x if x is None else x
        grid, scale = self.weight_grid(weight_format, weight_max_value)
        act_inverse = (1.0 / acts.scale()).view(-1, 1, 1)
        losses = torch.zeros(len(acts), device=self.x.device)
        grid_t = grid.to(self.dtype, copy=self.in_features < self.out_features).T
        if self.in_features < self.out_features:
            weight_q = grid.div_(scale)  # in place (grid_t is a copy): lm_head's grid is 0.9 GiB in float32
            with _tf32():
                hessian = (weight_q.T @ weight_q).to(self.dtype)
        output_inverse = act_inverse / scale.view(1, 1, -1)  # [C, 1, out]: 1 / (s_a[c] s_w[o])
        width = max(self.in_features, self.out_features)
        for xt in self._token_chunks(x, 8 * (self.in_features + self.out_features)):
            y = mm32(xt, self.weight.T)
            step = self.budget.rows(xt.shape[0] * width * 10)
            if self.in_features < self.out_features:
                r = mm32(xt, grid_t).div_(scale.view(1, -1)).sub_(y)
                with _tf32():
                    b = r @ weight_q
                losses += r.square().sum()
                x32 = xt.float()
                for rows in _chunks(len(acts), step):
                    d = self._act_grid(xt, acts.select(rows)).float().mul_(act_inverse[rows]).sub_(x32)
                    dh = mm32(d.view(-1, self.in_features).to(self.dtype), hessian).view_as(d)
                    losses[rows] += (dh.add_(b, alpha=2) * d).sum((1, 2))  # d H d + 2 d . b
            else:
                for rows in _chunks(len(acts), step):
                    g = self._act_grid(xt, acts.select(rows))
                    yq = mm32(g.view(-1, self.in_features), grid_t).view(g.shape[0], xt.shape[0], -1)
                    losses[rows] += yq.mul_(output_inverse[rows]).sub_(y).square_().sum((1, 2))
        return losses

    def coarse_rows(self, count: int) -> torch.Tensor | None:
        """A strided subset of about `count` token rows, or None when that is (nearly) all of them."""
        if count <= 0 or self.tokens < 2 * count:
            return None
        return self.x[:: self.tokens // count].contiguous()

    def loss(self, state: LinearState) -> float:
        """Normalized L of a state."""
        if state.weight_format.block is not None or state.act_format.block is not None:
            return float(self.normalize(self._reference_loss(state)))
        losses = self.act_losses(ActCandidates.of_state(state), state.weight_format, state.weight_max_value)
        return float(self.normalize(losses)[0])

    def _reference_loss(self, state: LinearState) -> torch.Tensor:
        """L (summed) with X and W quantized by the reference quantizer: any format, block-scaled ones included."""
        weight = self.weight.float()
        weight_q = quantize(weight, state.weight_format, state.weight_max_value.view(-1, 1))
        total = torch.zeros((), device=self.x.device)
        for xt in self._token_chunks(self.x, 12 * (self.in_features + self.out_features)):
            xq = quantize(xt.float(), state.act_format, state.act_max_value)
            total += (xq @ weight_q.T - xt.float() @ weight.T).square().sum()
        return total


def _leading_eigenpairs(gram: torch.Tensor, rank: int, iterations: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """An orthonormal basis [in, rank] of the leading eigenvectors of a symmetric PSD matrix [in, in] (float32) and
    their Rayleigh quotients [rank], by subspace iteration with 8 extra vectors from a seeded start."""
    size = gram.shape[0]
    rank = min(rank, size)
    if rank == 0:
        return gram.new_zeros(size, 0), gram.new_zeros(0)
    scale = gram.diagonal().max().clamp(min=TINY)
    normalized = gram / scale
    start = torch.randn(size, min(size, rank + 8), generator=torch.Generator().manual_seed(0))
    basis = torch.linalg.qr(start.to(gram.device)).Q
    for _ in range(iterations):
        basis = torch.linalg.qr(normalized @ basis).Q
    values, vectors = torch.linalg.eigh(basis.T @ normalized @ basis)
    basis = basis @ vectors[:, -rank:]
    return basis, values[-rank:].clamp(min=0) * scale


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
    base_absmax = minmax_weight_max(problem, per_tensor)
    for fmt in formats:
        candidates = space.candidates(fmt, base_absmax)
        if fmt == state.weight_format:
            candidates = torch.cat([candidates, state.weight_max_value.unsqueeze(0)])
        if _ranks_weights(problem, space, candidates.shape[0], per_tensor):
            losses = _refined_weight_losses(problem, fmt, candidates, state, space, fmt == state.weight_format)
        else:
            losses = problem.weight_losses(fmt, candidates, state)
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


def _ranks_weights(problem: LinearProblem, space: SearchSpace, count: int, per_tensor: bool) -> bool:
    """Whether the weight step ranks its candidates by the proxy first: asked for, more candidates than it
    re-scores, ranges per row, and the quadratic-form path (tokens >= in)."""
    return (0 < space.weight_refine < count and not per_tensor and problem.tokens >= problem.in_features)


def _refined_weight_losses(problem: LinearProblem, fmt: QuantFormat, candidates: torch.Tensor, state: LinearState,
                           space: SearchSpace, has_current: bool) -> torch.Tensor:
    """Exact losses [C, out] for each row's best `space.weight_refine` candidates by the proxy (and the current
    range, candidates[-1] when has_current); +inf for the others."""
    rough = problem.weight_proxy_losses(fmt, candidates, state, space.proxy_rank)
    if has_current:  # always re-scored: the step never ends above the current loss
        rough[-1] = float("-inf")
    index = rough.topk(min(candidates.shape[0], space.weight_refine + has_current), dim=0, largest=False).indices
    exact = problem.weight_losses(fmt, candidates.gather(0, index), state)  # [k, out]
    return torch.full_like(rough, float("inf")).scatter_(0, index, exact)


def _with_current(acts: ActCandidates, state: LinearState) -> ActCandidates:
    """acts with the state's own activation quantizer appended as the last candidate."""
    current = ActCandidates.of_state(state)
    shifts = (acts.shift, current.shift)
    if shifts == (None, None):
        return ActCandidates(acts.fmt, torch.cat([acts.max_value, current.max_value]))
    width = (acts.shift if acts.shift is not None else current.shift).shape[1]
    filled = [s if s is not None else torch.zeros(n, width, dtype=torch.int64, device=acts.max_value.device)
              for s, n in zip(shifts, (len(acts), 1))]
    return ActCandidates(acts.fmt, torch.cat([acts.max_value, current.max_value]), torch.cat(filled))


def search_act(problem: LinearProblem, state: LinearState, formats: list[QuantFormat],
               space: SearchSpace, shifts: bool) -> LinearState:
    """Step (2): best per-tensor input range (and shifts) for every format; keep the best format.

    With a coarse subset (SearchSpace.coarse_tokens), every candidate is ranked on it and the best
    `refine` (and the current state) are scored on all tokens."""
    best = state
    coarse = problem.coarse_rows(space.coarse_tokens)
    weight = (state.weight_format, state.weight_max_value)
    for fmt in formats:
        act_max = space.candidates(fmt, problem.act_absmax)
        acts = ActCandidates(fmt, act_max, channel_shift(fmt, act_max, problem.channel_absmax) if shifts else None)
        current = None
        if fmt == state.act_format:
            acts, current = _with_current(acts, state), len(acts)
        index = torch.arange(len(acts), device=act_max.device)
        if coarse is not None and len(acts) > space.refine:
            rough = problem.act_losses(acts, *weight, x=coarse)
            index = rough.topk(space.refine, largest=False).indices
            if current is not None:
                index = torch.cat([index, torch.tensor([current], device=index.device)]).unique()
            index = index.sort().values
        losses = problem.normalize(problem.act_losses(acts.select(index), *weight))
        pick = int(losses.argmin())
        chosen = int(index[pick])
        if float(losses[pick]) < best.loss and chosen != current:
            # clones: a view would keep every candidate's shifts [C, in] alive for as long as the result
            best = LinearState(state.weight_format, state.weight_max_value, fmt, acts.max_value[chosen].clone(),
                               None if acts.shift is None else acts.shift[chosen].clone(), float(losses[pick]))
    return best


def search_linear(problem: LinearProblem, weight_format: QuantFormat, act_format: QuantFormat,
                  space: SearchSpace, rounds: int, shifts: bool, per_tensor_weight: bool = False
                  ) -> tuple[LinearState, LinearState]:
    """Coordinate descent from MinMax over every format of the starting formats' widths.

    With shifts the descent starts from MinMax with FPQ's channel shifts when that is better than without.
    Returns (best state, MinMax state), both with their loss on all tokens; best.loss <= minmax.loss.
    """
    start = minmax_state(problem, weight_format, act_format, per_tensor_weight)
    weight_formats = formats_of_width(weight_format.bits, weight_format.kind)
    act_formats = formats_of_width(act_format.bits, act_format.kind)
    state = start
    if shifts:  # FPQ's shifts on the MinMax range, where they help: the descent starts from the better one
        shift = channel_shift(act_format, start.act_max_value.view(1), problem.channel_absmax)[0]
        shifted = LinearState(weight_format, start.weight_max_value, act_format, start.act_max_value, shift)
        shifted.loss = problem.loss(shifted)
        state = shifted if shifted.loss < start.loss else start
    for _ in range(rounds):
        state = search_weight(problem, state, weight_formats, space, per_tensor_weight)
        problem.release_weight_stats()  # not held through the activation step, which builds its own
        state = search_act(problem, state, act_formats, space, shifts)
    if state is not start:
        state.loss = problem.loss(state)
    return state, start


def search_table(weight: torch.Tensor, fmt: QuantFormat, space: SearchSpace | None, budget: Budget
                 ) -> tuple[QuantFormat, torch.Tensor, float, float]:
    """Weight-only search for a lookup table [rows, dim] (the token embedding): per-row range minimizing
    |Q(E) - E|^2 over every format of fmt's width; space None = MinMax. Rows are independent, so the table goes
    in row slices within the budget (Qwen's 151936 x 1536 table is 0.9 GiB in float32 per candidate).

    Returns (format, range [rows], searched MSE, MinMax MSE).
    """
    formats = formats_of_width(fmt.bits, fmt.kind) if space is not None else []
    rows_per_step = budget.rows(weight.shape[1] * 12)  # float32 row, its quantized copy, their squared difference
    absmax = torch.empty(weight.shape[0], device=weight.device)
    minmax_rows = torch.empty(weight.shape[0], device=weight.device)
    best_rows = torch.empty(len(formats), weight.shape[0], device=weight.device)  # per format: best loss per row
    best_ranges = torch.empty(len(formats), weight.shape[0], device=weight.device)
    for rows in _chunks(weight.shape[0], rows_per_step):
        w = weight[rows].float()
        absmax[rows] = abs_max(w, dim=1).clamp(min=TINY)
        minmax_rows[rows] = (quantize(w, fmt, absmax[rows].view(-1, 1)) - w).square().sum(dim=-1)
        for index, candidate_format in enumerate(formats):
            candidates = space.candidates(candidate_format, absmax[rows])  # [C, rows of the slice]
            losses = torch.cat([(quantize(w, candidate_format, candidates[c].unsqueeze(-1)) - w).square().sum(dim=-1)
                                for c in _chunks(candidates.shape[0], max(1, rows_per_step // w.shape[0]))])
            best_rows[index, rows], chosen = losses.min(dim=0)
            best_ranges[index, rows] = candidates[chosen, torch.arange(w.shape[0], device=w.device)]
    numel = weight.numel()
    minmax_loss = float(minmax_rows.sum()) / numel
    best = (fmt, absmax, minmax_loss)
    for index, candidate_format in enumerate(formats):
        total = float(best_rows[index].sum()) / numel
        if total < best[2]:
            best = (candidate_format, best_ranges[index], total)
    return (*best, minmax_loss)
