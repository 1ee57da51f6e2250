"""Federated training's privacy core, shared by hub and spoke (extra ``training``).

* :mod:`.update`: a model update as named tensors; flatten, L2 clip, Gaussian noise,
  quantisation to integers modulo 2^k and dequantisation of a sum.
* :mod:`.secagg`: SecAgg+ (Bell et al. 2020) as explicit stages with message models and
  persistable client and server state; the hub learns only the sum of >= t masked updates.
* :mod:`.privacy`: the (epsilon, delta) accountant (dp-accounting's RDP accountant).

The orchestration (hub rounds, broker messages, object store) is built on top of these and
lives in the hub and spoke; nothing here does I/O.
"""
