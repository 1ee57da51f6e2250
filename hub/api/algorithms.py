"""Algorithm versions, always pinned by manifest digest."""

from fastapi import APIRouter, Depends, HTTPException
from jsonschema import Draft202012Validator, SchemaError
from sqlmodel import Session, select

from tributary.hub.api.deps import get_actor, get_session, get_settings
from tributary.hub.api.schemas import AlgorithmCreate
from tributary.hub.models import Algorithm
from tributary.hub.services import audit
from tributary.hub.services.aggregation import AGGREGATORS
from tributary.hub.services.registry_client import RegistryCheckError, verify_manifest
from tributary.hub.settings import HubSettings

router = APIRouter(prefix="/api/algorithms", tags=["algorithms"])


@router.post("", status_code=201, response_model=Algorithm)
def register_algorithm(body: AlgorithmCreate, session: Session = Depends(get_session),
                       settings: HubSettings = Depends(get_settings),
                       actor: str = Depends(get_actor)) -> Algorithm:
    if body.aggregator not in AGGREGATORS:
        raise HTTPException(422, f"unknown aggregator {body.aggregator!r}; "
                                 f"known: {sorted(AGGREGATORS)}")
    try:
        Draft202012Validator.check_schema(body.argument_schema)
    except SchemaError as exc:
        raise HTTPException(422, f"argument_schema is not a valid JSON Schema: "
                                 f"{exc.message}") from None
    existing = session.exec(select(Algorithm).where(
        Algorithm.name == body.name, Algorithm.version == body.version)).first()
    if existing is not None:
        raise HTTPException(409, f"{body.name} {body.version} is already registered")
    if settings.verify_registry:
        try:
            verify_manifest(body.repository, body.digest, settings.insecure_registries)
        except RegistryCheckError as exc:
            audit.record(session, actor, "algorithm.refused", f"{body.name} {body.version}",
                         reason=str(exc))
            session.commit()
            raise HTTPException(422, f"image refused: {exc}") from None
    algorithm = Algorithm(**body.model_dump())
    session.add(algorithm)
    audit.record(session, actor, "algorithm.registered", f"{body.name} {body.version}",
                 repository=body.repository, digest=body.digest)
    session.commit()
    session.refresh(algorithm)
    return algorithm


@router.get("", response_model=list[Algorithm])
def list_algorithms(session: Session = Depends(get_session)) -> list[Algorithm]:
    return list(session.exec(select(Algorithm).order_by(Algorithm.name, Algorithm.version)))


@router.get("/{algorithm_id}", response_model=Algorithm)
def get_algorithm(algorithm_id: int, session: Session = Depends(get_session)) -> Algorithm:
    algorithm = session.get(Algorithm, algorithm_id)
    if algorithm is None:
        raise HTTPException(404, "no such algorithm")
    return algorithm
