"""REST: read services, nodes and events from the bus; send commands as command events."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Path, Query, Request, Response
from pydantic import BaseModel, Field

from corral.bus.codec import structured_body
from corral.schemas.commands import RollbackCommand, ScaleCommand
from corral.schemas.errors import FieldError, InvalidInput
from corral.schemas.spec import DNS_LABEL, ServiceSpec
from corral.services.cli.client import node_views, service_views
from corral.services.gateway.auth import Principal, Scope
from corral.services.gateway.errors import ApiError
from corral.services.gateway.publishing import REJECTED_STATUS
from corral.services.gateway.reading import recent_events
from corral.services.gateway.routing import subject_filter
from corral.services.gateway.state import gateway, require

router = APIRouter(prefix="/v1", tags=["services"])
Reader = Annotated[Principal, Depends(require(Scope.READ))]
Deployer = Annotated[Principal, Depends(require(Scope.DEPLOY))]
Admin = Annotated[Principal, Depends(require(Scope.ADMIN))]
Name = Annotated[str, Path(pattern=DNS_LABEL, description="the service's name (a DNS label)")]
Wait = Annotated[
    bool,
    Query(description="wait for the api worker's answer: 200 when accepted, 4xx when rejected"),
]
Timeout = Annotated[
    float | None,
    Query(gt=0, le=300, description="seconds to wait with wait=true (CORRAL_COMMAND_TIMEOUT)"),
]


class CommandResult(BaseModel):
    command_id: str = Field(description="the command's id: `corral events --trace <id>`")
    subject: str
    accepted: bool | None = Field(default=None, description="set with wait=true")
    outcome: dict[str, Any] | None = Field(
        default=None, description="the accepted event's data, with wait=true"
    )


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text}
    for status, text in (
        (401, "no or unknown token"),
        (403, "the token's scope is not enough"),
        (404, "no such service"),
        (413, "body too large"),
        (422, "invalid input"),
        (429, "rate limited"),
        (504, "no answer in time (wait=true)"),
    )
}


async def _command(
    request: Request,
    response: Response,
    principal: Principal,
    name: str,
    verb: str,
    data: dict[str, Any],
    wait: bool,
    timeout: float | None,
) -> CommandResult:
    gw = gateway(request)
    source = f"{gw.settings.source}/gateway/{principal.name}"
    within = (timeout or gw.settings.command_timeout) if wait else None
    published, answer = await gw.publisher.command(
        "service", name, verb, data, source=source, wait=within
    )
    if answer is None:
        response.status_code = 202
        return CommandResult(command_id=published.id, subject=published.subject)
    if not answer.accepted:
        data = answer.data
        code = str(data.get("code") or "rejected")
        errors = [
            FieldError(str(e.get("loc", "")), str(e.get("msg", "")))
            for e in data.get("errors") or []
            if isinstance(e, dict)
        ]
        raise ApiError(
            REJECTED_STATUS.get(code, 409),
            str(data.get("reason") or "rejected"),
            code=code,
            errors=errors,
            command_id=published.id,
        )
    response.status_code = 200
    return CommandResult(
        command_id=published.id, subject=published.subject, accepted=True, outcome=answer.data
    )


@router.get("/services", summary="List services", responses=ERRORS)
async def list_services(request: Request, _: Reader) -> dict[str, Any]:
    views = await service_views(gateway(request).bus)
    return {"services": [view.as_dict() for view in views]}


@router.get("/services/{name}", summary="One service, its replicas and rollout", responses=ERRORS)
async def get_service(request: Request, _: Reader, name: Name) -> dict[str, Any]:
    views = await service_views(gateway(request).bus, name)
    if not views:
        raise ApiError(404, f"service {name!r} not found")
    return views[0].as_dict()


@router.get("/nodes", summary="List nodes, their capacity and allocation", responses=ERRORS)
async def list_nodes(request: Request, _: Reader) -> dict[str, Any]:
    return {"nodes": await node_views(gateway(request).bus)}


@router.get("/events", summary="Recent events, oldest first", tags=["events"], responses=ERRORS)
async def list_events(
    request: Request,
    _: Reader,
    subject: Annotated[
        str | None,
        Query(description="a NATS subject filter under the prefix, e.g. `evt.service.web.*`"),
    ] = None,
    type: Annotated[
        str | None,
        Query(description="a glob on the type, e.g. `*.rejected` or `service.*`", max_length=256),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    scan: Annotated[
        int, Query(ge=1, le=100_000, description="how many of the newest events to look through")
    ] = 10_000,
) -> dict[str, Any]:
    gw = gateway(request)
    try:
        wanted = subject_filter(gw.bus.names, subject)
    except InvalidInput as exc:
        raise ApiError.invalid(exc) from None
    events = await recent_events(gw.bus, wanted, type, limit=limit, scan=scan)
    return {"events": [structured_body(event) for event in events]}


@router.post(
    "/services",
    summary="Create or update a service from a spec",
    status_code=202,
    response_model_exclude_none=True,
    responses={200: {"model": CommandResult, "description": "accepted (wait=true)"}, **ERRORS},
)
async def deploy(
    request: Request,
    response: Response,
    principal: Deployer,
    spec: ServiceSpec,
    wait: Wait = False,
    timeout: Timeout = None,
) -> CommandResult:
    data = spec.model_dump(mode="json")
    return await _command(request, response, principal, spec.name, "deploy", data, wait, timeout)


@router.post(
    "/services/{name}/scale",
    summary="Set a service's replica count",
    status_code=202,
    response_model_exclude_none=True,
    responses={200: {"model": CommandResult, "description": "accepted (wait=true)"}, **ERRORS},
)
async def scale(
    request: Request,
    response: Response,
    principal: Deployer,
    name: Name,
    body: ScaleCommand,
    wait: Wait = False,
    timeout: Timeout = None,
) -> CommandResult:
    data = body.model_dump(mode="json", exclude_defaults=True) | {"replicas": body.replicas}
    return await _command(request, response, principal, name, "scale", data, wait, timeout)


@router.post(
    "/services/{name}/rollback",
    summary="Roll back to an earlier revision (default: the previous one), or end a canary",
    status_code=202,
    response_model_exclude_none=True,
    responses={200: {"model": CommandResult, "description": "accepted (wait=true)"}, **ERRORS},
)
async def rollback(
    request: Request,
    response: Response,
    principal: Deployer,
    name: Name,
    body: Annotated[RollbackCommand | None, Body()] = None,
    wait: Wait = False,
    timeout: Timeout = None,
) -> CommandResult:
    data = body.model_dump(mode="json", exclude_defaults=True) if body is not None else {}
    return await _command(request, response, principal, name, "rollback", data, wait, timeout)


@router.post(
    "/services/{name}/promote",
    summary="Promote a waiting canary to every replica",
    status_code=202,
    response_model_exclude_none=True,
    responses={200: {"model": CommandResult, "description": "accepted (wait=true)"}, **ERRORS},
)
async def promote(
    request: Request,
    response: Response,
    principal: Deployer,
    name: Name,
    wait: Wait = False,
    timeout: Timeout = None,
) -> CommandResult:
    return await _command(request, response, principal, name, "promote", {}, wait, timeout)


@router.delete(
    "/services/{name}",
    summary="Stop every replica of a service and remove it (admin scope)",
    status_code=202,
    response_model_exclude_none=True,
    responses={200: {"model": CommandResult, "description": "accepted (wait=true)"}, **ERRORS},
)
async def delete(
    request: Request,
    response: Response,
    principal: Admin,
    name: Name,
    wait: Wait = False,
    timeout: Timeout = None,
) -> CommandResult:
    return await _command(request, response, principal, name, "delete", {}, wait, timeout)
