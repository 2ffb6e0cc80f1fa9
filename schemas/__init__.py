"""Pure pydantic models: service specs, commands, events, the CloudEvents envelope and the
records kept in KV. This layer does no I/O, so every other layer and every other language
(through the exported JSON Schema) can validate against the same definitions."""
