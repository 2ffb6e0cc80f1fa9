"""What people and other systems talk to: the `corral` CLI, the runner that hosts workers
(alone, or all of them with an embedded NATS for `corral up`), and later the HTTP gateway
and chat-ops."""
