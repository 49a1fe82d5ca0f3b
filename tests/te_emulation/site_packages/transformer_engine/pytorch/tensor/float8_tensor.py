from . import Float8Tensor  # noqa: F401
