"""A lean start for the processes that only de-identify (the steward's command, ingest
workers started as fresh interpreters).

- pydicom imports ``requests`` and ``tqdm`` when it loads, only to download its own test
  data, which these processes never do: they are hidden while pydicom loads (about 0.1 s
  of CPU) and unhidden at once, so anything that needs them later imports them as usual.
- Some modules are imported by the libraries these processes use, at load, for paths
  these processes never or seldom take (:data:`DEFERRED`): numpy (pydicom's
  configuration; only decoding pixels uses it: OCR of text-prone images, Clean Pixel
  Data), ``urllib.request`` (pydicom's test-data downloader: with it ``http.client``
  and ``ssl``), ``pydicom.examples`` (the example data sets of pydicom's documentation,
  looked up on disk when pydicom loads), ``tqdm`` and ``argparse`` (dicom-anonymizer's
  own command's progress bar and options), ``attr`` (rich's pretty-printer, for attrs
  classes) and ``configparser`` (rich's themes read from files). Each is
  deferred: ``import`` gets a stand-in module, and the first use of any of its
  attributes imports the real module and makes the stand-in a view of it. Whoever uses
  one gets it; whoever does not never pays for it. A few attributes are answered
  without loading, where the answer cannot depend on the real module yet:
  ``numpy.ndarray``, which pydicom's writer only asks ``isinstance`` about for every
  text value (before numpy is loaded no object can be an array, so the answer is no,
  and once it is loaded the same stand-in class answers as the real one), and
  ``attr.ib``, whose presence rich checks (a call of it loads attrs and calls the real
  one).
- When such a command ran as the ``tributary`` process itself, that process ends without
  tearing the interpreter down (:func:`exit_now`): every exit handler runs and the
  standard streams are flushed, then the process exits. Tearing down would free each of
  the objects the imports made, one by one, for the operating system to take the whole
  memory back a moment later (about 0.01 s, a twentieth of a one-file run).
- The steward's command and ingest (:func:`lean_start`) also skip the collector's passes
  at exit: they would go over every object of the process again (about 40,000:
  pydicom's dictionaries, pydantic's schemas; 0.05 s of CPU, a fifth of a one-file run)
  only to find nothing whose collection matters, since the command closes and fsyncs
  every file it writes before it returns. An exit handler freezes the objects
  (``gc.freeze``), so the collector skips them; every ``atexit`` handler and
  ``weakref.finalize`` callback still runs, and the operating system takes the memory
  back.

Pillow's package is loaded (pydicom asks whether it is installed, and records the
answer), but not its image and colour-management modules, which pydicom imports at load
for applying ICC profiles and which the rest of a de-identifying process uses only to
read text burned into pixels: ``PIL.Image`` and ``PIL.ImageCms`` are deferred like the
others (about a tenth of pydicom's load). What pydicom asks at load, which codecs Pillow
was built with, is answered by Pillow's compiled module (``PIL.Image.core``), loaded for
it alone."""

from __future__ import annotations

import atexit
import gc
import importlib
import importlib.machinery
import importlib.util
import os
import sys
import threading
import types
from collections.abc import Callable
from typing import Any, NoReturn

_DOWNLOAD_ONLY = ("requests", "tqdm")
#: module -> why it is deferred (who imports it, for what)
DEFERRED = {
    "numpy": "pydicom's configuration and pixel modules; only decoding pixels uses it",
    "urllib.request": "pydicom's test-data downloader",
    "tqdm": "dicom-anonymizer's command-line progress bar",
    "attr": "rich's pretty-printer, for attrs classes",
    "argparse": "dicom-anonymizer's own command's options",
    "configparser": "rich's themes read from files",
    "pydicom.examples": "pydicom's documentation's example data sets (found on disk at load)",
    "PIL.Image": "pydicom's colour management (ICC profiles); OCR of text-prone images",
    "PIL.ImageCms": "pydicom's colour management (ICC profiles)",
}


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
    _answers: dict[str, Any]

    def __getattr__(self, name: str) -> Any:
        real = self._real
        if real is None:
            if name.startswith("__") and name not in ("__path__", "__file__", "__version__",
                                                      "__all__"):
                raise AttributeError(name)
            if name in self._answers:
                return self._answers[name]
            real = self._load()
        return getattr(real, name)

    def _load(self) -> types.ModuleType:
        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
        real = importlib.import_module(self.__name__)  # sets it on its parent package
        self.__dict__.update(real.__dict__)  # later lookups find them without a call
        self._real = real
        return real


def _forward(module: _Deferred, name: str) -> Callable[..., Any]:
    """A callable standing for ``module.name``: calling it loads the module."""

    def call(*args: Any, **kwargs: Any) -> Any:
        real = module._real if module._real is not None else module._load()
        return getattr(real, name)(*args, **kwargs)

    return call


def _installed(name: str) -> bool:
    """Whether ``name`` can be imported, found without importing its parent packages
    (``find_spec("a.b")`` would import ``a``)."""
    top, *rest = name.split(".")
    spec = sys.modules[top].__spec__ if top in sys.modules else importlib.util.find_spec(top)
    for depth in range(1, len(rest) + 1):
        if spec is None or spec.submodule_search_locations is None:
            return False
        spec = importlib.machinery.PathFinder.find_spec(
            ".".join([top, *rest[:depth]]), spec.submodule_search_locations)
    return spec is not None


def defer(name: str) -> None:
    """Put the stand-in for ``name`` (one of :data:`DEFERRED`) in place, unless it is
    loaded or not installed."""
    if name in sys.modules or not _installed(name):
        return
    parent = name.rpartition(".")[0]
    if parent and parent != "pydicom":  # pydicom's own: attached once pydicom is loaded
        importlib.import_module(parent)
    stand_in = _Deferred(name)
    stand_in.__spec__ = None
    stand_in._answers = {}
    if name == "numpy":
        stand_in._answers["ndarray"] = _ArrayCheck("ndarray", (), {"_module": stand_in})
    elif name == "attr":
        stand_in._answers["ib"] = _forward(stand_in, "ib")
    elif name == "PIL.Image":
        core = _pillow_core()
        if core is not None:
            stand_in._answers["core"] = core
    sys.modules[name] = stand_in
    _attach(name)


def _pillow_core() -> types.ModuleType | None:
    """What ``PIL.Image.core`` is, found as ``PIL.Image`` finds it: Pillow's compiled
    module, if it matches the installed Pillow (else the real ``PIL.Image`` must say what
    it is instead). pydicom asks it, at load, which codecs Pillow was built with."""
    try:
        core = importlib.import_module("PIL._imaging")
    except ImportError:
        return None
    return core if getattr(core, "PILLOW_VERSION", None) == sys.modules["PIL"].__version__ \
        else None


def _attach(name: str) -> None:
    """``import a.b`` then ``a.b.f()`` looks b up on a: the stand-in is set there too,
    once a is loaded (the import system sets only real submodules)."""
    parent, _, child = name.rpartition(".")
    stand_in = sys.modules.get(name)
    if parent in sys.modules and isinstance(stand_in, _Deferred) and \
            not hasattr(sys.modules[parent], child):
        setattr(sys.modules[parent], child, stand_in)


def defer_numpy() -> None:
    """Put the stand-in for numpy in place, unless numpy is loaded or not installed."""
    defer("numpy")


def import_pydicom() -> None:
    """Import pydicom without its test-data downloader's optional dependencies (it then
    falls back to the standard library, should it ever download), the modules of
    :data:`DEFERRED` deferred. Call it before anything imports pydicom."""
    if "pydicom" in sys.modules:
        return
    for name in DEFERRED:
        if name not in _DOWNLOAD_ONLY:
            defer(name)
    hidden = [name for name in _DOWNLOAD_ONLY if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]  # import raises ImportError
    try:
        import pydicom.dataset  # noqa: F401
    finally:
        for name in hidden:
            if sys.modules.get(name, ...) is None:
                del sys.modules[name]
    _attach("pydicom.examples")
    defer("tqdm")  # after pydicom, which goes on without it


def lean_start() -> None:
    """Start a process that only de-identifies or ingests and exits (the steward's command,
    ``tributary spoke ingest``): :func:`import_pydicom`, pydantic's plugins off, the
    collector paused until :func:`started` and the objects frozen at exit. Call it before
    anything imports pydicom or builds a pydantic model. In a process that has loaded
    pydicom already (a test, an agent) only the plugins are switched off: its objects are
    not this command's to freeze.

    pydantic's plugins are switched off with pydantic's own switch
    (``PYDANTIC_DISABLE_PLUGINS``, unless the site set it): a plugin sees every value
    validated, and a de-identifying process validates source paths and identifiers (and
    looking for them reads every installed distribution's entry points)."""
    global _PAUSED, _LEAN
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    if "pydicom" in sys.modules:
        return
    _LEAN = True
    # The imports that follow make only what lives as long as the process (modules,
    # classes, schemas): the collector, which would go over them again and again as
    # they are made (about 0.01 s of CPU), waits until they are made.
    if gc.isenabled():
        gc.disable()
        _PAUSED = True
    _skip_final_collection()
    import_pydicom()


def started() -> None:
    """The command's imports are done: what they made is frozen (the collector no
    longer looks at it) and the collector, if :func:`lean_start` paused it, collects
    from here on as usual."""
    global _PAUSED
    if _PAUSED:
        gc.freeze()
        gc.enable()
        _PAUSED = False


def lean() -> bool:
    """Whether this process started lean: :func:`lean_start` did the whole start (in a
    process that had loaded pydicom already it does not), so the process runs one command
    that closes every file it writes before it returns."""
    return _LEAN


def exit_now(code: int) -> NoReturn:
    """End a lean process (:func:`lean`) that has no other thread, with ``code``, without
    tearing the interpreter down: the exit handlers run (``atexit``, ``weakref.finalize``,
    logging's flush, multiprocessing's), the standard streams are flushed, and the process
    exits. Anything else, or a Python without ``atexit._run_exitfuncs``, exits as usual.
    For the process's own entry point only: a caller that goes on after the command (a
    test) must not call it."""
    run_handlers = getattr(atexit, "_run_exitfuncs", None)
    if not _LEAN or run_handlers is None or threading.active_count() > 1:
        sys.exit(code)
    run_handlers()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):  # a closed pipe: the interpreter's status for it
            code = code or 120
    os._exit(code)


def _skip_final_collection() -> None:
    """Freeze every object at exit, once. Exit handlers registered before this one run
    after it, as they would have: freezing stops nothing and frees nothing, the
    collector only no longer looks at the objects there were."""
    global _FREEZE_AT_EXIT
    if not _FREEZE_AT_EXIT:
        atexit.register(gc.freeze)
        _FREEZE_AT_EXIT = True


_FREEZE_AT_EXIT = False
_PAUSED = False
_LEAN = False
