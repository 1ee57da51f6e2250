"""Federated training, shared by hub and spoke (extra ``training``): the training
contract's files, the tensor format, and what a spoke does to an update before it leaves.

* :mod:`.contract`: the training contract's files (``round.json``, ``cohort.json``,
  ``output.json``) as pydantic models.
* :mod:`.tensors`: the safetensors format, read strictly (re-exported from the SDK).
* :mod:`.update`: a model update as named tensors; flatten, L2 clip, Gaussian noise,
  quantisation to integers modulo 2^k and dequantisation of a sum.
* :mod:`.secagg`: SecAgg+ (Bell et al. 2020) as explicit stages with message models and
  persistable client and server state; the hub learns only the sum of >= t masked updates.
* :mod:`.privacy`: the (epsilon, delta) accountant (dp-accounting's RDP accountant).

The orchestration (hub rounds, broker messages, object store) is built on top of these and
lives in the hub and spoke; nothing here does I/O. One round, hub H and spoke S (every
arrow a signed broker message; persist each side's state after every call)::

    H  cfg = make_round_config(round_id, spokes, bits=q.bits, vector_length=schema.size)
       server = SecAggServer.start(cfg)                       -> cfg to every spoke
    S  client, advert = SecAggClient.start(cfg, me)           -> advert
    H  server.receive_keys(advert) ...; server.close_keys()   -> server.keys_for(s)
    S  bundle = client.share_keys(neighbour_keys)             -> bundle
    H  server.receive_shares(bundle) ...; close_shares()      -> server.shares_for(s)
    S  client.receive_shares(delivery)
       x, report = protect_update(update, schema, C, z, q)
       masked_input, y = client.mask(x)    y to the object store -> masked_input
    H  server.receive_masked(masked_input) ...; close_masking()  -> ConsistencyRequest
    S  signature = client.sign_survivors(request)             -> signature
    H  server.receive_signature(signature) ...; close_consistency() -> UnmaskRequest
    S  response = client.unmask(request)                      -> response; delete state
    H  server.receive_unmask(response) ...
       result = server.aggregate(load_from_object_store)
       mean = dequantise_sum(result.total, q, len(result.survivors)) / len(result.survivors)

``q`` is a :class:`~.update.Quantisation` with ``max_summands`` >= the participants and
``bits`` equal to the round's; ``close_*`` run at a stage's deadline.
"""
