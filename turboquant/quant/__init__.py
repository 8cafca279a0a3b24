"""Quantizers: codebooks, rotations, the MSE / Prod / QJL quantizers and their codes.

The public names are re-exported by :mod:`turboquant`; import them from there.
"""

from ._codebook import Codebook, coordinate_density, distortion_lower_bound, lloyd_max_codebook
from ._codes import CodeSpec, Codes, MSECodes, ProdCodes, QJLCodes
from ._quantizers import QJL, TurboQuantMSE, TurboQuantProd

__all__ = [
    "QJL",
    "Codebook",
    "CodeSpec",
    "Codes",
    "MSECodes",
    "ProdCodes",
    "QJLCodes",
    "TurboQuantMSE",
    "TurboQuantProd",
    "coordinate_density",
    "distortion_lower_bound",
    "lloyd_max_codebook",
]
