"""Test helpers for the Triton kernels: the tolerance rule lives in :mod:`sparseq.testing`
(one statement of the bounds for kernels, layers, benchmarks and tuning); re-exported here."""
from sparseq.testing import EPS32, assert_matmul_close, check_matmul_close, magnitude, matmul_bound  # noqa: F401
