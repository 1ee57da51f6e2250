"""The identifiers a spoke brings to a private set intersection: the ``[cohorts]
link_identifier`` attribute of each patient in the site's attributes file, with the case id
the catalog knows the patient by (the same keyed pseudonym :mod:`tributary.spoke.ingest`
gives). The values are read here, used as PSI inputs and never written anywhere that
leaves the spoke."""

from __future__ import annotations

from tributary.spoke.config import SpokeConfig
from tributary.spoke.ingest import load_attributes
from tributary.spoke.pseudonyms import Pseudonymizer


class NoIdentifiers(ValueError):
    """The site cannot take part: no agreed identifier configured, or the file is unusable."""


def link_identifiers(config: SpokeConfig) -> dict[str, str]:
    """Agreed identifier → local case id, for every patient that has one. Refused
    (:class:`NoIdentifiers`) when the identifier is not configured, the attributes file
    is missing, or two patients share an identifier (a PSI could not tell them apart)."""
    attribute = config.cohorts.link_identifier
    if attribute is None:
        raise NoIdentifiers("this site names no [cohorts] link_identifier")
    path = config.attributes_path
    if path is None:
        raise NoIdentifiers("this site has no attributes file to read identifiers from")
    try:
        by_patient = load_attributes(path)
    except (OSError, ValueError) as exc:
        raise NoIdentifiers(f"the attributes file cannot be read: {type(exc).__name__}"
                            ) from None
    pseudonyms = Pseudonymizer.from_key_file(config.work_dir / "pseudonym.key")
    out: dict[str, str] = {}
    for patient, values in by_patient.items():
        value = values.get(attribute)
        if value is None or str(value).strip() == "":
            continue
        identifier = str(value).strip()
        if identifier in out:
            raise NoIdentifiers(f"two patients share one {attribute}; fix the attributes file")
        out[identifier] = pseudonyms.case_id(f"patient:{patient}")
    return out
