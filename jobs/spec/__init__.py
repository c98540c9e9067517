"""The spec models: one pydantic schema for the HTTP body, the CLI file and the worker config."""
