"""/v1/info: what a client needs to know about the service, behind the token."""

from __future__ import annotations

from fastapi import APIRouter

from service import package_version
from service.api.deps import OwnerDep, SettingsDep
from service.api.schemas import ServiceInfo

router = APIRouter(prefix="/v1", tags=["service"])


@router.get("/info", response_model=ServiceInfo, name="service_info")
def info(settings: SettingsDep, _owner: OwnerDep) -> ServiceInfo:
    """The service's version and the Ray dashboard of the cluster its jobs run on (each job
    record's `dashboard_url` points into it). Behind the token, unlike /readyz: probes need
    no addresses."""
    return ServiceInfo(version=package_version(), ray_dashboard_url=settings.ray_dashboard_url)
