"""The HTTP gateway: a FastAPI app that lets other systems and people reach Corral over HTTP.
REST reads state from NATS KV and sends commands as command events; CloudEvents and signed
webhooks (GitHub, GitLab, Alertmanager, generic) become events on `<prefix>.evt.ext.…`.
The deciding parts (tokens and scopes, rate limits, signatures, routing, payload mapping)
are pure modules; the FastAPI routes and the uvicorn worker around them are thin."""
