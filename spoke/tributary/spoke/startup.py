"""A lean start for the processes that only de-identify (the steward's command, ingest
workers started as fresh interpreters).

- pydicom imports ``requests`` and ``tqdm`` when it loads, only to download its own test
  data, which these processes never do: they are hidden while pydicom loads (about 0.1 s
  of CPU) and unhidden at once, so anything that needs them later imports them as usual.
- pydicom's configuration imports numpy (about 0.1 s of CPU, a quarter of the command's
  start) though reading, de-identifying and writing a file never touches an array: only
  decoding pixels does (OCR of text-prone images, Clean Pixel Data). numpy is deferred:
  ``import numpy`` gets a stand-in module, and the first use of any of its attributes
  imports the real numpy and makes the stand-in a view of it. Whoever uses numpy gets
  it; whoever does not never pays for it. One attribute is answered without loading:
  ``numpy.ndarray``, which pydicom's writer only asks ``isinstance`` about for every
  text value: before numpy is loaded no object can be an array, so the answer is no,
  and once it is loaded the same stand-in class answers as the real one."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any

_DOWNLOAD_ONLY = ("requests", "tqdm")
_DEFERRED = "numpy"


class _ArrayCheck(type):
    """``isinstance``/``issubclass`` against ndarray, answered without loading numpy."""

    _module: _Deferred

    def __instancecheck__(cls, obj: object) -> bool:
        real = cls._module._real
        return real is not None and isinstance(obj, real.ndarray)

    def __subclasscheck__(cls, sub: type) -> bool:
        real = cls._module._real
        return real is not None and issubclass(sub, real.ndarray)


class _Deferred(types.ModuleType):
    """Stands in for a module until one of its attributes is used. Only missing
    attributes reach ``__getattr__``: the import system's own checks (``__spec__``,
    ``__name__``) do not load it; ``__path__`` (a submodule import) does."""

    _real: types.ModuleType | None = None
    _array_check: type

    def __getattr__(self, name: str) -> Any:
        real = self._real
        if real is None:
            if name.startswith("__") and name not in ("__path__", "__file__", "__version__",
                                                      "__all__"):
                raise AttributeError(name)
            if name == "ndarray":
                return self._array_check
            real = self._load()
        return getattr(real, name)

    def _load(self) -> types.ModuleType:
        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
        real = importlib.import_module(self.__name__)
        self.__dict__.update(real.__dict__)  # later lookups find them without a call
        self._real = real
        return real


def defer_numpy() -> None:
    """Put the stand-in for numpy in place, unless numpy is loaded or not installed."""
    if _DEFERRED in sys.modules or importlib.util.find_spec(_DEFERRED) is None:
        return
    stand_in = _Deferred(_DEFERRED)
    stand_in.__spec__ = None
    stand_in._array_check = _ArrayCheck("ndarray", (), {"_module": stand_in})
    sys.modules[_DEFERRED] = stand_in


def import_pydicom() -> None:
    """Import pydicom without its test-data downloader's optional dependencies (it then
    falls back to the standard library, should it ever download), numpy deferred."""
    if "pydicom" in sys.modules:
        return
    defer_numpy()
    hidden = [name for name in _DOWNLOAD_ONLY if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]  # import raises ImportError
    try:
        import pydicom.dataset  # noqa: F401
    finally:
        for name in hidden:
            if sys.modules.get(name, ...) is None:
                del sys.modules[name]
