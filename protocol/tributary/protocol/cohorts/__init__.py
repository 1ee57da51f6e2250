"""Cohorts across institutions: the federated catalog (DCAT-AP descriptions spokes
publish), participant credentials (W3C verifiable credentials), private set intersection,
vertical training and data access requests. The wire formats both sides import live here,
one module per concern."""
