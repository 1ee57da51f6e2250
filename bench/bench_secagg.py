"""Cost of SecAgg+ against plain summation, in process (no broker, no object store).

For each model size and number of clients: the plain aggregation the hub would otherwise do
(summing n float32 updates), then a full SecAgg+ round on the same sizes: key and share
stages (all clients), masking (per client: the cost each spoke pays, in parallel in a
real round), and the hub's consistency check, unmasking and modular sum (the signing
and unmasking answers of the spokes included). Ratios are against the plain sum.

    .venv/bin/python bench/bench_secagg.py            # 1e4, 1e6, 1e7 x 3, 10, 20 clients
    .venv/bin/python bench/bench_secagg.py --quick    # small sizes, a few seconds
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from tributary.protocol.training import secagg as sa

BITS = 32


def plain_sum(updates: list[np.ndarray]) -> float:
    start = time.perf_counter()
    total = np.zeros_like(updates[0])
    for u in updates:
        total += u
    return time.perf_counter() - start


def secagg_round(n: int, d: int, rng: np.random.Generator) -> tuple[float, float, float, int]:
    """Seconds for (setup stages, mean masking per client, hub unmask+sum) and the degree."""
    names = [f"spoke{i:02d}" for i in range(n)]
    start = time.perf_counter()
    config = sa.make_round_config("bench", names, bits=BITS, vector_length=d)
    made = time.perf_counter() - start
    vectors = {p: rng.integers(0, 2**BITS, size=d, dtype=np.uint32) for p in names}
    _, times = sa.sum_in_one_process(config, vectors)
    return made + times.setup_s, times.mask_s / n, times.hub_s, len(config.neighbours[names[0]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes only")
    args = parser.parse_args()
    sizes = [10**4, 10**5] if args.quick else [10**4, 10**6, 10**7]
    counts = [3, 5] if args.quick else [3, 10, 20]
    rng = np.random.default_rng(1)
    print(f"{'params':>9} {'n':>3} {'k':>3} {'plain ms':>9} {'setup ms':>9} "
          f"{'mask/spoke ms':>14} {'hub ms':>9} {'mask/plain':>11} {'hub/plain':>10}")
    for d in sizes:
        for n in counts:
            updates = [rng.standard_normal(d, dtype=np.float32) for _ in range(n)]
            plain = min(plain_sum(updates) for _ in range(3))
            del updates
            setup, mask, hub, k = secagg_round(n, d, rng)
            print(f"{d:>9.0e} {n:>3} {k:>3} {plain * 1e3:>9.2f} {setup * 1e3:>9.1f} "
                  f"{mask * 1e3:>14.1f} {hub * 1e3:>9.1f} {mask / plain:>11.1f} "
                  f"{hub / plain:>10.1f}", flush=True)


if __name__ == "__main__":
    main()
