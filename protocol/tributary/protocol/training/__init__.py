"""Federated training: the training contract's files, the tensor format, and what a spoke
does to an update before it leaves (clipping, noise, quantisation, secure aggregation)."""
