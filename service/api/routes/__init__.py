"""One router per resource: `health` (probes, Prometheus), `info`, `jobs`, `sweeps`."""
