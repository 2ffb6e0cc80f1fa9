"""Chat-ops: Slack and Mattermost slash commands (`/corral deploy|scale|status|...`), verified,
checked against each chat user's roles, and sent as commands on the bus like the CLI's, with
progress and the outcome posted back to the conversation."""
