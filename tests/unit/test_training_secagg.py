"""SecAgg+ (tributary.protocol.training.secagg): the hub gets the sum and only the sum."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from tributary.protocol.training import secagg as sa
from tributary.protocol.training import update as up

D = 2_000


def _protected(n: int, seed: int = 7) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray],
                                               up.Quantisation]:
    """Per client: the clipped+noised float vector and its quantised form."""
    clip, z = 1.0, 0.8
    q = up.Quantisation(bits=32, coordinate_range=up.coordinate_range_for(clip, z * clip),
                        max_summands=n)
    floats, ints = {}, {}
    for i in range(n):
        rng = np.random.default_rng(seed + i)
        update = {"w": rng.normal(size=(D - 10,)).astype(np.float32),
                  "b": rng.normal(size=(10,)).astype(np.float32)}
        vector = up.flatten(update, up.schema_of(update))
        clipped, _ = up.clip_l2(vector, clip)
        noised = up.add_gaussian_noise(clipped, z * clip, rng)
        quantised, out = up.quantise(noised, q, rng)
        assert out == 0
        floats[f"s{i:02d}"], ints[f"s{i:02d}"] = noised, quantised
    return floats, ints, q


class Round:
    """A round run in-process, each party reloaded from its JSON state between stages
    (what the orchestration does across restarts)."""

    def __init__(self, n: int, degree: int | None = None) -> None:
        self.floats, self.ints, self.q = _protected(n)
        self.config = sa.make_round_config("study-1/round-3", list(self.ints), bits=32,
                                           vector_length=D, degree=degree)
        self.server = sa.SecAggServer.start(self.config)
        self.clients: dict[str, sa.SecAggClient] = {}
        self.vectors: dict[str, np.ndarray] = {}
        for p in self.config.participants:
            client, advert = sa.SecAggClient.start(self.config, p)
            self.clients[p] = client
            self.server.receive_keys(advert)
        self.server.close_keys()
        for p, c in self.clients.items():
            self.server.receive_shares(c.share_keys(self.server.keys_for(p)))
        self.server.close_shares()
        for p in self.clients:
            self.client(p).receive_shares(self.server.shares_for(p))
        self.reload()

    def client(self, p: str) -> sa.SecAggClient:
        return self.clients[p]

    def reload(self) -> None:
        self.server = sa.SecAggServer(
            sa.ServerState.model_validate_json(self.server.state.model_dump_json()))
        self.clients = {p: sa.SecAggClient(sa.ClientState.model_validate_json(
            c.state.model_dump_json())) for p, c in self.clients.items()}

    def mask(self, skip: set[str] = frozenset()) -> list[sa.ConsistencyRequest]:
        for p, c in self.clients.items():
            if p in skip:
                continue
            message, y = c.mask(self.ints[p])
            self.vectors[p] = sa.vector_from_bytes(sa.vector_to_bytes(y), 32, D)
            self.server.receive_masked(message)
        self.reload()
        return self.server.close_masking()

    def sign(self, requests: list[sa.ConsistencyRequest],
             skip: set[str] = frozenset()) -> list[sa.UnmaskRequest]:
        for r in requests:
            if r.receiver not in skip:
                self.server.receive_signature(self.client(r.receiver).sign_survivors(r))
        self.reload()
        return self.server.close_consistency()

    def unmask(self, requests: list[sa.UnmaskRequest], skip: set[str] = frozenset()) -> None:
        for r in requests:
            if r.receiver not in skip:
                self.server.receive_unmask(self.client(r.receiver).unmask(r))
        self.reload()

    def check_sum(self, result: sa.AggregateResult) -> None:
        n = len(result.survivors)
        total = up.dequantise_sum(result.total, self.q, n)
        expected = sum(self.floats[p] for p in result.survivors)
        bound = self.q.sum_error_bound(n)
        assert np.max(np.abs(total - expected)) < bound


def test_aggregate_equals_plain_sum_within_quantisation_error() -> None:
    r = Round(5)
    r.unmask(r.sign(r.mask()))
    result = r.server.aggregate(r.vectors.__getitem__)
    assert result.survivors == r.config.participants and result.dropped == ()
    r.check_sum(result)
    # the bound is tight enough to mean something: far below the noise scale
    assert r.q.sum_error_bound(5) < 1e-6


def test_dropout_before_masking_is_recovered() -> None:
    r = Round(5)
    gone = r.config.participants[1]
    r.unmask(r.sign(r.mask(skip={gone})))
    result = r.server.aggregate(r.vectors.__getitem__)
    assert result.dropped == (gone,) and gone not in result.survivors
    r.check_sum(result)


def test_dropout_after_masking_is_recovered() -> None:
    r = Round(5)
    gone = r.config.participants[3]
    r.unmask(r.sign(r.mask()), skip={gone})  # sent its masked input, signed, vanished
    result = r.server.aggregate(r.vectors.__getitem__)
    assert gone in result.survivors
    r.check_sum(result)
    r = Round(5)
    r.unmask(r.sign(r.mask(), skip={gone}))  # sent its masked input, then vanished
    result = r.server.aggregate(r.vectors.__getitem__)
    assert gone in result.survivors
    r.check_sum(result)


def test_secagg_plus_sparse_graph_with_two_dropouts() -> None:
    r = Round(12)
    assert all(len(v) < 11 for v in r.config.neighbours.values())  # not the complete graph
    gone = set(r.config.participants[:2])
    r.unmask(r.sign(r.mask(skip=gone)))
    result = r.server.aggregate(r.vectors.__getitem__)
    assert set(result.dropped) == gone
    r.check_sum(result)


def test_fewer_than_t_fails_safely() -> None:
    r = Round(4)  # complete graph, t = 3
    assert r.config.threshold == 3
    with pytest.raises(sa.SecAggError, match="threshold"):
        r.mask(skip=set(r.config.participants[:2]))
    # enough masked inputs but fewer than t unmask answers: an error, never a wrong sum
    r = Round(4)
    requests = r.sign(r.mask())
    r.unmask(requests, skip=set(r.config.participants[:2]))
    with pytest.raises(sa.SecAggError, match="threshold is 3"):
        r.server.aggregate(r.vectors.__getitem__)
    # too few signers of the survivor list: the round stops before anything is unmasked
    r = Round(4)
    with pytest.raises(sa.SecAggError, match="signed"):
        r.sign(r.mask(), skip=set(r.config.participants[:2]))
    # a client refuses to sign a list with fewer than t survivors
    r = Round(4)
    p = r.config.participants
    r.client(p[0]).mask(r.ints[p[0]])
    request = sa.ConsistencyRequest(round_id=r.config.round_id, receiver=p[0],
                                    survivors=p[:2], dropped=p[2:])
    with pytest.raises(sa.SecAggRefused, match="too few"):
        r.client(p[0]).sign_survivors(request)


def test_hub_cannot_reconstruct_a_single_update() -> None:
    r = Round(5)
    p = r.config.participants
    late = p[4]
    r.unmask(r.sign(r.mask(skip={late})))
    everything = r.server.state.model_dump_json()  # all the hub holds: messages and state
    result = r.server.aggregate(r.vectors.__getitem__)
    r.check_sum(result)
    state = sa.ServerState.model_validate_json(everything)
    cfg = r.config
    for u in result.survivors:
        # the hub rebuilt u's self seed; without its mask key the pairwise masks remain
        seed = sa.SecAggServer(sa.ServerState.model_validate_json(everything)).reconstruct(
            u, sa.Secret.SEED)
        attempt = r.vectors[u].copy()
        up.subtract_mod(attempt, sa.prg(seed, D, 32), 32)
        assert np.count_nonzero(attempt == r.ints[u]) < D // 100
        # and nothing it holds gives u's mask key: no shares of it were ever released
        server = sa.SecAggServer(sa.ServerState.model_validate_json(everything))
        with pytest.raises(sa.SecAggError, match=f"0 shares of {u}'s mask_key"):
            server.reconstruct(u, sa.Secret.MASK_KEY)
    # the late client's masked input arrives after its mask key was rebuilt: its self mask
    # still hides it
    _, y_late = r.client(late).mask(r.ints[late])
    server = sa.SecAggServer(state)
    key = server.reconstruct(late, sa.Secret.MASK_KEY)
    attempt = y_late.copy()
    for u in cfg.neighbours[late]:
        adv = state.keys[u]
        s_uv = sa.pairwise_mask_seed(key, adv.mask_public_key, cfg.round_id, late, u)
        (up.add_mod if late < u else up.subtract_mod)(attempt, sa.prg(s_uv, D, 32), 32)
    assert np.count_nonzero(attempt == r.ints[late]) < D // 100
    fresh = sa.SecAggServer(sa.ServerState.model_validate_json(everything))
    with pytest.raises(sa.SecAggError, match="0 shares"):
        fresh.reconstruct(late, sa.Secret.SEED)  # never released: late was listed dropped
    # the hub cannot read the shares it routed: they are AEAD ciphertexts
    blob = everything.encode()
    for c in r.clients.values():
        assert c.state.self_seed.hex().encode() not in blob
        assert base64.b64encode(c.state.self_seed) not in blob


def test_no_party_releases_both_secrets_of_a_client() -> None:
    r = Round(5)
    p = r.config.participants
    checks = r.mask(skip={p[4]})
    first, second = checks[0], checks[1]
    signature = r.client(first.receiver).sign_survivors(first)
    assert r.client(first.receiver).sign_survivors(first) == signature  # retry: same
    # shown another list, with a survivor now called dropped: refused
    other = first.model_copy(update={"survivors": tuple(x for x in first.survivors if x != p[1]),
                                     "dropped": (p[1], *first.dropped)})
    with pytest.raises(sa.SecAggRefused, match="already signed"):
        r.client(first.receiver).sign_survivors(other)
    with pytest.raises(sa.SecAggRefused, match="both survivor and dropped"):
        r.client(second.receiver).sign_survivors(second.model_copy(
            update={"dropped": tuple(sorted((*second.dropped, p[1])))}))
    with pytest.raises(sa.SecAggRefused, match="not listed a survivor"):
        r.client(second.receiver).sign_survivors(second.model_copy(update={
            "survivors": tuple(x for x in second.survivors if x != second.receiver)}))
    r.server.receive_signature(signature)
    for c in checks[1:]:
        r.server.receive_signature(r.client(c.receiver).sign_survivors(c))
    requests = r.server.close_consistency()
    q = requests[0]
    # unmasking only for the signed list, with enough valid signatures on it
    client = r.client(q.receiver)
    with pytest.raises(sa.SecAggRefused, match="differs"):
        client.unmask(q.model_copy(update={"survivors": other.survivors,
                                           "dropped": other.dropped}))
    few = dict(list(q.signatures.items())[:2])
    with pytest.raises(sa.SecAggRefused, match="valid survivor signatures"):
        client.unmask(q.model_copy(update={"signatures": few}))
    forged = {v: bytes(64) for v in q.signatures}
    with pytest.raises(sa.SecAggRefused, match="valid survivor signatures"):
        client.unmask(q.model_copy(update={"signatures": forged}))
    answer = client.unmask(q)
    assert client.unmask(q) == answer  # a retry gets the same answer
    # the hub refuses to hold a self-seed share of a dropped client ...
    held = r.clients[requests[1].receiver].state.held[p[4]]
    bad = sa.UnmaskResponse(round_id=q.round_id, sender=requests[1].receiver,
                            seed_shares=(held.seed,), mask_key_shares=())
    with pytest.raises(sa.SecAggRefused):
        r.server.receive_unmask(bad)
    # ... and to rebuild a second secret of a client whose first it rebuilt
    for q in requests:
        r.server.receive_unmask(r.client(q.receiver).unmask(q))
    r.server.aggregate(r.vectors.__getitem__)
    with pytest.raises(sa.SecAggRefused, match="never both"):
        r.server.reconstruct(p[0], sa.Secret.MASK_KEY)
    with pytest.raises(sa.SecAggRefused, match="never both"):
        r.server.reconstruct(p[4], sa.Secret.SEED)


def test_hub_cannot_show_clients_different_survivor_lists() -> None:
    """The hub tells a and b that d survived and c that d dropped (to get d's mask key
    shares and its self seed): neither list reaches the 3 signatures of 5 needed."""
    r = Round(5)
    a, b, c, d, e = r.config.participants
    true = r.mask(skip={e})[0]
    told_d_dropped = sa.ConsistencyRequest(round_id=true.round_id, receiver=c,
                                           survivors=(a, b, c), dropped=(d, e))
    sig_c = r.client(c).sign_survivors(told_d_dropped)
    sigs = {}
    for x in (a, b):
        sigs[x] = r.client(x).sign_survivors(true.model_copy(update={"receiver": x})).signature
    with pytest.raises(sa.SecAggRefused, match="not listed a survivor"):
        r.client(d).sign_survivors(told_d_dropped.model_copy(update={"receiver": d}))
    with pytest.raises(sa.SecAggRefused, match="2 valid survivor signatures, 3 needed"):
        r.client(a).unmask(sa.UnmaskRequest(round_id=true.round_id, receiver=a,
                                            survivors=true.survivors, dropped=true.dropped,
                                            signatures=sigs))
    with pytest.raises(sa.SecAggRefused, match="1 valid survivor signatures"):
        r.client(c).unmask(sa.UnmaskRequest(
            round_id=true.round_id, receiver=c, survivors=(a, b, c), dropped=(d, e),
            signatures={c: sig_c.signature, a: sigs[a], b: sigs[b]}))


def test_threshold_must_exceed_half_the_holders() -> None:
    with pytest.raises(ValueError, match="exceed half"):
        sa.make_round_config("r", ["a", "b", "c", "d"], bits=32, vector_length=4, threshold=2)


def test_tampered_share_ciphertexts_are_refused() -> None:
    cfg = sa.make_round_config("r9", ["a", "b", "c"], bits=32, vector_length=8)
    server = sa.SecAggServer.start(cfg)
    clients = {}
    for p in cfg.participants:
        clients[p], advert = sa.SecAggClient.start(cfg, p)
        server.receive_keys(advert)
    server.close_keys()
    for p, c in clients.items():
        server.receive_shares(c.share_keys(server.keys_for(p)))
    server.close_shares()
    delivery = server.shares_for("a")
    item = delivery.shares[0]
    flipped = bytes([item.ciphertext[0] ^ 1]) + item.ciphertext[1:]
    for bad in (
        item.model_copy(update={"ciphertext": flipped}),
        item.model_copy(update={"nonce": bytes(12)}),
    ):
        tampered = delivery.model_copy(update={"shares": (bad, *delivery.shares[1:])})
        with pytest.raises(sa.SecAggRefused, match="fails authentication"):
            sa.SecAggClient(clients["a"].state.model_copy(deep=True)).receive_shares(tampered)
    # b's share for c, re-addressed to a: wrong key and associated data
    stolen = server.shares_for("c").shares[0].model_copy(update={"receiver": "a"})
    readdressed = delivery.model_copy(update={"shares": (stolen,)})
    with pytest.raises(sa.SecAggRefused):
        sa.SecAggClient(clients["a"].state.model_copy(deep=True)).receive_shares(readdressed)
    clients["a"].receive_shares(delivery)  # the genuine delivery is accepted


def test_client_state_sealed_at_rest() -> None:
    cfg = sa.make_round_config("r2", ["a", "b"], bits=32, vector_length=4)
    client, _ = sa.SecAggClient.start(cfg, "a")
    key = bytes(range(32))
    blob = sa.seal_client_state(client.state, key)
    assert client.state.self_seed not in blob
    assert sa.open_client_state(blob, key) == client.state
    with pytest.raises(sa.SecAggRefused):
        sa.open_client_state(blob[:-1] + bytes([blob[-1] ^ 1]), key)


def test_messages_are_canonical_json() -> None:
    cfg = sa.make_round_config("r3", ["b", "a", "c"], bits=32, vector_length=4)
    assert sa.RoundConfig.model_validate_json(cfg.canonical()) == cfg
    _, advert = sa.SecAggClient.start(cfg, "a")
    again = sa.KeyAdvertisement.model_validate_json(advert.canonical())
    assert again == advert and again.canonical() == advert.canonical()


def test_a_lost_share_is_an_error_not_a_wrong_sum() -> None:
    cfg = sa.make_round_config("r4", ["a", "b", "c", "d"], bits=32, vector_length=16)
    server = sa.SecAggServer.start(cfg)
    clients = {}
    for p in cfg.participants:
        clients[p], advert = sa.SecAggClient.start(cfg, p)
        server.receive_keys(advert)
    with pytest.raises(sa.SecAggError, match="still open"):
        server.keys_for("a")
    server.close_keys()
    bundles = {p: c.share_keys(server.keys_for(p)) for p, c in clients.items()}
    short = bundles["a"].model_copy(update={"shares": bundles["a"].shares[1:]})
    with pytest.raises(sa.SecAggError, match="one share per neighbour"):
        server.receive_shares(short)
    for bundle in bundles.values():
        server.receive_shares(bundle)
    server.close_shares()
    delivery = server.shares_for("a")
    clients["a"].receive_shares(delivery.model_copy(update={"shares": delivery.shares[1:]}))
    message, _ = clients["a"].mask(np.zeros(16, dtype=np.uint32))
    with pytest.raises(sa.SecAggError, match="cannot be unmasked"):
        server.receive_masked(message)


def test_redelivery_is_idempotent_and_conflicts_are_refused() -> None:
    cfg = sa.make_round_config("r5", ["a", "b", "c"], bits=32, vector_length=4)
    server = sa.SecAggServer.start(cfg)
    _, advert = sa.SecAggClient.start(cfg, "a")
    server.receive_keys(advert)
    server.receive_keys(advert)  # the broker delivered it twice
    _, other = sa.SecAggClient.start(cfg, "a")
    with pytest.raises(sa.SecAggRefused, match="different"):
        server.receive_keys(other)
    with pytest.raises(sa.SecAggError, match="not a participant"):
        server.receive_keys(advert.model_copy(update={"sender": "z"}))
    with pytest.raises(sa.SecAggError, match="round"):
        server.receive_keys(advert.model_copy(update={"round_id": "r6"}))
    assert list(server.state.keys) == ["a"]


def test_a_corrupt_share_fails_the_round_instead_of_a_wrong_sum() -> None:
    r = Round(4)
    requests = r.sign(r.mask())
    victim = r.config.participants[0]
    for q in requests:
        response = r.client(q.receiver).unmask(q)
        shares = tuple(
            x.model_copy(update={"chunks": (bytes(16), x.chunks[1])}) if x.owner == victim
            else x for x in response.seed_shares)
        r.server.receive_unmask(response.model_copy(update={"seed_shares": shares}))
    with pytest.raises(sa.SecAggError, match=f"seed of {victim} does not match"):
        r.server.aggregate(r.vectors.__getitem__)
    with pytest.raises(ValueError):
        sa.Share(owner="a", index=1, chunks=(b"short", bytes(16)))


def test_a_round_in_one_process_sums_modulo_two_to_the_bits() -> None:
    rng = np.random.default_rng(7)
    names = ["a", "b", "c", "d"]
    config = sa.make_round_config("one-process", names, bits=16, vector_length=50)
    vectors = {p: rng.integers(0, 2**16, size=50, dtype=np.uint32) for p in names}
    result, times = sa.sum_in_one_process(config, vectors)
    expected = sum(v.astype(np.uint64) for v in vectors.values()) % 2**16
    assert np.array_equal(result.total.astype(np.uint64), expected)
    assert result.survivors == tuple(names) and not result.dropped
    assert min(times.setup_s, times.mask_s, times.hub_s) > 0
