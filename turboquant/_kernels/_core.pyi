"""Type stubs of the compiled kernels (see _core.pyx for the contracts)."""

import numpy as np
import numpy.typing as npt

_Float = npt.NDArray[np.float32] | npt.NDArray[np.float64]
_F64 = npt.NDArray[np.float64]
_U8 = npt.NDArray[np.uint8]

def openmp_enabled() -> bool: ...
def max_threads() -> int: ...
def num_procs() -> int: ...
def _last_team_size() -> int: ...
def _process_variant(cap: str | None) -> int: ...
def _kernel_variants() -> list[str]: ...
def _kernel_variant() -> str: ...
def _last_kernel_variant() -> str | None: ...

class _use_kernel_variant:
    name: str
    def __init__(self, name: str) -> None: ...
    def __enter__(self) -> str: ...
    def __exit__(self, *exc_info: object) -> None: ...

def row_norms(x: _Float, out: _F64, n_threads: int) -> None: ...
def hadamard_rotate(
    x: _Float, out: _Float, signs: _F64, block: int, inverse: bool, n_threads: int,
    variant: str | None = None,
) -> None: ...
def quantize_pack(
    y: _Float,
    norms: _F64,
    boundaries: _F64,
    centroids: _F64,
    bits: int,
    codes: _U8,
    residual: _Float,
    want_residual: bool,
    n_threads: int,
    variant: str | None = None,
) -> None: ...
def small_dense_quantize_pack(
    x: _Float, operand: _Float, boundaries: _F64, centroids: _F64, bits: int,
    norms: _F64, codes: _U8, residual: _Float, want_residual: bool,
    variant: str | None = None,
) -> None: ...
def hadamard_quantize_pack(
    x: _Float,
    signs: _F64,
    block: int,
    boundaries: _F64,
    centroids: _F64,
    bits: int,
    norms: _F64,
    codes: _U8,
    residual: _Float,
    want_residual: bool,
    n_threads: int,
    variant: str | None = None,
) -> None: ...
def unpack_indices(codes: _U8, bits: int, out: _U8, n_threads: int) -> None: ...
def pack_indices(indices: _U8, bits: int, codes: _U8, n_threads: int) -> None: ...
def dequantize_rows(
    codes: _U8, bits: int, centroids: _F64, scales: _F64, out: _Float, n_threads: int
) -> None: ...
def lut_inner_products(
    codes: _U8,
    bits: int,
    centroids: _F64,
    queries: _Float,
    scales: _F64,
    out: _Float,
    accumulate: bool,
    n_threads: int,
    variant: str | None = None,
) -> None: ...
def lut_weighted_sum(
    codes: _U8,
    bits: int,
    centroids: _F64,
    weights: _Float,
    scales: _F64,
    out: _F64,
    n_threads: int,
    variant: str | None = None,
) -> None: ...
def small_code_attention(
    key_codes: _U8,
    key_bits: int,
    key_centroids: _F64,
    key_norms: npt.NDArray[np.float32],
    value_codes: _U8,
    value_bits: int,
    value_centroids: _F64,
    value_norms: npt.NDArray[np.float32],
    queries: npt.NDArray[np.float32],
    key_rotation: npt.NDArray[np.float32] | None,
    value_rotation: npt.NDArray[np.float32] | None,
    scale: float,
    out: npt.NDArray[np.float32],
    n_threads: int,
    variant: str | None = None,
    *,
    key_block_scales: _U8 | None = None,
    key_factors: _F64 | None = None,
    value_block_scales: _U8 | None = None,
    value_factors: _F64 | None = None,
    lse: npt.NDArray[np.float32] | None = None,
    extra_keys: tuple[
        tuple[_U8, int, _F64, npt.NDArray[np.float32], npt.NDArray[np.float32] | None, float,
              _U8 | None, _F64 | None, npt.NDArray[np.float32]], ...] = (),
) -> None: ...
def merge_exact_rows(
    out: npt.NDArray[np.float32],
    lse: npt.NDArray[np.float32],
    queries: npt.NDArray[np.float32],
    keys: npt.NDArray[np.float32],
    values: npt.NDArray[np.float32],
    scale: float,
    center: npt.NDArray[np.float32] | None = None,
) -> None: ...
def small_code_attention_heads(
    key_codes: npt.NDArray[np.uintp],
    key_norms: npt.NDArray[np.uintp],
    key_bytes: int,
    key_bits: int,
    key_centroids: _F64,
    value_codes: npt.NDArray[np.uintp],
    value_norms: npt.NDArray[np.uintp],
    value_bytes: int,
    value_bits: int,
    value_centroids: _F64,
    n: int,
    queries: npt.NDArray[np.float32],
    key_rotations: npt.NDArray[np.uintp] | None,
    value_rotations: npt.NDArray[np.uintp] | None,
    scale: float,
    out: npt.NDArray[np.float32],
    n_threads: int,
    variant: str | None = None,
    *,
    key_block_scales: npt.NDArray[np.uintp] | None = None,
    key_block_bytes: int = 0,
    key_factors: _F64 | None = None,
    value_block_scales: npt.NDArray[np.uintp] | None = None,
    value_block_bytes: int = 0,
    value_factors: _F64 | None = None,
    lse: npt.NDArray[np.float32] | None = None,
) -> None: ...
def small_product(x: _Float, matrix: _Float, out: _Float, variant: str | None = None) -> None: ...
def standard_normal_from_raw(
    words: npt.NDArray[np.uint64], out: _F64, filled: int
) -> int: ...
def haar_orthogonal(a: _F64, variant: str | None = None) -> None: ...
def block_quantize_pack(
    y: _Float,
    scales: _F64,
    boundaries: _F64,
    centroids: _F64,
    factors: _F64,
    bits: int,
    codes: _U8,
    block_codes: _U8,
    n_threads: int,
) -> None: ...
def block_dequantize(
    codes: _U8, block_codes: _U8, bits: int, centroids: _F64, factors: _F64, scales: _F64,
    out: _Float, n_threads: int,
) -> None: ...
def block_inner_products(
    codes: _U8, block_codes: _U8, bits: int, centroids: _F64, factors: _F64, scales: _F64,
    queries: _Float, out: _Float, n_threads: int,
) -> None: ...
def block_weighted_sum(
    codes: _U8, block_codes: _U8, bits: int, centroids: _F64, factors: _F64, scales: _F64,
    weights: _F64, out: _F64, n_threads: int,
) -> None: ...
def rotate_heads(
    x: npt.NDArray[np.float32],
    rotations: npt.NDArray[np.uintp],
    rounds: int,
    block: int,
    inverse: bool,
    out: npt.NDArray[np.float32],
    n_threads: int,
    variant: str | None = None,
) -> None: ...
def quantize_heads(
    x: npt.NDArray[np.float32],
    rotations: npt.NDArray[np.uintp],
    rounds: int,
    block: int,
    boundaries: _F64,
    centroids: _F64,
    bits: int,
    norms: _F64,
    codes: _U8,
    n_threads: int,
    variant: str | None = None,
) -> None: ...
def small_code_attention_ragged(
    key_codes: npt.NDArray[np.uintp],
    key_norms: npt.NDArray[np.uintp],
    key_bytes: int,
    key_bits: int,
    key_centroids: _F64,
    value_codes: npt.NDArray[np.uintp],
    value_norms: npt.NDArray[np.uintp],
    value_bytes: int,
    value_bits: int,
    value_centroids: _F64,
    lengths: npt.NDArray[np.intp],
    queries: npt.NDArray[np.float32],
    key_rotations: npt.NDArray[np.uintp] | None,
    value_rotations: npt.NDArray[np.uintp] | None,
    scale: float,
    out: npt.NDArray[np.float32],
    n_threads: int,
    variant: str | None = None,
    *,
    key_block_scales: npt.NDArray[np.uintp] | None = None,
    key_block_bytes: int = 0,
    key_factors: _F64 | None = None,
    value_block_scales: npt.NDArray[np.uintp] | None = None,
    value_block_bytes: int = 0,
    value_factors: _F64 | None = None,
    lse: npt.NDArray[np.float32] | None = None,
) -> None: ...
def scan_nibbles(d: int, bits: int) -> int: ...
def scan_pack(rows: _U8, blocks: _U8, first: int) -> None: ...
def scan_unpack(blocks: _U8, positions: npt.NDArray[np.int64], rows: _U8) -> None: ...
def fast_scan_search(
    blocks: _U8,
    n: int,
    bits: int,
    centroids: _F64,
    queries: npt.NDArray[np.float32],
    scale: npt.NDArray[np.float32],
    offset: npt.NDArray[np.float32],
    block_terms: npt.NDArray[np.float32],
    ids: npt.NDArray[np.int64],
    candidates: int,
    out_keys: _F64,
    out_positions: npt.NDArray[np.int64],
    n_threads: int,
    variant: str | None = None,
) -> None: ...
def row_scan_search(
    codes: _U8,
    n: int,
    bits: int,
    centroids: _F64,
    queries: npt.NDArray[np.float32],
    scale: npt.NDArray[np.float32],
    offset: npt.NDArray[np.float32],
    ids: npt.NDArray[np.int64],
    out_keys: _F64,
    out_positions: npt.NDArray[np.int64],
    n_threads: int,
    variant: str | None = None,
) -> None: ...
