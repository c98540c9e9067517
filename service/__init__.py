"""The job service: HTTP API, job store, Ray launcher and reconciler, and the `topk` command line."""


def package_version() -> str:
    """The installed topk-service version (its distribution's metadata)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("topk-service")
    except PackageNotFoundError:  # a source tree that was never installed
        return "unknown (not installed)"
