"""Everything that talks to NATS: settings and connection, subject and bucket names, stream
and KV provisioning, the CloudEvents codec, the typed state store, the error edge that turns
exceptions into ack, nack or dead letter, and the embedded nats-server."""
