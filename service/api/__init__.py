"""The HTTP API: `create_app(settings)` (app.py) builds the FastAPI app.

- `app`: the factory and the app's lifespan (services built, threads started and stopped);
- `deps`: the services built once per app and the dependencies that hand them to routes,
  bearer-token auth included;
- `schemas`: the answers' shapes; `errors`: the error map (codes -> HTTP statuses, one body);
- `middleware`: the body limit and the request metrics; `openapi`: the spec bodies' docs;
- `routes/`: one router per resource (health, info, jobs, sweeps); `records`: job records;
- `pages`: the web UI (/ui) and the offline API docs (/docs).

Run it with `topk serve`, or `uvicorn --factory service.api:create_app` (settings from TOPK_*).
"""

from service.api.app import create_app

__all__ = ["create_app"]
