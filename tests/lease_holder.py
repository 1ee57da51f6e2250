"""A process that takes a hub lease, says so on standard output and holds it until killed:
the other hub process of the lease tests (run as ``python lease_holder.py URL NAME``)."""

from __future__ import annotations

import sys
import time

from tributary.hub.db import make_engine
from tributary.hub.lease import Lease

if __name__ == "__main__":
    lease = Lease(make_engine(sys.argv[1], migrate=False), sys.argv[2])
    while not lease.try_acquire():
        time.sleep(0.05)
    print("held", flush=True)
    while lease.held():
        time.sleep(0.2)
    print("lost", flush=True)
