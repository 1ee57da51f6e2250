"""The wire protocol shared by hub and spoke: message schemas, the algorithm contract,
broker destinations and the STOMP transport. Both sides import it; nothing here is
duplicated on either side."""

PROTOCOL_VERSION = "1.5"
__version__ = "0.1.0"
