"""The node agent: watches the assignments bound to its node, runs them through a runtime
driver, reports replica status and heartbeats. A replica no longer assigned to it is stopped,
so a node that comes back never duplicates work."""
