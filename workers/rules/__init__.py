"""The rules worker: user automation. Each event on the bus is matched against the stored
rules (`matching`); a match renders the rule's command from the event (`templating`), passes
its cooldown and rate limit (`limits`), and is sent like any other caller's command."""
