"""nnattr: attribution for transformer language models, on nnsight, locally or on NDIF.

>>> import nnattr
>>> from nnattr.recipes import direct_logit_attribution
>>> model = nnattr.load("tiny-ioi")
>>> result = direct_logit_attribution.run(model, "When Mary and John went to the store , John gave a drink to")
"""

from .arch import ArchSpec, dims, register, spec_for, supported
from .batch import Batch
from .loading import load
from .result import Attribution

__version__ = "0.1.0"
__all__ = ["Attribution", "ArchSpec", "Batch", "dims", "load", "register", "spec_for", "supported", "__version__"]
