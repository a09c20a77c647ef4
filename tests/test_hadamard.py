"""quant_layers.hadamard: Sylvester matrices against a plain-loop recursion, Paley orders against the definition of a
Hadamard matrix (+-1 entries, M M^T = n I, exactly), Kronecker factors and block application against dense products,
the seeded randomised Hadamard, and bad sizes as a one-line ValueError."""

import math

import pytest
import torch

from conftest import one_line_value_error

from quant_layers.hadamard import (block_hadamard, hadamard_factors, hadamard_matrix, kron_rotate, random_hadamard,
                                   random_signs)


def sylvester_by_loop(n: int) -> list[list[int]]:
    """H_1 = [1], H_2m = [[H, H], [H, -H]], as Python lists of +-1."""
    h = [[1]]
    while len(h) < n:
        h = [row + row for row in h] + [row + [-v for v in row] for row in h]
    return h


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16, 32, 128])
def test_sylvester_equals_the_plain_loop_recursion(n):
    reference = torch.tensor(sylvester_by_loop(n), dtype=torch.float64) / math.sqrt(n)
    assert torch.equal(hadamard_matrix(n, torch.float64), reference)


@pytest.mark.parametrize("n", [2, 12, 20, 28, 36, 64, 72, 140, 576, 1536])
def test_hadamard_is_orthonormal_with_entries_plus_minus_one_over_sqrt_n(n):
    unnormalised = hadamard_matrix(n, torch.float64) * math.sqrt(n)
    assert torch.equal(unnormalised.round().abs(), torch.ones(n, n, dtype=torch.float64))
    integer = unnormalised.round()
    assert torch.equal(integer @ integer.T, n * torch.eye(n, dtype=torch.float64))  # the definition, exactly
    h = hadamard_matrix(n, torch.float32).double()  # the float32 matrix, multiplied without float32 accumulation
    torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-6)


def test_kronecker_factors_of_the_model_widths():
    """SmolLM2 576 / 1536, Qwen2.5-1.5B 1536 / 8960: Paley factor outside, a power of two of at most 256 inside."""
    shapes = {n: tuple(f.shape[0] for f in hadamard_factors(n)) for n in (576, 1536, 8960, 4096)}
    assert shapes == {576: (36, 16), 1536: (12, 128), 8960: (140, 64), 4096: (16, 256)}


@pytest.mark.parametrize("n", [64, 512, 576, 1536])
def test_kronecker_factors_rebuild_the_hadamard_and_apply_as_the_dense_product(n):
    outer, inner = hadamard_factors(n, torch.float64)
    dense = inner if outer is None else torch.kron(outer, inner)
    torch.testing.assert_close(dense, hadamard_matrix(n, torch.float64), rtol=0, atol=1e-15)
    x = torch.randn(3, 2, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    torch.testing.assert_close(kron_rotate(x, inner, outer), x @ dense, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("size", [2, 16, 32])
def test_block_hadamard_is_the_block_diagonal_dense_matmul(size):
    x = torch.randn(3, 5, 96, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    h = torch.tensor(sylvester_by_loop(size), dtype=torch.float64) / math.sqrt(size)
    expected = x @ torch.block_diag(*[h] * (96 // size))
    torch.testing.assert_close(block_hadamard(x, size), expected, rtol=1e-12, atol=1e-12)
    assert block_hadamard(x.float(), size).dtype == torch.float32


def test_random_hadamard_is_seeded_orthogonal_diag_s_times_h():
    q = random_hadamard(64, seed=3, dtype=torch.float64)
    torch.testing.assert_close(q @ q.T, torch.eye(64, dtype=torch.float64), rtol=0, atol=1e-12)
    signs = random_signs(64, 3)
    assert set(signs.tolist()) == {-1.0, 1.0}
    assert torch.equal(q, signs.double()[:, None] * hadamard_matrix(64, torch.float64))
    assert torch.equal(q, random_hadamard(64, seed=3, dtype=torch.float64))
    assert not torch.equal(q, random_hadamard(64, seed=4, dtype=torch.float64))


def test_bad_hadamard_sizes_are_a_one_line_value_error():
    x = torch.randn(2, 96)
    assert "power of two" in one_line_value_error(lambda: block_hadamard(x, 24))
    assert "does not divide" in one_line_value_error(lambda: block_hadamard(x, 64))
    assert "order 6" in one_line_value_error(lambda: hadamard_matrix(6))
    assert "does not fit" in one_line_value_error(lambda: kron_rotate(x, hadamard_matrix(4), hadamard_matrix(2)))
