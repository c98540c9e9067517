"""/v1/sweeps: sweeps, with the routes of training jobs (jobs.py) and their trials' metrics."""

from service.api.routes.jobs import JobRoutes

router = JobRoutes("sweep", "/v1/sweeps").router()
