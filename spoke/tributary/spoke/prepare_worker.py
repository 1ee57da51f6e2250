"""A preparing worker process (see :mod:`tributary.spoke.preparing`): its own module so
that pydicom is loaded lean (:mod:`tributary.spoke.startup`) before the engine is."""

from __future__ import annotations

import os
import signal
import sys

from tributary.spoke.startup import import_pydicom


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    import_pydicom()
    from tributary.spoke.preparing import serve

    serve(int(sys.argv[1]))
    os._exit(0)


if __name__ == "__main__":
    main()
