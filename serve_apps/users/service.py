"""``UserService``: the Serve deployment that owns the user API.

The gateway forwards user-API calls here through a DeploymentHandle (admin calls are rare,
so the ~3 ms hop does not matter there). ``admit`` and ``settle`` are here too, for other
Serve applications that want rayfleet's limits; the gateway's own hot path talks to the
store directly (``limiter``), which ``rayfleet bench ratelimit`` measures against this hop.
"""

from __future__ import annotations

from ray import serve

from serve_apps.config import UsersConfig
from serve_apps.usage import Usage
from serve_apps.users import open_store
from serve_apps.users.api import ApiResponse, UserApi
from serve_apps.users.store import Admission, Identity


@serve.deployment(ray_actor_options={"num_cpus": 0}, logging_config={"enable_access_log": False})
class UserService:
    def __init__(self, settings: dict) -> None:
        self.settings = UsersConfig.model_validate(settings)
        self.store = open_store(self.settings)
        self.api = UserApi(self.store, self.settings.admin_digest())

    async def handle(self, method: str, path: str, authorization: str, body: bytes) -> ApiResponse:
        return await self.api.handle(method, path, authorization, body)

    async def admit(self, identity: Identity, admission_id: str, token_estimate: int) -> Admission:
        return await self.store.admit(identity, admission_id, token_estimate)

    async def settle(self, user: str, admission_id: str, usage: Usage, reserved: int) -> None:
        await self.store.settle(user, admission_id, usage.total_tokens, reserved)

    async def __del__(self) -> None:
        await self.store.close()
