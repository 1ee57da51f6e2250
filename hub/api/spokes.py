"""Spoke registration."""

from fastapi import APIRouter, Depends, HTTPException
from sqlmodel import Session, select

from tributary.hub.api.deps import get_actor, get_session
from tributary.hub.api.schemas import SpokeCreate
from tributary.hub.models import Spoke
from tributary.hub.services import audit

router = APIRouter(prefix="/api/spokes", tags=["spokes"])


@router.post("", status_code=201, response_model=Spoke)
def register_spoke(body: SpokeCreate, session: Session = Depends(get_session),
                   actor: str = Depends(get_actor)) -> Spoke:
    if session.get(Spoke, body.id) is not None:
        raise HTTPException(409, f"spoke {body.id!r} is already registered")
    spoke = Spoke(id=body.id, name=body.name, institution=body.institution)
    session.add(spoke)
    audit.record(session, actor, "spoke.registered", body.id, name=body.name)
    session.commit()
    session.refresh(spoke)
    return spoke


@router.get("", response_model=list[Spoke])
def list_spokes(session: Session = Depends(get_session)) -> list[Spoke]:
    return list(session.exec(select(Spoke).order_by(Spoke.id)))
