"""Chat-ops: the event that records every slash command, who sent it and what came of it."""

from __future__ import annotations

from pydantic import Field

from corral.schemas.events import EventData


class ChatCommandEvent(EventData):
    """`chat.<platform>.requested` (allowed and sent), `chat.<platform>.denied` (RBAC said no,
    nothing changed) or `chat.<platform>.invalid` (the text did not parse)."""

    platform: str = Field(description="slack or mattermost")
    user_id: str
    user_name: str = ""
    team: str = ""
    channel: str = ""
    text: str = Field(description="what the user typed after the slash command")
    verb: str = ""
    target: str = ""
    roles: list[str] = Field(default_factory=list)
    allowed: bool
    reason: str = ""
    command_id: str = Field(default="", description="the command it sent, if any")
