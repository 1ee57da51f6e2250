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

    def mask(self, skip: set[str] = frozenset()) -> list[sa.UnmaskRequest]:
        for p, c in self.clients.items():
            if p in skip:
                continue
            message, y = c.mask(self.ints[p])
            self.vectors[p] = sa.vector_from_bytes(sa.vector_to_bytes(y), 32, D)
            self.server.receive_masked(message)
        self.reload()
        return self.server.close_masking()

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
    r.unmask(r.mask())
    result = r.server.aggregate(r.vectors.__getitem__)
    assert result.survivors == r.config.participants and result.dropped == ()
    r.check_sum(result)
    # the bound is tight enough to mean something: far below the noise scale
    assert r.q.sum_error_bound(5) < 1e-6


def test_dropout_before_masking_is_recovered() -> None:
    r = Round(5)
    gone = r.config.participants[1]
    r.unmask(r.mask(skip={gone}))
    result = r.server.aggregate(r.vectors.__getitem__)
    assert result.dropped == (gone,) and gone not in result.survivors
    r.check_sum(result)


def test_dropout_after_masking_is_recovered() -> None:
    r = Round(5)
    requests = r.mask()
    gone = r.config.participants[3]
    r.unmask(requests, skip={gone})  # sent its masked input, then vanished
    result = r.server.aggregate(r.vectors.__getitem__)
    assert gone in result.survivors
    r.check_sum(result)


def test_secagg_plus_sparse_graph_with_two_dropouts() -> None:
    r = Round(12)
    assert all(len(v) < 11 for v in r.config.neighbours.values())  # not the complete graph
    gone = set(r.config.participants[:2])
    r.unmask(r.mask(skip=gone))
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
    requests = r.mask()
    r.unmask(requests, skip=set(r.config.participants[:2]))
    with pytest.raises(sa.SecAggError, match="threshold is 3"):
        r.server.aggregate(r.vectors.__getitem__)
    # a client refuses to unmask for fewer than t survivors
    r = Round(4)
    p = r.config.participants
    r.client(p[0]).mask(r.ints[p[0]])
    request = sa.UnmaskRequest(round_id=r.config.round_id, receiver=p[0],
                               survivors=p[:2], dropped=p[2:])
    with pytest.raises(sa.SecAggRefused, match="fewer than t"):
        r.client(p[0]).unmask(request)


def test_hub_cannot_reconstruct_a_single_update() -> None:
    r = Round(5)
    p = r.config.participants
    late = p[4]
    requests = r.mask(skip={late})
    r.unmask(requests)
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
    requests = r.mask(skip={p[4]})
    first = requests[0]
    answer = r.client(first.receiver).unmask(first)
    assert r.client(first.receiver).unmask(first) == answer  # a retry gets the same answer
    # asked again with a survivor now called dropped: refused (it would reveal its input)
    other = sa.UnmaskRequest(round_id=first.round_id, receiver=first.receiver,
                             survivors=tuple(x for x in first.survivors if x != p[1]),
                             dropped=(*first.dropped, p[1]))
    with pytest.raises(sa.SecAggRefused, match="already answered"):
        r.client(first.receiver).unmask(other)
    second = requests[1]
    with pytest.raises(sa.SecAggRefused, match="both survivor and dropped"):
        r.client(second.receiver).unmask(second.model_copy(
            update={"dropped": (*second.dropped, p[1])}))
    with pytest.raises(sa.SecAggRefused, match="not listed a survivor"):
        r.client(second.receiver).unmask(second.model_copy(update={
            "survivors": tuple(x for x in second.survivors if x != second.receiver)}))
    # the hub refuses to hold a self-seed share of a dropped client ...
    held = r.clients[second.receiver].state.held[p[4]]
    forged = sa.UnmaskResponse(round_id=first.round_id, sender=second.receiver,
                               seed_shares=(held.seed,), mask_key_shares=())
    with pytest.raises(sa.SecAggRefused):
        r.server.receive_unmask(forged)
    # ... and to rebuild a second secret of a client whose first it rebuilt
    for q in requests:
        r.server.receive_unmask(r.client(q.receiver).unmask(q))
    r.server.aggregate(r.vectors.__getitem__)
    with pytest.raises(sa.SecAggRefused, match="never both"):
        r.server.reconstruct(p[0], sa.Secret.MASK_KEY)
    with pytest.raises(sa.SecAggRefused, match="never both"):
        r.server.reconstruct(p[4], sa.Secret.SEED)


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
