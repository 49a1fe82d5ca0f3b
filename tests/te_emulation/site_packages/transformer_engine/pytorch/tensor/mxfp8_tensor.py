from . import MXFP8Tensor  # noqa: F401
