"""Costs of the cohort features per item as a study grows, in process with the real code
(no broker: the bench carries the sealed bytes between the parties, as tests/unit/test_psi.py
does; real keys, real cryptography, real journals and the hub's real database):

1. Private set intersection: each spoke's ``PsiParty`` on its own journal (identifiers read
   from its attributes file, pseudonym key, linking table), the hub's real ingest and relay
   checks (``ingest_batch``, ``services.psi``) on a SQLite database; two and three spokes,
   intersection mode, at the e2e tests' size (35 identifiers a site), 10x, 100x and the
   largest a relayed message holds. Per party: CPU time per identifier; per sender: the
   bytes relayed through the hub per identifier. Baseline, alternated with it in the same
   run: a plain SHA-256 hash join of the same identifiers (each site hashes its own, the
   leader intersects the digests), what a PSI replaces.
2. Vertical training: one round (share, cross, decrypt, apply) of Paillier-protected
   logistic regression (``vertical_lr.Party``) per party, as the spoke runs it (the party
   rebuilt from its sealed state at each stage, the state loaded from and saved to the
   spoke's real ``VerticalDesk``), at n and 10n linked rows and two feature counts: CPU per
   row per round per party and the bytes each sends. Baseline: ``vertical_lr.central``, the
   same gradient descent on the pooled columns, on the same data; the final models'
   largest coefficient difference and their agreement on predictions.
3. Catalog: the disclosure control (``cell_suppression.protect``: primary, then
   complementary suppression checked by linear programs through SciPy's HiGHS) on random
   tables with the demo's number of cells (3 modalities x 4 body parts) up to 30x, with the
   number of LPs it solved. Baseline: primary suppression alone, the same tables.

CPU time is this process's (one thread: each party's share is timed around its own calls);
wall time is printed beside it, with the load average: the machine may be shared. Each
figure is the median of ``--repeats`` runs, the variants alternating.

    .venv/bin/python bench/bench_cohorts.py            # full sizes, 2048-bit Paillier keys
    .venv/bin/python bench/bench_cohorts.py --quick    # small sizes, 1024-bit keys, seconds

The last line reads ``cohorts: PSI <x> CPU/identifier 10x/1x, vertical <y> CPU/row 10x/1x,
catalog <z> time/cell 10x/1x`` (flat is 1.0).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import os
import random
import secrets
import shutil
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
from sqlmodel import Session, select

from tributary.hub.db import make_engine
from tributary.hub.models import PsiRelayRecord, PsiRun, Spoke, SpokeKey
from tributary.hub.services import psi as hub_psi
from tributary.hub.services.ingest import ingest_batch
from tributary.protocol.auditlog import AuditLog
from tributary.protocol.cohorts import vertical as vmsg
from tributary.protocol.cohorts import vertical_lr as lr
from tributary.protocol.cohorts.psi import MAX_PAYLOAD_CHARS
from tributary.protocol.signing import PublicKey, SigningKey
from tributary.protocol.wire import open_from_spoke
from tributary.spoke import cell_suppression, psi_crypto
from tributary.spoke.config import SpokeConfig
from tributary.spoke.custody import outgoing
from tributary.spoke.journal import Journal
from tributary.spoke.psi_party import PsiParty
from tributary.spoke.vertical_desk import StudyState, VerticalDesk

HUB = "hub"
#: Largest |vertical - central| of a coefficient: fixed-point rounding (2^-24 a value),
#: as tests/unit/test_vertical_lr.py allows.
TOLERANCE = 1e-5
SITES = ["site-a", "site-b", "site-c"]


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min), {os.cpu_count()} CPUs"


class Clock:
    """CPU and wall seconds per party, each timed around that party's own calls."""

    def __init__(self) -> None:
        self.cpu: dict[str, float] = defaultdict(float)
        self.wall: dict[str, float] = defaultdict(float)

    @contextmanager
    def of(self, party: str) -> Iterator[None]:
        cpu, wall = time.process_time(), time.perf_counter()
        try:
            yield
        finally:
            self.cpu[party] += time.process_time() - cpu
            self.wall[party] += time.perf_counter() - wall


def median_of(samples: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(s[k] for s in samples) for k in samples[0]}


def alternate(variants: dict[str, Callable[[], dict[str, float]]], repeats: int
              ) -> dict[str, dict[str, float]]:
    """Each variant once per repeat, the order rotating; the median of every figure."""
    names = list(variants)
    got: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            got[name].append(variants[name]())
    return {n: median_of(s) for n, s in got.items()}


# --- 1. private set intersection --------------------------------------------------------

def holdings(n: int, sites: list[str]) -> dict[str, list[str]]:
    """``n`` agreed identifiers a site; each next site's shifted by a third of ``n``, so two
    sites share 2n/3 and three share n/3."""
    return {s: [f"C-{i:09d}" for i in range(j * n // 3, j * n // 3 + n)]
            for j, s in enumerate(sites)}


class PsiSite:
    """One spoke's PSI side on its own journal, wired as the agent wires it."""

    def __init__(self, root: Path, spoke: str, identifiers: list[str]) -> None:
        data = root / spoke / "data"
        data.mkdir(parents=True)
        rows = [f"MRN-{spoke}-{i},{c}" for i, c in enumerate(identifiers)]
        (data / "attributes.csv").write_text("patient_id,consortium_id\n"
                                             + "\n".join(rows) + "\n")
        self.config = SpokeConfig.model_validate({
            "spoke_id": spoke, "data_dir": str(data), "work_dir": str(root / spoke / "work"),
            "hub_public_key": str(root / "hub.pub"),
            "policy": {"attributes_file": str(data / "attributes.csv")},
            "counts": {"min_cell": 5},
            "cohorts": {"link_identifier": "consortium_id", "approve_psi": False}})
        self.key = SigningKey.generate()
        self.journal = Journal(self.config.work_dir / "journal.db")
        log = AuditLog(self.config.work_dir / "audit.jsonl")

        def audit(action: str, target: str = "", actor: str | None = None,
                  **detail: Any) -> None:
            log.append(actor or spoke, action, target, detail)

        self.party = PsiParty(self.config, self.journal, self.key,
                              lambda m: outgoing(m, self.key), audit, lambda: None)

    def outbox(self) -> list[Any]:
        rows = self.journal.outbox_pending(1000)
        for row in rows:
            self.journal.mark_sent(row.seq)
        return rows


@dataclass
class PsiSample:
    cpu: dict[str, float]
    wall: dict[str, float]
    sent: dict[str, int]
    result: str
    failure: str | None = None
    extra: dict[str, float] = field(default_factory=dict)


def psi_run(root: Path, ids: dict[str, list[str]]) -> PsiSample:
    """One intersection-mode PSI among the sites of ``ids`` (the first leads), carried to
    the end; CPU and wall per party (the hub's ingest and forwarding as ``hub``), bytes
    each spoke relayed, the result the hub shows."""
    clock = Clock()
    engine = make_engine(f"sqlite:///{root / 'hub.db'}")
    sites: dict[str, PsiSite] = {}
    with Session(engine) as session:
        for spoke, identifiers in ids.items():
            with clock.of(spoke):
                sites[spoke] = PsiSite(root, spoke, identifiers)
            session.add(Spoke(id=spoke, name=spoke))
            session.flush()
            session.add(SpokeKey(keyid=sites[spoke].key.keyid, spoke_id=spoke,
                                 public_key_pem=sites[spoke].key.public.pem))
        session.commit()
    keys = {s.key.keyid: (name, s.key.public) for name, s in sites.items()}

    def resolve(keyid: str) -> tuple[str, PublicKey] | None:
        return keys.get(keyid)

    with Session(engine) as session, clock.of(HUB):
        run = hub_psi.create(session, "intersection", list(ids), "bench", "coordinator",
                             timedelta(hours=1))
        requests = {s: hub_psi.request_message(session, run, s) for s in ids}
        psi_id = run.id
    for spoke, request in requests.items():
        with clock.of(spoke):
            sites[spoke].party.take_request(request)
    for _ in range(50):
        moved = False
        for spoke, site in sites.items():
            with clock.of(spoke):
                rows = site.outbox()
            if rows:
                with clock.of(HUB), Session(engine) as session:
                    ingest_batch(session, [open_from_spoke(r.body, resolve)[0] for r in rows])
                moved = True
        with Session(engine) as session:
            for record in hub_psi.pending_forwards(session):
                with clock.of(HUB):
                    forward = hub_psi.forward_message(record)
                with clock.of(forward.spoke_id):
                    sites[forward.spoke_id].party.take_forward(forward)
                with clock.of(HUB):
                    hub_psi.forwarded_now(session, record, forward)
                moved = True
            session.commit()
        for spoke, site in sites.items():
            with clock.of(spoke):
                moved = bool(site.party.work()) or moved
        if not moved:
            break
    with Session(engine) as session:
        run = session.get(PsiRun, psi_id)
        assert run is not None
        read = hub_psi.read(session, run)
        sent: dict[str, int] = defaultdict(int)
        largest = 0
        for record in session.exec(select(PsiRelayRecord)):
            sent[record.from_spoke] += record.size
            largest = max(largest, record.size)
    failure = next((s.reason for s in read.spokes if s.reason), None)
    for site in sites.values():
        site.journal.close()
    engine.dispose()
    return PsiSample(dict(clock.cpu), dict(clock.wall), dict(sent), read.result_text,
                     failure if read.state != "done" else None, {"largest": float(largest)})


def hash_join(ids: dict[str, list[str]]) -> PsiSample:
    """The baseline: each site sends SHA-256 digests of its identifiers, the leader
    intersects them (no protection at all: a digest of an identifier is the identifier)."""
    clock = Clock()
    digests: dict[str, list[bytes]] = {}
    for spoke, identifiers in ids.items():
        with clock.of(spoke):
            digests[spoke] = [hashlib.sha256(i.encode()).digest() for i in identifiers]
    leader = next(iter(ids))
    with clock.of(leader):
        shared = set(digests[leader])
        for spoke, mine in digests.items():
            if spoke != leader:
                shared &= set(mine)
    return PsiSample(dict(clock.cpu), dict(clock.wall),
                     {s: 32 * len(d) for s, d in digests.items() if s != leader},
                     str(len(shared)))


def psi_bench(sizes: list[int], parties: list[int], repeats: int) -> dict[tuple[int, int], Any]:
    results: dict[tuple[int, int], Any] = {}
    for count in parties:
        for n in sizes:
            ids = holdings(n, SITES[:count])

            def psi(ids: dict[str, list[str]] = ids) -> dict[str, float]:
                root = Path(tempfile.mkdtemp(prefix="bench-psi-"))
                try:
                    (root / "hub.pub").write_text("unused\n")
                    sample = psi_run(root, ids)
                finally:
                    shutil.rmtree(root, ignore_errors=True)
                if sample.failure:
                    raise PsiFailed(sample.failure)
                return flat(sample)

            def join(ids: dict[str, list[str]] = ids) -> dict[str, float]:
                return flat(hash_join(ids))

            try:
                got = alternate({"psi": psi, "join": join}, repeats)
            except PsiFailed as exc:
                results[(count, n)] = str(exc)
                print(f"  PSI {count} spokes, {n} identifiers a site: failed: {exc}", flush=True)
                continue
            if got["psi"]["size"] != got["join"]["size"]:
                raise SystemExit(f"the PSI linked {got['psi']['size']} patients, the hash "
                                 f"join finds {got['join']['size']}")
            results[(count, n)] = got
            print(f"  PSI {count} spokes, {n:>6} identifiers a site: "
                  f"{1e6 * got['psi']['cpu:leader'] / n:8.1f} us CPU/identifier at the leader, "
                  f"hash join {1e6 * got['join']['cpu:leader'] / n:.2f} us", flush=True)
    return results


class PsiFailed(RuntimeError):
    pass


def flat(sample: PsiSample) -> dict[str, float]:
    """A sample's figures by role: leader (the first site), partner (the mean of the
    others), hub; bytes sent by a partner (mean) and by the leader."""
    spokes = [s for s in sample.cpu if s != HUB]
    leader, partners = spokes[0], spokes[1:]
    out = {"cpu:leader": sample.cpu[leader], "wall:leader": sample.wall[leader],
           "cpu:partner": statistics.mean(sample.cpu[p] for p in partners),
           "wall:partner": statistics.mean(sample.wall[p] for p in partners),
           "cpu:hub": sample.cpu.get(HUB, 0.0), "wall:hub": sample.wall.get(HUB, 0.0),
           "bytes:leader": float(sample.sent.get(leader, 0)),
           "bytes:partner": statistics.mean(float(sample.sent.get(p, 0)) for p in partners),
           "size": float("".join(c for c in sample.result if c.isdigit()) or "nan")}
    return out


def psi_table(results: dict[tuple[int, int], Any], base: int) -> float | None:
    """Per-identifier figures and their ratio to the smallest size of the same number of
    spokes; returns the leader's CPU ratio at 10x the base (for the summary)."""
    print(f"\nPrivate set intersection, intersection mode ({load()} when printed)")
    print("  per identifier of a site: CPU us (wall us) per party, bytes relayed by each "
          "sender; ratio: CPU per identifier against the smallest size")
    print(f"  {'spokes':>6} {'ids/site':>8} {'leader':>15} {'partner':>15} {'hub':>13} "
          f"{'B leader':>9} {'B partner':>9} {'join us':>8} {'psi/join':>9} {'ratio':>6}")
    summary = None
    for (count, n), got in sorted(results.items()):
        if isinstance(got, str):
            print(f"  {count:>6} {n:>8} failed: {got[:90]}")
            continue
        psi, join = got["psi"], got["join"]
        first = results.get((count, base))
        per = psi["cpu:leader"] / n
        ratio = per / (first["psi"]["cpu:leader"] / base) if isinstance(first, dict) else math.nan
        if n == 10 * base and count == 2:
            summary = ratio
        join_per = join["cpu:leader"] / n
        print(f"  {count:>6} {n:>8} "
              f"{1e6 * per:>7.0f} ({1e6 * psi['wall:leader'] / n:>5.0f}) "
              f"{1e6 * psi['cpu:partner'] / n:>7.0f} ({1e6 * psi['wall:partner'] / n:>5.0f}) "
              f"{1e6 * psi['cpu:hub'] / n:>6.0f} ({1e6 * psi['wall:hub'] / n:>4.0f}) "
              f"{psi['bytes:leader'] / n:>9.0f} {psi['bytes:partner'] / n:>9.0f} "
              f"{1e6 * join_per:>8.2f} {per / join_per:>9.0f} {ratio:>6.2f}")
    return summary


def response_chars(n: int) -> int:
    """Characters of the relayed ``response`` for two sites of ``n`` identifiers each: the
    largest payload of a PSI (the partner's blinded setup and its response to the leader's
    request, base64 inside JSON, encrypted, base64 again)."""
    items = [f"C-{i:09d}" for i in range(n)]
    _, request = psi_crypto.client_request(items, True)
    answer = psi_crypto.server_answer(items, request, True)
    return len(psi_crypto.encrypt(os.urandom(32), answer, "p", "a", "b", "response"))


def psi_limit(run_it: bool) -> dict[str, Any]:
    """The largest sites a relayed message holds, from the response's size per identifier;
    with ``run_it``, a PSI of two sites just under it (it must finish) and one just over it
    (it must fail at the spoke, with the reason, before anything too large is sent)."""
    per = response_chars(2000) / 2000
    limit = int(MAX_PAYLOAD_CHARS / per)
    out: dict[str, Any] = {"per": per, "limit": limit}
    print(f"  relay limit {MAX_PAYLOAD_CHARS:,} characters: {per:.1f} characters of response "
          f"per identifier, so two sites of up to about {limit:,}", flush=True)
    if run_it:
        for label, n in (("under", int(limit * 0.97)), ("over", int(limit * 1.03))):
            # n identifiers a site, half of them shared
            ids = {s: v[:n] for s, v in holdings(3 * n // 2, SITES[:2]).items()}
            root = Path(tempfile.mkdtemp(prefix="bench-psi-limit-"))
            try:
                (root / "hub.pub").write_text("unused\n")
                sample = psi_run(root, ids)
            finally:
                shutil.rmtree(root, ignore_errors=True)
            out[label] = (n, sample)
            print(f"  PSI of two sites of {n:,}: "
                  + (f"failed: {sample.failure}" if sample.failure else
                     f"{sample.result}, leader {sample.cpu['site-a']:.1f} s CPU, "
                     f"partner {sample.cpu['site-b']:.1f} s, hub {sample.cpu[HUB]:.1f} s, "
                     f"largest relay {sample.extra.get('largest', 0):,.0f} characters"),
                  flush=True)
    return out


# --- 2. vertical training ---------------------------------------------------------------

def vertical_data(n: int, p_a: int, p_b: int, seed: int = 3
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    imaging = rng.normal(size=(n, p_a)) * rng.uniform(0.5, 10, p_a) + rng.uniform(-5, 50, p_a)
    clinical = rng.normal(size=(n, p_b)) * rng.uniform(0.5, 12, p_b) + rng.uniform(0, 60, p_b)
    z = ((imaging - imaging.mean(0)) / imaging.std(0)) @ rng.uniform(-1.2, 1.2, p_a) \
        + ((clinical - clinical.mean(0)) / clinical.std(0)) @ rng.uniform(-1, 1, p_b) + 0.3
    y = np.where(rng.random(n) < 1 / (1 + np.exp(-z)), 1.0, -1.0)
    return imaging, clinical, y


@dataclass
class VerticalSpoke:
    """A party as the spoke holds it: the state sealed in its desk, rebuilt at each stage."""

    role: str
    desk: VerticalDesk
    invite: vmsg.Invite
    l2: float
    rate: float

    def party(self) -> tuple[lr.Party, StudyState]:
        study = self.desk.load(self.invite.study_id)
        assert study is not None
        z, _, _ = lr.standardise(np.asarray(study.columns))
        if self.role == "label":
            z = np.hstack([z, np.ones((z.shape[0], 1))])
        y = None if study.y is None else np.asarray(study.y)
        return lr.Party(study.party, z, y, self.l2, self.rate), study

    def save(self, study: StudyState) -> None:
        self.desk.save(self.invite.study_id, study)


def vertical_spoke(root: Path, role: str, columns: np.ndarray, y: np.ndarray | None,
                   keypair: Any, rate: float, l2: float) -> VerticalSpoke:
    names = [f"{role[0]}{i}" for i in range(columns.shape[1])]
    invite = vmsg.Invite(study_id="vs-bench", spoke_id=f"{role}-site", psi_id="psi-bench",
                         role=role, attributes=names, label="y" if role == "label" else None,
                         positive=1.0 if role == "label" else None, peer="peer-site")
    desk = VerticalDesk(root / f"{role}.sqlite", secrets.token_bytes(32))
    desk.hold(invite)
    state, _ = lr.new_party(role, names, columns, 1024, keypair)
    desk.set_state(invite.study_id, "accepted", study=StudyState(
        party=state, columns=columns.tolist(), y=None if y is None else list(y)))
    return VerticalSpoke(role, desk, invite, l2, rate)


def vertical_rounds(n: int, p_a: int, p_b: int, rounds: int, keys: dict[str, Any]
                    ) -> dict[str, float]:
    """``rounds`` rounds of vertical training on ``n`` rows; CPU/wall per party, bytes each
    sends (ciphertext objects, masked values, loss), the central baseline's CPU, and the
    final models' agreement."""
    rate, l2 = 0.5, 0.01
    imaging, clinical, y = vertical_data(n, p_a, p_b)
    root = Path(tempfile.mkdtemp(prefix="bench-vertical-"))
    clock = Clock()
    sent: dict[str, int] = defaultdict(int)
    try:
        a = vertical_spoke(root, "features", imaging, None, keys["features"], rate, l2)
        b = vertical_spoke(root, "label", clinical, y, keys["label"], rate, l2)
        pub = {"features": keys["features"][0], "label": keys["label"][0]}
        for _ in range(rounds):
            shares = {}
            for s in (a, b):
                with clock.of(s.role):
                    party, study = s.party()
                    shares[s.role] = party.share()
                    s.save(study)
                sent[s.role] += len(shares[s.role])
            crosses = {}
            for s, peer in ((a, "label"), (b, "features")):
                with clock.of(s.role):
                    party, study = s.party()
                    crosses[s.role] = party.cross(pub[peer], shares[peer])
                    s.save(study)
                sent[s.role] += len(crosses[s.role])
            decrypted: dict[str, list[int]] = {}
            for s, peer, width in ((b, "features", p_a), (a, "label", p_b + 1)):
                with clock.of(s.role):
                    party, study = s.party()
                    values, loss = party.decrypt(crosses[peer], width)
                    s.save(study)
                decrypted[peer] = values
                sent[s.role] += sum(len(str(v)) for v in values) + (8 if loss else 0)
            for s in (a, b):
                with clock.of(s.role):
                    party, study = s.party()
                    party.apply(decrypted[s.role])
                    s.save(study)
        w_a = np.asarray(a.party()[0].state.weights)
        w_b = np.asarray(b.party()[0].state.weights)
        z_a, _, _ = lr.standardise(imaging)
        z_b, _, _ = lr.standardise(clinical)
        z_b = np.hstack([z_b, np.ones((n, 1))])
        with clock.of("central"):
            c_a, c_b, _ = lr.central(z_a, z_b, y, rounds, rate, l2)
        a.desk.close()
        b.desk.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    diff = float(max(np.max(np.abs(w_a - c_a)), np.max(np.abs(w_b - c_b))))
    agree = float(np.mean(np.sign(z_a @ w_a + z_b @ w_b) == np.sign(z_a @ c_a + z_b @ c_b)))
    return {"cpu:features": clock.cpu["features"] / rounds,
            "wall:features": clock.wall["features"] / rounds,
            "cpu:label": clock.cpu["label"] / rounds, "wall:label": clock.wall["label"] / rounds,
            "cpu:central": clock.cpu["central"] / rounds,
            "bytes:features": sent["features"] / rounds, "bytes:label": sent["label"] / rounds,
            "diff": diff, "agree": agree}


def vertical_bench(rows: list[int], widths: list[tuple[int, int]], rounds: int, bits: int,
                   repeats: int) -> dict[tuple[int, int, int], dict[str, float]]:
    start = time.process_time()
    keys = {"features": lr.new_keypair(bits), "label": lr.new_keypair(bits)}
    print(f"  two {bits}-bit Paillier key pairs: {time.process_time() - start:.2f} s CPU "
          "(once a study per party)", flush=True)
    results = {}
    for p_a, p_b in widths:
        for n in rows:
            got = median_of([vertical_rounds(n, p_a, p_b, rounds, keys)
                             for _ in range(repeats)])
            if got["diff"] > TOLERANCE:
                raise SystemExit(f"the vertical model is {got['diff']:.2g} away from the "
                                 f"central one (more than {TOLERANCE})")
            results[(n, p_a, p_b)] = got
            print(f"  vertical {n:>5} rows, {p_a}+{p_b} features: "
                  f"{1e3 * got['cpu:features'] / n:.2f} ms CPU/row/round (features), "
                  f"{1e3 * got['cpu:label'] / n:.2f} (label)", flush=True)
    return results


def vertical_table(results: dict[tuple[int, int, int], dict[str, float]], bits: int,
                   rounds: int) -> float | None:
    print(f"\nVertical training, {bits}-bit Paillier, {rounds} round(s) ({load()} when printed)")
    print("  per linked row and round: CPU ms (wall ms) per party, bytes each sends; "
          "central: the same descent in clear; ratio: CPU per row against the smallest n")
    print(f"  {'rows':>6} {'p_A+p_B':>7} {'features':>15} {'label':>15} {'B feat':>7} "
          f"{'B label':>7} {'central us':>10} {'x central':>9} {'max |dw|':>9} {'agree':>6} "
          f"{'ratio':>6}")
    summary = None
    smallest = min(n for n, _, _ in results)
    for (n, p_a, p_b), got in sorted(results.items(), key=lambda i: (i[0][1], i[0][0])):
        both = got["cpu:features"] + got["cpu:label"]
        first = results[(smallest, p_a, p_b)]
        ratio = (both / n) / ((first["cpu:features"] + first["cpu:label"]) / smallest)
        if n == 10 * smallest and summary is None:
            summary = ratio
        print(f"  {n:>6} {f'{p_a}+{p_b}':>7} "
              f"{1e3 * got['cpu:features'] / n:>7.2f} ({1e3 * got['wall:features'] / n:>5.2f}) "
              f"{1e3 * got['cpu:label'] / n:>7.2f} ({1e3 * got['wall:label'] / n:>5.2f}) "
              f"{got['bytes:features'] / n:>7.0f} {got['bytes:label'] / n:>7.0f} "
              f"{1e6 * got['cpu:central'] / n:>10.2f} {both / max(got['cpu:central'], 1e-9):>9.0f} "
              f"{got['diff']:>9.1e} {got['agree']:>6.3f} {ratio:>6.2f}")
    return summary


# --- 3. catalog disclosure control ------------------------------------------------------

def random_table(modalities: int, parts: int, seed: int) -> cell_suppression.CaseTable:
    """A site's table: cases spread unevenly over ``modalities`` x ``parts`` (a few large
    cells, many small ones), some cases in two cells."""
    rng = random.Random(seed)
    mods = [f"M{i:02d}" for i in range(modalities)]
    body = [f"B{i:02d}" for i in range(parts)]
    weights = [[rng.paretovariate(1.2) for _ in body] for _ in mods]
    flat_cells = [(m, b) for m in mods for b in body]
    flat_w = [weights[i][j] for i in range(modalities) for j in range(parts)]
    cases = []
    for _ in range(6 * modalities * parts):
        combos = {rng.choices(flat_cells, flat_w)[0]}
        if rng.random() < 0.1:
            combos.add(rng.choices(flat_cells, flat_w)[0])
        cases.append(combos)
    return cell_suppression.case_table(cases)


def catalog_bench(shapes: list[tuple[int, int]], repeats: int, k: int = 5
                  ) -> dict[tuple[int, int], dict[str, float]]:
    results = {}
    real = cell_suppression.lower_bound
    calls = [0]

    def counted(*args: Any, **kwargs: Any) -> float:
        calls[0] += 1
        return real(*args, **kwargs)

    cell_suppression.lower_bound = counted  # counts the LPs; each is still solved
    try:
        for m, b in shapes:
            samples = []
            for r in range(repeats):
                table = random_table(m, b, seed=1000 * m + b + r)  # fresh: protect caches
                values = table.entries()
                cpu, wall = time.process_time(), time.perf_counter()
                primary = {key for key, v in values.items() if 0 < v < k}
                published_primary = {key: v for key, v in values.items() if v >= k}
                base_cpu = time.process_time() - cpu
                calls[0] = 0
                cpu, wall = time.process_time(), time.perf_counter()
                published = cell_suppression.protect(table, k)
                samples.append({"cpu": time.process_time() - cpu,
                                "wall": time.perf_counter() - wall, "lps": float(calls[0]),
                                "primary": float(len(primary)),
                                "complementary": float(len(published_primary) - len(published)),
                                "entries": float(len(values)), "base": base_cpu})
            got = median_of(samples)
            results[(m, b)] = got
            print(f"  catalog {m}x{b}: {got['cpu']:.3f} s CPU, {got['lps']:.0f} LPs", flush=True)
    finally:
        cell_suppression.lower_bound = real
    return results


def catalog_table(results: dict[tuple[int, int], dict[str, float]]) -> float | None:
    print(f"\nCatalog disclosure control, k=5 ({load()} when printed)")
    print("  entries: cells, margins and total; per entry: CPU ms; ratio: per entry against "
          "the smallest table")
    print(f"  {'table':>7} {'entries':>7} {'primary':>7} {'compl.':>6} {'LPs':>5} "
          f"{'CPU s':>7} {'wall s':>7} {'ms/LP':>6} {'ms/entry':>8} {'primary-only us':>15} "
          f"{'ratio':>6}")
    first = results[min(results, key=lambda s: s[0] * s[1])]
    base = first["cpu"] / first["entries"]
    summary = None
    smallest = min(m * b for m, b in results)
    for (m, b), got in sorted(results.items(), key=lambda i: i[0][0] * i[0][1]):
        per = got["cpu"] / got["entries"]
        if m * b == 10 * smallest:
            summary = per / base
        print(f"  {f'{m}x{b}':>7} {got['entries']:>7.0f} {got['primary']:>7.0f} "
              f"{got['complementary']:>6.0f} {got['lps']:>5.0f} {got['cpu']:>7.3f} "
              f"{got['wall']:>7.3f} {1e3 * got['cpu'] / max(got['lps'], 1):>6.2f} "
              f"{1e3 * per:>8.3f} {1e6 * got['base']:>15.1f} {per / base:>6.2f}")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="small sizes, 1024-bit keys, one repeat")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--only", choices=["psi", "vertical", "catalog"], nargs="+",
                        default=["psi", "vertical", "catalog"])
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    repeats = args.repeats or (1 if args.quick else 3)
    psi_base = 35  # the e2e tests' sites hold 30-35 identifiers
    psi_sizes = [psi_base, 10 * psi_base] if args.quick else [psi_base, 350, 3500]
    rows = [40, 400] if args.quick else [100, 1000]
    widths = [(3, 2)] if args.quick else [(3, 2), (12, 8)]
    rounds = 1 if args.quick else 2
    bits = 1024 if args.quick else 2048
    shapes = [(3, 4), (6, 20)] if args.quick else [(3, 4), (6, 20), (12, 30)]
    print(f"cohort benchmarks: {load()}; medians of {repeats} run(s), variants alternating",
          flush=True)
    psi_ratio = vertical_ratio = catalog_ratio = None
    if "psi" in args.only:
        results = psi_bench(psi_sizes, [2, 3], repeats)
        psi_ratio = psi_table(results, psi_base)
        psi_limit(run_it=not args.quick)
    if "vertical" in args.only:
        results_v = vertical_bench(rows, widths, rounds, bits, repeats)
        vertical_ratio = vertical_table(results_v, bits, rounds)
    if "catalog" in args.only:
        results_c = catalog_bench(shapes, repeats)
        catalog_ratio = catalog_table(results_c)

    def show(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.2f}"

    print(f"cohorts: PSI {show(psi_ratio)} CPU/identifier 10x/1x, vertical "
          f"{show(vertical_ratio)} CPU/row 10x/1x, catalog {show(catalog_ratio)} "
          "time/cell 10x/1x")


if __name__ == "__main__":
    main()
