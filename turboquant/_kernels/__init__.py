"""The compiled kernels (``_core``): typed loops over validated, C-contiguous arrays.

Private: Python code reaches them only through the checked codec layer and the
rooms that own their inputs (quantizers, KV cache).
"""
