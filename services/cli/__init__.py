"""The `corral` command line: kubectl- and nomad-style verbs over the bus."""
