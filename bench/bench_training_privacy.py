"""Accuracy at meaningful privacy: the federated example model (examples/federated_logreg on
the synthetic cohorts, one scanner per site: not IID) against the same model trained
centrally on the pooled data, for noise multipliers that give epsilon of about 1, 4, 8 and
16 after the study's rounds, and the demo's setting (z = 0.002, an enormous epsilon).

The rounds' numerics run in this process, with the functions a round runs elsewhere: the
example's ``fit`` on each site (in the image, a spoke runs the very same code), the spoke's
``protect_weighted`` (clip to C, weight by sample count, Gaussian noise N(0, (zC)^2),
stochastic quantisation), SecAgg+ masking of each quantised vector and the hub's unmasking
of their sum (``tributary.protocol.training.secagg``), and the hub's dequantisation and
division by the summed weights (as ``hub/services/training._aggregate``). No broker, store
or container: they do not change the numbers (bench_training_rounds times them).
Epsilon is at the demo's delta, from dp-accounting's RDP accountant
(``tributary.protocol.training.privacy``: the local, per-site guarantee, sensitivity 2C).

Each setting is repeated with fresh noise; the table gives the mean and spread of the
held-out accuracy and log loss. The demo's clip bound (C = 10) is far above the size of an
update of this model, so the noise it calls for is needlessly large; a tighter C (about
the updates' norm, printed) is shown beside it.

    .venv/bin/python bench/bench_training_privacy.py             # 16+16 cases a site, 20 draws
    .venv/bin/python bench/bench_training_privacy.py --quick     # the demo's cohorts, 5 draws
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from tributary.protocol.training import secagg as sa
from tributary.protocol.training.privacy import epsilon_after
from tributary.protocol.training.update import (
    Quantisation,
    coordinate_range_for,
    dequantise_sum,
    flatten,
    schema_of,
    unflatten,
)
from tributary.spoke.training import protect_weighted
from tributary.testbed.training_demo import SPOKES, load_logreg, make_cohorts
from tributary_algorithm.training import RoundConfig

#: The demo's settings (testbed/training_demo.py).
DEMO_ROUNDS, DEMO_CLIP, DEMO_Z, DELTA = 4, 10.0, 0.002, 1e-5
TARGETS = (16.0, 8.0, 4.0, 1.0)
console = Console(width=130)


def noise_for(target: float, rounds: int, delta: float) -> float:
    """The noise multiplier z whose ``rounds`` rounds cost ``target`` epsilon at ``delta``
    (dp-accounting; epsilon falls as z grows, so bisect on log z)."""
    low, high = 1e-3, 1e4
    for _ in range(60):
        mid = math.sqrt(low * high)
        if epsilon_after(rounds, mid, delta) > target:
            low = mid
        else:
            high = mid
    return high


def secure_sum(vectors: dict[str, np.ndarray], bits: int) -> np.ndarray:
    """The modular sum of quantised vectors through a SecAgg+ round in this process (every
    stage: keys, shares, masking, consistency, unmasking)."""
    length = len(next(iter(vectors.values())))
    config = sa.make_round_config("privacy-bench", sorted(vectors), bits=bits,
                                  vector_length=length)
    return sa.sum_in_one_process(config, vectors)[0].total


def federated(algorithm: Any, sites: Sequence[Any], rounds: int, clip: float, z: float,
              rng: np.random.Generator) -> tuple[dict[str, np.ndarray], list[float]]:
    """A study of ``rounds`` rounds: the final global model and the norms of the updates.
    ``algorithm``: the example's, its features of each case computed once (its cache)."""
    params = algorithm.init(RoundConfig(round=0, task="init"))
    schema = schema_of(params)
    quantisation = Quantisation(bits=32, coordinate_range=coordinate_range_for(clip, z * clip),
                                max_summands=len(sites))
    norms: list[float] = []
    for r in range(rounds):
        deltas, counts = {}, {}
        for name, data in zip(SPOKES, sites, strict=True):
            config = RoundConfig(round=r + 1, task="fit", seed=int(rng.integers(2**31)))
            new, counts[name], _metrics = algorithm.fit(params, data, config)
            deltas[name] = flatten(new, schema) - flatten(params, schema)
            norms.append(float(np.linalg.norm(deltas[name])))
        reference = max(counts.values())
        quantised = {name: protect_weighted({"update": d}, schema_of({"update": d}),
                                            counts[name] / reference, clip, z, quantisation)
                     .astype(np.uint32) for name, d in deltas.items()}
        total = dequantise_sum(secure_sum(quantised, quantisation.bits), quantisation,
                               len(quantised))
        mean = total / sum(c / reference for c in counts.values())
        params = unflatten(flatten(params, schema) + mean, schema)
    return params, norms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the demo's cohorts, 5 draws")
    parser.add_argument("--cases", type=int, default=None, help="training cases a site")
    parser.add_argument("--held-out", type=int, default=None, help="test cases a site")
    parser.add_argument("--draws", type=int, default=None, help="noise draws per setting")
    parser.add_argument("--rounds", type=int, default=DEMO_ROUNDS)
    parser.add_argument("--clip", type=float, nargs="+", default=None,
                        help=f"clip bounds (default: the demo's {DEMO_CLIP} and a tight one)")
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG here")
    args = parser.parse_args()
    cases = args.cases or (8 if args.quick else 16)
    held_out = args.held_out or (4 if args.quick else 16)
    draws = args.draws or (5 if args.quick else 20)
    logreg = load_logreg()
    with tempfile.TemporaryDirectory(prefix="bench-privacy-") as tmp:
        console.print(f"generating {len(SPOKES)} sites of {cases} + {held_out} cases...")
        root = make_cohorts(Path(tmp), cases=cases, held_out=held_out)
        sites = [logreg.cohort_data(root / f"site{n}") for n in range(len(SPOKES))]
        tests = [logreg.cohort_data(root / f"test{n}") for n in range(len(SPOKES))]
        algorithm = logreg.NoduleClassifier()
        x, y = logreg.pooled(algorithm, sites)
        x_test, y_test = logreg.pooled(algorithm, tests)
    central = logreg.scores(logreg.train_central(x, y, logreg.central_steps(args.rounds)),
                            x_test, y_test)
    majority = float(max(y_test.mean(), 1 - y_test.mean()))
    rng = np.random.default_rng(2024)
    _, norms = federated(algorithm, sites, args.rounds, DEMO_CLIP, 1e-6, rng)
    tight = float(np.median(norms))
    clips = args.clip or [DEMO_CLIP, round(tight, 2)]
    settings = [("demo", DEMO_Z)] + [(f"~{t:g}", noise_for(t, args.rounds, DELTA))
                                      for t in TARGETS]
    console.print(f"{args.rounds} rounds, {len(SPOKES)} sites, delta {DELTA}; update norms "
                  f"(no noise) median {tight:.3f}, max {max(norms):.3f}; {draws} noise draws "
                  "per setting; numerics in process with the spoke's and hub's functions "
                  "(protect_weighted, SecAgg+ masking and unmasking, dequantise_sum)",
                  highlight=False)
    table = Table("C", "setting", "z", "epsilon", "accuracy fed.", "sd", "accuracy central",
                  "fed./central", "loss fed.", "loss central",
                  title="Held-out accuracy, federated (SecAgg+, local DP) against centralised")
    rows = []
    for clip in clips:
        for label, z in settings:
            eps = epsilon_after(args.rounds, z, DELTA)
            runs = [federated(algorithm, sites, args.rounds, clip, z, rng)[0] for _ in range(draws)]
            got = [logreg.scores(model, x_test, y_test) for model in runs]
            acc = [g["accuracy"] for g in got]
            loss = [g["loss"] for g in got]
            rows.append({"clip": clip, "label": label, "z": z, "epsilon": eps,
                         "accuracy": statistics.mean(acc), "sd": statistics.pstdev(acc),
                         "loss": statistics.median(loss)})
            table.add_row(f"{clip:g}", label, f"{z:.4g}", f"{eps:.3g}",
                          f"{statistics.mean(acc):.3f}", f"{statistics.pstdev(acc):.3f}",
                          f"{central['accuracy']:.3f}",
                          f"{statistics.mean(acc) / central['accuracy']:.2f}x",
                          f"{statistics.median(loss):.3f}", f"{central['loss']:.3f}")
    console.print(table)
    console.print("accuracy fed.: mean over the draws (sd: their spread); loss fed.: median. "
                  f"Held out: {len(y_test)} cases, {int(y_test.sum())} with a nodule: always "
                  f"answering the majority class scores {majority:.3f}.",
                  highlight=False)
    for clip in clips:
        mine = [r for r in rows if r["clip"] == clip and r["label"] != "demo"]
        print(f"privacy (C={clip:g}): accuracy "
              + ", ".join(f"{r['accuracy']:.2f} at eps {r['epsilon']:.3g}" for r in mine)
              + f"; centralised {central['accuracy']:.2f}, majority class {majority:.2f}")
    if args.plot:
        plot(rows, central["accuracy"], majority, args.plot)
        console.print(f"plot written to {args.plot}")


def plot(rows: list[dict[str, Any]], central: float, majority: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for clip in sorted({r["clip"] for r in rows}):
        mine = sorted((r for r in rows if r["clip"] == clip), key=lambda r: r["epsilon"])
        ax.errorbar([r["epsilon"] for r in mine], [r["accuracy"] for r in mine],
                    yerr=[r["sd"] for r in mine], marker="o", capsize=3,
                    label=f"federated, C={clip:g}")
    ax.axhline(central, color="black", linestyle="--", label="centralised")
    ax.axhline(majority, color="grey", linestyle=":", label="majority class")
    ax.set(xscale="log", xlabel=f"epsilon (delta {DELTA})", ylabel="held-out accuracy",
           title="Federated logistic regression: accuracy against privacy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
