# cython: language_level=3
"""Typed kernels behind turboquant.

Every function here takes C-contiguous typed memoryviews that the Python layer
has already validated and allocated, and an explicit ``n_threads`` (>= 1). The
kernels know nothing about quantizers, caches or configs: they hold the loops.

Bit layout used throughout: a row of ``dim`` indices of ``bits`` bits each is a
little-endian bit stream; index ``j`` occupies bits ``j*bits .. j*bits+bits-1``
(bit 0 is the least significant bit of byte 0), so a row takes exactly
``ceil(dim*bits/8)`` bytes. Sign sketches are the ``bits == 1`` case
(bit set = +1), which matches ``numpy.packbits(..., bitorder="little")``.
"""


from cython.parallel cimport parallel, prange
from turboquant._kernels._common cimport *

include "_dispatch.pxi"
include "_encode.pxi"
include "_score.pxi"
include "_attention.pxi"
include "_random.pxi"
include "_block.pxi"
include "_step.pxi"
include "_search.pxi"
