"""The loss oracle of the per-layer search (`LinearProblem`): the output error of many candidate quantizers of
one Linear, as batched tensor operations. The search steps that use it are in utils/search/steps.py.

Objective for a Linear with calibration inputs X [N, in] and weight W [out, in]:

    L = || Q_a(X) Q_w(W)^T - X W^T ||^2 / (N * out)

Losses of many candidates are computed at once, chunked to a memory budget, by whichever of two exact forms
is cheaper:
- weights, with the quantized input fixed: with U = Q_w(W) - W (one fused kernel on CUDA) and D = Q_a(X) - X,
  L_row = u^T G u + 2 u . v + c, G = Xq^T Xq [in, in], V = (D W^T)^T Xq [out, in], c = |D W^T|^2 per
  row, computed once per activation state: no pass over tokens per candidate; or directly when N < in.
  `weight_proxy_losses` ranks candidates by a proxy that keeps G's diagonal and its leading eigenvectors.
- activations, with the quantized weight Wq fixed: with R = X (Wq - W)^T, L = sum_n d_n^T (Wq^T Wq) d_n
  + 2 d_n . (R Wq)_n + |R|^2, costing N*in^2 instead of N*in*out per candidate when in < out (e.g. the
  output head); or directly when out <= in. `coarse_rows` gives the strided token subset candidates are
  ranked on first.
- block-scaled formats (NVFP4, MX, on either side): no per-tensor grid, so the quantized operands come from the
  reference quantizer (`quantized_inputs`, `quantize`), batched over candidates by a leading dimension of their
  ranges and block clips, in float32: activation candidates directly (Q_a(X) Wq^T - X W^T); weight candidates by
  the quadratic form above with G, V, c of Q_a(X), or directly when N < in.

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
from quant_layers.formats import QuantFormat, exponent_bias_from_max
from quant_layers.modules import QuantParams, quantized_weight
from quant_layers.quantize import (abs_max, grid_candidates, grid_scale, quantize, residual_proxy, round_to_grid,
                                   weight_residuals)
from utils.search.space import TINY


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
    """Activation candidates: per-tensor ranges max_value [C], integer channel shifts [C, in] or None, and for a
    block-scaled format the clipping multipliers of its dynamic block maxima block_clip [C] or None (1).

    Candidate c quantizes X column i with range max_value[c] * 2^-shift[c, i] (blocks: each block's scale from
    block_clip[c] * its absolute maximum)."""

    fmt: QuantFormat
    max_value: torch.Tensor
    shift: torch.Tensor | None = None
    block_clip: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.max_value.shape[0]

    def scale(self) -> torch.Tensor:
        return grid_scale(self.fmt, self.max_value, self.max_value.device)

    def channel_scale(self) -> torch.Tensor | None:
        return None if self.shift is None else torch.exp2(self.shift.float())

    def select(self, index: torch.Tensor | slice) -> "ActCandidates":
        return ActCandidates(self.fmt, self.max_value[index], None if self.shift is None else self.shift[index],
                             None if self.block_clip is None else self.block_clip[index])

    @staticmethod
    def of_state(state: QuantParams) -> "ActCandidates":
        shift = None if state.act_channel_shift is None else state.act_channel_shift.view(1, -1)
        clip = None if state.act_block_clip is None else state.act_block_clip.reshape(1)
        return ActCandidates(state.act_format, state.act_max_value.reshape(1), shift, clip)


ROW_LOSS_BYTES = 16  # row_losses' working set per weight element of a row slice


def chunks(total: int, step: int):
    """Slices [start, start + step) covering range(total)."""
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
        for rows in chunks(x.shape[0], step):
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
        for cands in chunks(candidates, max(1, rows_per_step // self.out_features)):
            for outs in chunks(self.out_features, out_step):
                yield cands, outs

    def weight_losses(self, fmt: QuantFormat, candidates: torch.Tensor, state: QuantParams) -> torch.Tensor:
        """Per-row loss [C, out] (summed over tokens, not normalized) of weight candidates [C, out], with the
        activation quantizer of `state` fixed."""
        acts = self._stats_acts(state)
        if self.tokens < self.in_features:
            if fmt.block is not None or acts.fmt.block is not None:
                return self._reference_weight_losses(fmt, candidates, acts)
            return self._weight_losses_direct(fmt, candidates, acts)
        gram, v, const = self._weight_stats(acts)
        losses = torch.empty(candidates.shape[0], self.out_features, device=self.x.device)
        for cands, outs in self._weight_slices(candidates.shape[0]):
            u = weight_residuals(self.weight[outs], fmt, candidates[cands, outs], self.dtype,  # q(W) - W
                                 self.use_kernel)
            ug = mm32(u.view(-1, self.in_features), gram).view(u.shape)
            losses[cands, outs] = (ug.add_(v[outs], alpha=2) * u).sum(-1) + const[outs]  # u G u + 2 u.v + c
        return losses

    def weight_proxy_losses(self, fmt: QuantFormat, candidates: torch.Tensor, state: QuantParams, rank: int
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

    def _stats_acts(self, state: QuantParams) -> ActCandidates:
        """The activation quantizer of state as one candidate; the same object for the same quantizer, so
        that `_weight_stats` can keep its statistics."""
        key = (state.act_format, state.act_max_value, state.act_channel_shift, state.act_block_clip)
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
        if acts.fmt.block is not None:
            return self._block_weight_stats(acts)
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
                for outs in chunks(self.out_features, self.budget.rows(4 * self.in_features)):
                    v[outs].add_(r[:, outs].T @ grid_q)
            const += r.square().sum(dim=0)
        self._stats = ((gram * inverse.square()).to(self.dtype), v, const)
        return self._stats

    def _block_weight_stats(self, acts: ActCandidates) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`_weight_stats` for a block-scaled activation format (no per-tensor grid): Xq from the reference quantizer
        (`quantized_inputs`), everything in float32."""
        gram = torch.zeros(self.in_features, self.in_features, device=self.x.device)
        v = torch.zeros(self.out_features, self.in_features, device=self.x.device)
        const = torch.zeros(self.out_features, device=self.x.device)
        weight = self.weight.float()
        for xt in self._token_chunks(self.x, 12 * (self.in_features + self.out_features)):
            x32 = xt.float()
            xq = self.quantized_inputs(xt, acts)[0]
            gram += xq.T @ xq
            r = (xq - x32) @ weight.T
            for outs in chunks(self.out_features, self.budget.rows(4 * self.in_features)):
                v[outs].add_(r[:, outs].T @ xq)
            const += r.square().sum(dim=0)
        self._stats = (gram.to(self.dtype), v, const)
        return self._stats

    def weight_stats(self, state: QuantParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(G [in, in], V [out, in], c [out]) of the quadratic form for state's activation quantizer (`_weight_stats`,
        kept until `release_weight_stats`)."""
        return self._weight_stats(self._stats_acts(state))

    def row_losses(self, residual: torch.Tensor, state: QuantParams, rows: slice | None = None) -> torch.Tensor:
        """Exact per-row loss [..., rows] (summed over tokens, not normalized) of explicit weight residuals
        u = Q_w(W) - W [..., rows, in] (any weight quantizer, e.g. searched block scales) of the output rows `rows`
        (default all), with the activation quantizer of `state` fixed: u^T G u + 2 u.v + c, the quadratic form of
        `weight_losses`, in float32, chunked to the budget."""
        gram, v, const = self.weight_stats(state)
        gram = gram.float()
        rows = slice(0, self.out_features) if rows is None else rows
        v, const = v[rows], const[rows]
        flat = residual.reshape(-1, *residual.shape[-2:])
        losses = torch.empty(flat.shape[:2], device=self.x.device)
        for c in range(flat.shape[0]):
            for outs in self.row_loss_chunks(flat.shape[1]):
                u = flat[c, outs].float()
                losses[c, outs] = ((u @ gram).add_(v[outs], alpha=2) * u).sum(-1) + const[outs]
        return losses.view(residual.shape[:-1])

    def row_loss_chunks(self, rows: int):
        """The row slices `row_losses` evaluates at once (ROW_LOSS_BYTES per weight element: u, u G and their
        product): a caller that hands row_losses these slices one at a time gets the same products, bit for bit."""
        return chunks(rows, self.budget.rows(self.in_features * ROW_LOSS_BYTES))

    def quantized_inputs(self, xt: torch.Tensor, acts: ActCandidates) -> torch.Tensor:
        """Q_a(xt) [C, n, in] float32 for every candidate by the reference quantizer (any format, a block format's
        clip), batched by a leading candidate dimension of the ranges; with channel shifts Q(x * 2^k) * 2^-k."""
        x32 = xt.float()
        max_value = acts.max_value.float().view(-1, 1, 1)
        clip = None if acts.block_clip is None else acts.block_clip.float().view(-1, 1, 1)
        channel_scale = acts.channel_scale()
        if channel_scale is None:
            return quantize(x32, acts.fmt, max_value, clip=clip).expand(len(acts), *x32.shape)
        channel_scale = channel_scale.unsqueeze(1)  # [C, 1, in]
        return quantize(x32 * channel_scale, acts.fmt, max_value, clip=clip).div_(channel_scale)

    def _reference_weight_losses(self, fmt: QuantFormat, candidates: torch.Tensor, acts: ActCandidates
                                 ) -> torch.Tensor:
        """`weight_losses` directly by the reference quantizers (a block-scaled format on either side, N < in): per
        row, the sum over tokens of (Q_a(X) Q_w(W)^T - X W^T)^2, float32, in candidate x token chunks within the
        budget (about 16 bytes per weight element and candidate: Q_w(W) and the quantizer's working copies)."""
        weight = self.weight.float()
        losses = torch.zeros(candidates.shape[0], self.out_features, device=self.x.device)
        for cands in chunks(candidates.shape[0], self.budget.rows(16 * self.out_features * self.in_features)):
            weight_q = quantize(weight, fmt, candidates[cands].unsqueeze(-1)).transpose(1, 2)  # [c, in, out]
            row_bytes = 4 * (12 * self.in_features + 3 * weight_q.shape[0] * self.out_features)
            for xt in self._token_chunks(self.x, row_bytes):
                y = xt.float() @ weight.T
                xq = self.quantized_inputs(xt, acts)[0]
                losses[cands] += (xq @ weight_q).sub_(y).square_().sum(dim=1)
        return losses

    def _weight_losses_direct(self, fmt: QuantFormat, candidates: torch.Tensor, acts: ActCandidates
                              ) -> torch.Tensor:
        losses = torch.zeros(candidates.shape[0], self.out_features, device=self.x.device)
        act_inverse = 1.0 / acts.scale()
        for rows in chunks(candidates.shape[0], self.budget.rows(self.out_features * self.in_features * 8)):
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
                   x: torch.Tensor | None = None, weight_block_scale: torch.Tensor | None = None) -> torch.Tensor:
        """Loss [C] (summed over x's tokens, not normalized) of activation candidates with the weight
        quantized to (weight_format, weight_max_value [out], weight_block_scale: a block format's explicit scales or
        None) fixed. x: token rows to use (default all)."""
        x = self.x if x is None else x
        if acts.fmt.block is not None or weight_format.block is not None:
            return self._reference_act_losses(acts, weight_format, weight_max_value, weight_block_scale, x)
        if weight_block_scale is not None:
            raise ValueError(f"weight_block_scale needs a block-scaled weight format, got {weight_format.name}")
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
                for rows in chunks(len(acts), step):
                    d = self._act_grid(xt, acts.select(rows)).float().mul_(act_inverse[rows]).sub_(x32)
                    dh = mm32(d.view(-1, self.in_features).to(self.dtype), hessian).view_as(d)
                    losses[rows] += (dh.add_(b, alpha=2) * d).sum((1, 2))  # d H d + 2 d . b
            else:
                for rows in chunks(len(acts), step):
                    g = self._act_grid(xt, acts.select(rows))
                    yq = mm32(g.view(-1, self.in_features), grid_t).view(g.shape[0], xt.shape[0], -1)
                    losses[rows] += yq.mul_(output_inverse[rows]).sub_(y).square_().sum((1, 2))
        return losses

    def _reference_act_losses(self, acts: ActCandidates, weight_format: QuantFormat, weight_max_value: torch.Tensor,
                              weight_block_scale: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        """`act_losses` by the reference quantizers (block-scaled formats), directly: sum over x's tokens of
        |Q_a(X) Wq^T - X W^T|^2 per candidate, float32, in candidate x token chunks within the budget (about
        4 (12 in + 3 out) bytes per token and candidate: the quantizer's working copies, the product, its error)."""
        weight = self.weight.float()
        weight_q = quantize(weight, weight_format, weight_max_value.view(-1, 1), weight_block_scale).T
        losses = torch.zeros(len(acts), device=self.x.device)
        row_bytes = 4 * (12 * self.in_features + 3 * self.out_features)
        for xt in self._token_chunks(x, row_bytes):
            y = xt.float() @ weight.T
            for rows in chunks(len(acts), self.budget.rows(xt.shape[0] * row_bytes)):
                xq = self.quantized_inputs(xt, acts.select(rows))
                losses[rows] += (xq @ weight_q).sub_(y).square_().sum((1, 2))
        return losses

    def coarse_rows(self, count: int) -> torch.Tensor | None:
        """A strided subset of about `count` token rows, or None when that is (nearly) all of them."""
        if count <= 0 or self.tokens < 2 * count:
            return None
        return self.x[:: self.tokens // count].contiguous()

    def loss(self, state: QuantParams) -> float:
        """Normalized L of a state (block formats and stored weight codes by the reference quantizer)."""
        if (state.weight_format.block is not None or state.act_format.block is not None
                or state.weight_codes is not None):
            return float(self.normalize(self._reference_loss(state)))
        losses = self.act_losses(ActCandidates.of_state(state), state.weight_format, state.weight_max_value)
        return float(self.normalize(losses)[0])

    def _reference_loss(self, state: QuantParams) -> torch.Tensor:
        """L (summed) with X and W quantized by the reference quantizer: any format, block-scaled ones included (with
        the state's block scales, block clip and FPQ's channel shifts k: Xq = Q(X 2^k) 2^-k), the weight's stored codes
        honoured (`quantized_weight`)."""
        weight = self.weight.float()
        weight_q = quantized_weight(weight, state)
        acts = ActCandidates.of_state(state)
        total = torch.zeros((), device=self.x.device)
        for xt in self._token_chunks(self.x, 12 * (self.in_features + self.out_features)):
            xq = self.quantized_inputs(xt, acts)[0]
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
