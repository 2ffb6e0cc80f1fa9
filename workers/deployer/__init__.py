"""The deployer worker: level-triggered reconciliation of each service's desired replica count
against its assignments. It asks the scheduler where new replicas go and writes the
assignments; agents do the rest."""
