"""Framework-independent part of TE. Real TE loads its C++ library here; the emulation has none."""

from . import recipe  # noqa: F401
