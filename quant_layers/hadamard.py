"""Hadamard rotations, pure math: orthonormal Hadamard matrices and their application along the last dimension.

Row-vector convention, as in nn.Linear (y = x W^T): a rotation R [n, n] maps x [..., n] to x R, and a Linear keeps
its output when its weight becomes W R, since (x R)(W R)^T = x W^T for orthogonal R.

Orders built here (every entry is +-1 / sqrt(n), H H^T = I):
    n = 2^k                      Sylvester: H[i, j] = (-1)^popcount(i & j) / sqrt(n)
    n = m 2^k, m a Paley order   kron(P_m, H_{2^k}) / sqrt(n), P_m of Paley's construction I (m = q + 1, q prime
                                 = 3 mod 4) or II (m = 2 (q + 1), q prime = 1 mod 4); the smallest such m is used.
This covers SmolLM2 (576 = 36 x 16, 1536 = 12 x 128) and Qwen2.5-1.5B (1536, 8960 = 140 x 64). Where the Paley
factor is large (LLaMA-7B's 11008 = 5504 x 2: a dense 5504-wide factor) or missing, a block-diagonal rotation
(H_size on each run of `size` channels) is the cheap alternative.

A rotation is applied in Kronecker form, x (outer kron inner): with X = x viewed as [..., n / p, p],
x (A kron B) = A^T X B, so an n-wide Hadamard costs n / p + p products per element and stores two small matrices.
outer None is the block-diagonal rotation diag(inner, ..., inner).
"""

from __future__ import annotations

import math

import torch

INNER_MAX = 256  # largest inner factor hadamard_factors uses


def is_power_of_two(n: int) -> bool:
    return isinstance(n, int) and n >= 1 and n & (n - 1) == 0


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _paley_kind(m: int) -> int:
    """1 or 2 if Paley's construction I / II gives a Hadamard matrix of order m, else 0."""
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return 1
    if m % 2 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return 2
    return 0


def _paley_order(n: int) -> int:
    """The smallest Paley order m with n / m a power of two (1 for n itself a power of two); ValueError if none."""
    if is_power_of_two(n):
        return 1
    for m in range(2, n + 1):
        if n % m == 0 and is_power_of_two(n // m) and _paley_kind(m):
            return m
    raise ValueError(f"no Hadamard matrix of order {n} is built here (orders 2^k, or 2^k times a Paley order); "
                     f"use a block-diagonal rotation with a power-of-two block size dividing {n}")


def _paley(m: int) -> torch.Tensor:
    """Unnormalised +-1 Hadamard matrix of Paley order m [m, m], float64."""
    kind = _paley_kind(m)
    q = m - 1 if kind == 1 else m // 2 - 1
    chi = -torch.ones(q, dtype=torch.float64)  # Legendre symbol of 0..q-1
    chi[(torch.arange(1, q) ** 2) % q] = 1.0
    chi[0] = 0.0
    index = torch.arange(q)
    jacobsthal = chi[(index[None, :] - index[:, None]) % q]  # Q[i, j] = chi(j - i)
    ones = torch.ones(q, dtype=torch.float64)
    conference = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    conference[0, 1:] = ones
    conference[1:, 0] = -ones if kind == 1 else ones
    conference[1:, 1:] = jacobsthal
    if kind == 1:  # skew conference matrix C: H = I + C
        return torch.eye(m, dtype=torch.float64) + conference
    plus = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    minus = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(conference, plus) + torch.kron(torch.eye(q + 1, dtype=torch.float64), minus)


def _sylvester(n: int) -> torch.Tensor:
    """Unnormalised Sylvester matrix [n, n], float64: (-1)^popcount(i & j)."""
    both = torch.arange(n)[:, None] & torch.arange(n)[None, :]
    parity = torch.zeros_like(both)
    for bit in range(max(n.bit_length() - 1, 0)):
        parity ^= (both >> bit) & 1
    return 1.0 - 2.0 * parity.to(torch.float64)


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32, normalized: bool = True) -> torch.Tensor:
    """Orthonormal Hadamard matrix H_n [n, n] (entries +-1/sqrt(n), symmetric when n = 2^k), for n = 2^k or
    n = m 2^k with m a Paley order (kron(P_m, H_{2^k})); ValueError for other n. normalized False: the +-1 matrix
    sqrt(n) H_n, exact in every dtype."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"a Hadamard matrix needs a positive integer order, got {n!r}")
    m = _paley_order(n)
    unnormalised = _sylvester(n) if m == 1 else torch.kron(_paley(m), _sylvester(n // m))
    return (unnormalised / math.sqrt(n) if normalized else unnormalised).to(dtype)


def rotation_dtype(dtype: torch.dtype) -> torch.dtype:
    """What a rotation of `dtype` values computes in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def hadamard_factors(n: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(outer [n/p, n/p] or None, inner [p, p]) with kron(outer, inner) = hadamard_matrix(n) (Sylvester factors
    multiply by kron; equal up to the rounding of 1/sqrt); p = the power-of-two part of n, at most INNER_MAX."""
    m = _paley_order(n)
    p = min(n // m, INNER_MAX)
    outer = hadamard_matrix(n // p, dtype) if n // p > 1 else None
    return outer, hadamard_matrix(p, dtype)


def check_block_size(size: int, width: int) -> None:
    """ValueError (one line) unless size is a power of two >= 2 that divides width."""
    if not is_power_of_two(size) or size < 2:
        raise ValueError(f"the Hadamard block size must be a power of two >= 2, got {size!r}")
    if width % size:
        raise ValueError(f"the Hadamard block size {size} does not divide the width {width}")


def kron_rotate(x: torch.Tensor, inner: torch.Tensor, outer: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., n] -> x (outer kron inner) [..., n]; outer None: x diag(inner, ..., inner) (blocks of p channels).

    inner [p, p], outer [n/p, n/p]; computed in inner's dtype, returned in x's dtype."""
    p, n = inner.shape[0], x.shape[-1]
    if n % p or (outer is not None and outer.shape[0] * p != n):
        raise ValueError(f"a rotation of {p}-blocks{'' if outer is None else f' x {outer.shape[0]}'} does not "
                         f"fit a last dimension of {n}")
    blocks = x.to(inner.dtype).reshape(*x.shape[:-1], n // p, p) @ inner
    if outer is not None:
        blocks = outer.to(inner.dtype).T @ blocks
    return blocks.reshape(x.shape).to(x.dtype)


def block_hadamard(x: torch.Tensor, size: int) -> torch.Tensor:
    """x [..., n] with H_size applied to each run of `size` channels: x diag(H_size, ...); float32 math
    (float64 for float64 x), x's dtype out."""
    check_block_size(size, x.shape[-1])
    return kron_rotate(x, hadamard_matrix(size, rotation_dtype(x.dtype)))


def random_signs(n: int, seed: int) -> torch.Tensor:
    """s [n] float32, each +-1 with probability 1/2, from a CPU torch.Generator seeded with `seed`."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=generator).to(torch.float32) * 2 - 1


def random_hadamard(n: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """QuaRot's randomised Hadamard Q = diag(s) H_n [n, n] (orthogonal): x Q is the Hadamard transform of s * x
    (H diag(s) acting on column vectors)."""
    return (random_signs(n, seed).to(torch.float64)[:, None] * hadamard_matrix(n, torch.float64)).to(dtype)
