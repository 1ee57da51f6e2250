"""The dashboard's server-rendered pages. They read through the same services as the REST
API's routes (so a page never shows what the API would not), and their forms and buttons
call the documented /api endpoints from the browser; live progress arrives over the SSE
streams of :mod:`tributary.hub.api.events`."""

from __future__ import annotations

import secrets
from typing import Any

from fastapi import APIRouter, Depends, Form, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import func
from sqlmodel import Session, select

from tributary.hub.deps import RowId, get_session, may_see_cases
from tributary.hub.models import (
    AggregateSnapshot,
    Algorithm,
    CaseResult,
    CaseState,
    Experiment,
    ExperimentState,
    Role,
    SpokeCredential,
    User,
)
from tributary.hub.services import access_requests, audit, credentials, plots
from tributary.hub.services import algorithms as algorithm_versions
from tributary.hub.services import trust as spoke_trust
from tributary.hub.services.aggregation import AGGREGATORS, latest
from tributary.hub.services.counts import cohort_sizes, count_reads
from tributary.hub.services.deadletters import list_dead_letters
from tributary.hub.services.enrolment import enrolled_spokes, keys_by_spoke
from tributary.hub.services.progress import (
    any_case_in,
    case_page,
    case_read,
    experiment_read,
    experiment_reads,
    output_reads,
)
from tributary.hub.services.spokes import spoke_reads
from tributary.hub.services.users import revoke_token
from tributary.hub.signin import (
    CSRF_FIELD,
    TOKEN_COOKIE,
    cookie_secure,
    csrf_ok,
    set_csrf_cookie,
    sign_in,
)
from tributary.hub.web.rendering import (
    can,
    page_user,
    render,
    templates,
)
from tributary.hub.web.results import forest_svg, results_view, spoke_view
from tributary.protocol.deadletters import DeadLetterError

router = APIRouter(include_in_schema=False)


_FORM_EXPIRED = "This form has expired or did not come from this hub; please sign in again."


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, error: str = "") -> HTMLResponse:
    return render(request, "login.html", None, error=error)


@router.post("/login", response_model=None)
def login(request: Request, username: str = Form(...), password: str = Form(...),
          csrf: str = Form("", alias=CSRF_FIELD),
          session: Session = Depends(get_session)) -> Response:
    """The sign-in form: refused without its CSRF token (no login CSRF), throttled."""
    if not csrf_ok(request, csrf):
        return render(request, "login.html", None, status_code=403, error=_FORM_EXPIRED)
    try:
        issued = sign_in(request, session, username, password)
    except HTTPException as exc:  # throttled
        response = render(request, "login.html", None, status_code=exc.status_code,
                           error=f"Too many failed sign-ins: {exc.detail}.")
        response.headers.update(exc.headers or {})
        return response
    if issued is None:
        return RedirectResponse("/login?error=Wrong+username+or+password", status_code=303)
    response = RedirectResponse("/", status_code=303)
    response.set_cookie(TOKEN_COOKIE, issued[0], httponly=True, samesite="strict",
                        expires=issued[1], secure=cookie_secure(request))
    # A fresh CSRF token for the signed-in session (one planted before sign-in is dropped).
    set_csrf_cookie(request, response, secrets.token_urlsafe(32))
    return response


@router.post("/logout", response_model=None)
def logout(request: Request, csrf: str = Form("", alias=CSRF_FIELD),
           session: Session = Depends(get_session)) -> Response:
    """Sign out: the token is revoked on the hub, not only forgotten by the browser."""
    if not csrf_ok(request, csrf):
        return render(request, "error.html", None, status_code=403, message=_FORM_EXPIRED)
    token = request.cookies.get(TOKEN_COOKIE)
    if token:
        revoke_token(session, token)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(TOKEN_COOKIE, httponly=True, samesite="strict",
                           secure=cookie_secure(request))
    return response


@router.get("/", response_class=HTMLResponse)
def experiments_page(request: Request, session: Session = Depends(get_session),
                     user: User = Depends(page_user)) -> HTMLResponse:
    experiments = experiment_reads(session, request.app.state.settings.spoke_online_seconds)
    live = any(e.state == ExperimentState.LAUNCHED for e in experiments)
    return render(request, "experiments.html", user, experiments=experiments, live=live)


@router.get("/experiments/new", response_class=HTMLResponse)
def new_experiment_page(request: Request, session: Session = Depends(get_session),
                        user: User = Depends(page_user),
                        spoke_ids: list[str] = Query(default_factory=list),
                        modality: str = "CT") -> HTMLResponse:
    """The launch form; ``spoke_ids`` (repeatable) and ``modality`` preselect targets and
    the cohort's modality (the catalog page links here with the spokes it matched)."""
    algorithms = algorithm_versions.algorithms(session)
    spokes = spoke_reads(session, request.app.state.settings.spoke_online_seconds)
    enrolled = enrolled_spokes(session)
    choices = [{"id": a.id, "label": f"{a.name} {a.version}",
                "state": algorithm_versions.state(a),
                "aggregator": a.aggregator, "schema": a.argument_schema,
                "defaults": {k: v["default"] for k, v in
                             a.argument_schema.get("properties", {}).items()
                             if isinstance(v, dict) and "default" in v}}
               for a in reversed(algorithms)]
    choices.sort(key=lambda c: c["state"] != "approved")
    aggregators = [{"name": name, "description": cls.description,
                    "schema": cls.Parameters.model_json_schema()}
                   for name, cls in sorted(AGGREGATORS.items())]
    return render(request, "experiment_new.html", user, algorithms=choices, spokes=spokes,
                   access_requests=access_requests.approved_for(session, user.username),
                   enrolled=enrolled, aggregators=aggregators, preselected=set(spoke_ids),
                   modality=modality[:16])


def _experiment_or_404(session: Session, experiment_id: str) -> Experiment:
    experiment = session.get(Experiment, experiment_id)
    if experiment is None:
        raise HTTPException(404, "no such experiment")
    return experiment


class ResultsQuery:
    """What the results section shows: the output in the distribution, the figure in the
    forest plot and, for many spokes, the spoke table's sort and page (query parameters of
    the page and of its results fragment alike)."""

    def __init__(self, quantity: str | None = None, metric: str | None = None,
                 sort: str | None = None, desc: bool = False, page: int = 1) -> None:
        self.quantity, self.metric, self.sort, self.desc = quantity, metric, sort, desc
        self.page = page


def _results_context(request: Request, session: Session, experiment: Experiment,
                     query: ResultsQuery, user: User) -> dict[str, Any]:
    """What GET /api/experiments/{id} and .../aggregate return to ``user``, for the
    results section: no distribution of per-case outputs for a user who may not see
    per-case data. Progress comes from counts; succeeded outputs are read only when a
    figure of this snapshot is not drawn yet."""
    read = experiment_read(session, experiment, request.app.state.settings.spoke_online_seconds)
    show_cases = may_see_cases(user, experiment)
    report = latest(session, experiment, request.app.state.settings.min_cell_size)
    has_cases = show_cases and session.exec(select(CaseResult.id).where(
        CaseResult.experiment_id == experiment.id).limit(1)).first() is not None
    outputs = (lambda: output_reads(session, experiment.id)) if show_cases else []
    return {"e": read, "show_cases": show_cases, "has_cases": has_cases,
            "results": results_view(read, report, outputs, query.quantity, query.metric,
                                    query.sort, query.desc, query.page)}


@router.get("/experiments/{experiment_id}", response_class=HTMLResponse)
def experiment_page(experiment_id: str, request: Request, query: ResultsQuery = Depends(),
                    cursor: str | None = None,
                    spoke: str | None = None, state: str | None = None,
                    session: Session = Depends(get_session),
                    user: User = Depends(page_user)) -> HTMLResponse:
    """The experiment, its progress and results, and one page of its cases (as GET
    /api/experiments/{id}/cases, same cursor and filters)."""
    experiment = _experiment_or_404(session, experiment_id)
    context = _results_context(request, session, experiment, query, user)
    cases, next_url = [], None
    if context["show_cases"]:
        if state not in {s.value for s in CaseState}:
            state = None
        try:
            page = case_page(session, experiment.id, cursor=cursor, spoke_id=spoke or None,
                             state=state)
        except ValueError:
            page = case_page(session, experiment.id, spoke_id=spoke or None, state=state)
        cases = page.cases
        if page.next_cursor:
            url = request.url.include_query_params(cursor=page.next_cursor)
            next_url = f"{url.path}?{url.query}#cases"
    return render(request, "experiment.html", user, cases=cases, next_url=next_url,
                   any_failed=any_case_in(session, experiment.id, CaseState.FAILED.value),
                   spoke_filter=spoke or "", state_filter=state or "",
                   case_states=[s.value for s in CaseState], paged=bool(cursor), **context)


@router.get("/experiments/{experiment_id}/cases/{spoke_id}/{case_id}",
            response_class=HTMLResponse)
def case_detail_page(experiment_id: str, spoke_id: str, case_id: str, request: Request,
                     session: Session = Depends(get_session),
                     user: User = Depends(page_user)) -> HTMLResponse:
    """One case: its outcome and, when it failed, what the developer needs to read it (the
    reason, exit code, log tail or why the site withheld it, the limits it ran under after
    the site's caps, the files discarded), for each attempt. Per-case data: coordinators
    (and a sandbox study's developer) only."""
    experiment = _experiment_or_404(session, experiment_id)
    if not may_see_cases(user, experiment):
        raise HTTPException(403, "per-case data is for coordinators")
    case = case_read(session, experiment_id, spoke_id, case_id)
    if case is None:
        raise HTTPException(404, "no such case")
    return render(request, "case.html", user, e=experiment, c=case)


@router.get("/experiments/{experiment_id}/results", response_class=HTMLResponse)
def experiment_results_fragment(experiment_id: str, request: Request,
                                query: ResultsQuery = Depends(),
                                session: Session = Depends(get_session),
                                user: User = Depends(page_user)) -> HTMLResponse:
    """The results section alone: the page swaps it in when the snapshot changes, so every
    viewer of a study asks for it at once. Rendered once per snapshot, state and choices,
    and at most every :data:`FRAGMENT_SECONDS` while results arrive (its "from N of M
    results" line is that fresh)."""
    experiment = _experiment_or_404(session, experiment_id)
    version = session.exec(select(func.max(AggregateSnapshot.version)).where(
        AggregateSnapshot.experiment_id == experiment_id)).one()
    key = ("results-fragment", experiment_id, version, experiment.state.value,
           experiment.aggregate_stale_since is None, may_see_cases(user, experiment),
           query.quantity, query.metric, query.sort, query.desc, query.page)

    def render() -> str:
        context = _results_context(request, session, experiment, query, user)
        return templates.get_template("_results.html").render(
            user=user, can={}, state_class=templates.env.globals["state_class"], **context)

    return HTMLResponse(plots.CACHE.get(key, render, ttl=FRAGMENT_SECONDS),
                        headers={"Cache-Control": "no-store"})


#: How long a rendered results fragment serves while its study's results keep arriving.
FRAGMENT_SECONDS = 2.0


@router.get("/experiments/{experiment_id}/plots/forest.svg", response_model=None)
def experiment_forest_plot(experiment_id: str, request: Request, metric: str,
                           v: int | None = None, session: Session = Depends(get_session),
                           user: User = Depends(page_user)) -> Response:
    """Every spoke's estimate in one forest plot (the summary plot of a study of many
    spokes), drawn once per snapshot. With ``v`` (the snapshot version) the image never
    changes, so the browser may keep it."""
    experiment = _experiment_or_404(session, experiment_id)
    min_cell_size = request.app.state.settings.min_cell_size
    try:
        report = latest(session, experiment, min_cell_size, version=v)
    except LookupError:
        raise HTTPException(404, f"no aggregate version {v}") from None
    svg = forest_svg(report, metric)
    if svg is None:
        raise HTTPException(404, f"no intervals of {metric!r} to plot")
    cache = "private, max-age=86400, immutable" if v is not None else "no-store"
    return Response(svg, media_type="image/svg+xml",
                    headers={"Cache-Control": cache, "X-Content-Type-Options": "nosniff"})


@router.get("/experiments/{experiment_id}/spokes/{spoke_id}", response_class=HTMLResponse)
def experiment_spoke_page(experiment_id: str, spoke_id: str, request: Request,
                          quantity: str | None = None, session: Session = Depends(get_session),
                          user: User = Depends(page_user)) -> HTMLResponse:
    """One spoke's results in a study: its figures beside the pooled ones, why its cases
    failed, and its own plots (drawn once per snapshot, only when asked)."""
    experiment = _experiment_or_404(session, experiment_id)
    read = experiment_read(session, experiment, request.app.state.settings.spoke_online_seconds)
    target = next((t for t in read.targets if t.spoke_id == spoke_id), None)
    if target is None:
        raise HTTPException(404, f"spoke {spoke_id!r} is not a target of this experiment")
    report = latest(session, experiment, request.app.state.settings.min_cell_size)
    show_cases = may_see_cases(user, experiment)
    outputs = (lambda: output_reads(session, experiment.id, spoke_id)) if show_cases else []
    view = spoke_view(report, spoke_id, outputs, quantity)
    return render(request, "experiment_spoke.html", user, e=read, t=target, view=view,
                   report=report, show_cases=show_cases)


@router.get("/spokes", response_class=HTMLResponse)
def spokes_page(request: Request, session: Session = Depends(get_session),
                user: User = Depends(page_user)) -> HTMLResponse:
    spokes = spoke_reads(session, request.app.state.settings.spoke_online_seconds)
    membership = credentials.policy(request.app.state.settings)
    return render(request, "spokes.html", user, spokes=spokes, keys=keys_by_spoke(session),
                   cohorts=cohort_sizes(session), credentials_required=membership is not None,
                   credentials={c.spoke_id: c for c in session.exec(select(SpokeCredential))})


@router.get("/algorithms", response_class=HTMLResponse)
def algorithms_page(request: Request, session: Session = Depends(get_session),
                    user: User = Depends(page_user)) -> HTMLResponse:
    rows = [_algorithm_row(session, a) for a in algorithm_versions.algorithms(session)]
    return render(request, "algorithms.html", user, algorithms=rows,
                   publishers=algorithm_versions.publishers(session))


def _algorithm_row(session: Session, algorithm: Algorithm) -> dict[str, Any]:
    return {"a": algorithm, "state": algorithm_versions.state(algorithm),
            "reviews": algorithm_versions.reviews(session, algorithm.id or 0),
            "release": algorithm_versions.signature_facts(algorithm.release_signature),
            "approval": algorithm_versions.signature_facts(algorithm.approval)}


@router.get("/algorithms/{algorithm_id}", response_class=HTMLResponse)
def algorithm_page(algorithm_id: RowId, request: Request,
                   session: Session = Depends(get_session),
                   user: User = Depends(page_user)) -> HTMLResponse:
    """One version: its image, signatures and reviews (the link `publish` prints), the
    review form, and the other versions of the same algorithm."""
    algorithm = session.get(Algorithm, algorithm_id)
    if algorithm is None:
        raise HTTPException(404, "no such algorithm version")
    all_versions = algorithm_versions.versions(session, algorithm.name)
    versions = [{"a": v, "state": algorithm_versions.state(v),
                 "same_image_as": [o.version for o in all_versions
                                   if o.digest == v.digest and o.id != v.id]}
                for v in all_versions]
    return render(request, "algorithm.html", user, row=_algorithm_row(session, algorithm),
                   versions=versions, trust=spoke_trust.verdicts(session, algorithm))


@router.get("/audit", response_class=HTMLResponse)
def audit_page(request: Request, q: str = "", action: str = "", target: str = "",
               actor: str = "", limit: int = 200, session: Session = Depends(get_session),
               user: User = Depends(page_user)) -> Response:
    if not can(user, Role.COORDINATOR):
        return render(request, "error.html", user, message="The audit log is open to "
                       "coordinators and administrators.")
    events = audit.search(session, action=action or None, target=target or None,
                          actor=actor or None, q=q or None, limit=max(1, min(limit, 5000)))
    return render(request, "audit.html", user, events=events, q=q, action=action,
                   target=target, actor=actor, limit=limit)


@router.get("/counts", response_class=HTMLResponse)
def counts_page(request: Request, session: Session = Depends(get_session),
                user: User = Depends(page_user)) -> HTMLResponse:
    """Federated counts (coordinators): per-spoke answers and totals, as GET /api/counts."""
    if not can(user, Role.COORDINATOR):
        return render(request, "error.html", user, status_code=403,
                       message="Federated counts are open to coordinators and administrators.")
    counts = count_reads(session, limit=100)
    return render(request, "counts.html", user, counts=counts,
                   refresh=3 if any(not c.complete for c in counts) else 0)


@router.get("/dead-letters", response_class=HTMLResponse)
def dead_letters_page(request: Request, session: Session = Depends(get_session),
                      user: User = Depends(page_user)) -> HTMLResponse:
    """Messages that ended in a dead-letter queue, with why (as GET /api/dead-letters)."""
    if not can(user, Role.COORDINATOR):
        return render(request, "error.html", user, status_code=403,
                       message="Dead letters are open to coordinators and administrators.")
    try:
        letters, error = list_dead_letters(session, request.app.state.settings.broker()), ""
    except DeadLetterError as exc:  # shown on the page: the broker is unreachable
        letters, error = [], f"cannot read the dead-letter queues: {exc}"
    return render(request, "dead_letters.html", user, letters=letters, error=error)
