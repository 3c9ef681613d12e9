"""Self-healing: placement of replicas, repair of lost copies, whole-site recovery and scrub."""
