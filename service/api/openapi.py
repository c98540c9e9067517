"""The OpenAPI document, with the spec bodies that POST routes parse themselves: they validate
with the service's URL limits as context, which a declared body parameter cannot pass, so the
routes mark their operation (`x-topk-body`: the kind) and the body's schema is put in here."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from service.specs import spec_model


def install_openapi_bodies(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for operation in _operations(schema):
            kind = operation.pop("x-topk-body", None)
            if kind is None:
                continue
            model_schema = spec_model(kind).model_json_schema(
                ref_template="#/components/schemas/{model}"
            )
            components.update(model_schema.pop("$defs", {}))
            components[model_schema["title"]] = model_schema
            operation["requestBody"] = {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {"$ref": f"#/components/schemas/{model_schema['title']}"}
                    }
                },
            }
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _operations(schema: dict[str, Any]):
    for path_item in schema.get("paths", {}).values():
        yield from (op for op in path_item.values() if isinstance(op, dict))
