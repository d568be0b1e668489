"""Configuration of the rayfleet Serve application: the gateway and the engine pools.

One pydantic model, used three ways: ``rayfleet up`` fills it from its flags, a Serve
config file passes it as the application's ``args`` (``serve deploy``), and tests build it
directly. Validation errors therefore read the same everywhere.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from autoscaling.spec import MetricSource, PodAutoscaler
from engines.config import EngineConfig, EngineKind
from fleet.api import LABEL_MODEL
from rayfleet.protocol.users import key_digest
from serve_apps.routing import STRATEGY_CLASSES, known_strategy, options_model

StrategyName = Annotated[str, AfterValidator(known_strategy)]


def _options_fit_their_strategy(value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    for name, options in value.items():
        try:
            options_model(name).model_validate(options)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            known = ", ".join(options_model(name).model_fields) or "none"
            raise ValueError(f"{name}: {problems} (its options: {known})") from None
    return value


# Per strategy, its tuning knobs, checked against the strategy's constructor at load time.
StrategyOptions = Annotated[dict[StrategyName, dict[str, Any]], AfterValidator(_options_fit_their_strategy)]


class PoolConfig(BaseModel):
    """A set of identical engines serving one model, started as Ray actors."""

    model_config = ConfigDict(extra="forbid")

    replicas: int = Field(1, ge=0)
    engine: EngineKind = "sim"
    engine_config: EngineConfig = Field(default_factory=EngineConfig)
    num_gpus_per_engine: float = Field(0.0, ge=0.0, description="Ray GPUs reserved per engine actor (vLLM: the TP size)")


class AutoscalingConfig(BaseModel):
    """A model's autoscaler: a PodAutoscaler whose target is the model's engine pool."""

    model_config = ConfigDict(extra="forbid")

    strategy: Literal["HPA", "KPA", "APA"]
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(8, ge=1)
    metrics: list[MetricSource] = Field(
        default_factory=lambda: [MetricSource(metricSourceType="gateway", targetMetric="in_flight", targetValue=32)],
        description="what to scale on; default: the gateway's requests in flight, 32 per engine",
    )
    annotations: dict[str, str] = Field(
        default_factory=dict, description="the policy's knobs, e.g. {'autoscaling.rayfleet.io/stable-window': '60s'}"
    )

    @property
    def scales_from_zero(self) -> bool:
        """Whether the pool may have no engine at all, so the gateway must hold its requests."""
        return self.min_replicas == 0

    def pod_autoscaler(self, model: str) -> PodAutoscaler:
        """The PodAutoscaler this config stands for (validated: bounds, annotations)."""
        return PodAutoscaler.model_validate({
            "metadata": {"name": model.rsplit("/", 1)[-1].lower(), "annotations": self.annotations},
            "spec": {"scaleTargetRef": {"kind": "EnginePool", "name": model}, "minReplicas": self.min_replicas,
                     "maxReplicas": self.max_replicas, "metricsSources": [m.model_dump() for m in self.metrics],
                     "scalingStrategy": self.strategy},
        })  # fmt: skip


class ModelConfig(BaseModel):
    """Per-model settings: where its endpoints come from and how to route among them."""

    model_config = ConfigDict(extra="forbid")

    name: str
    pool: PoolConfig | None = None
    static_endpoints: list[str] = Field(default_factory=list, description="URLs of engines started elsewhere")
    default_strategy: StrategyName | None = None
    strategy_options: StrategyOptions = Field(
        default_factory=dict, description="per strategy, options for this model over the gateway's"
    )
    autoscaling: AutoscalingConfig | None = Field(None, description="scale the pool with HPA, KPA or APA")
    prefix_index: Literal["approximate", "events"] = Field(
        "approximate",
        description="where prefix strategies learn what engines cache: the gateway's own routing "
        "history (approximate) or the engines' KV events through the shared kvcache index (events)",
    )

    @model_validator(mode="after")
    def _autoscaler_is_valid(self) -> ModelConfig:
        if self.autoscaling is not None:
            if self.pool is None:
                raise ValueError(f"model {self.name!r} has autoscaling but no pool to scale")
            self.autoscaling.pod_autoscaler(self.name)  # raises on bad bounds or annotations
        return self

    @model_validator(mode="after")
    def _pool_serves_this_model(self) -> ModelConfig:
        """A pool's engines answer to the model's name; fill it in when the config leaves it out."""
        if self.pool is None:
            return self
        engine = self.pool.engine_config
        if engine.served_model_name is None and engine.model != self.name:
            self.pool.engine_config = engine.model_copy(update={"served_model_name": self.name})
        elif engine.name != self.name:
            raise ValueError(f"the pool of model {self.name!r} serves {engine.name!r}")
        return self


class KVIndexConfig(BaseModel):
    """The shared KV-event index (``kvcache/``), used by models with ``prefix_index: events``."""

    model_config = ConfigDict(extra="forbid")

    num_shards: int = Field(4, ge=1, le=64)
    max_blocks_per_shard: int = Field(2_500_000, ge=1_000, description="LRU bound; ~90 bytes per block")
    # On 2 idle cores a 4-shard lookup of a 2k-token prompt takes ~4 ms p50 and ~8 ms p99
    # (``rayfleet bench kvindex``); 20 ms keeps misses rare and is still far below the
    # prefill a cache hit saves.
    lookup_budget_s: float = Field(
        0.02, gt=0, le=1.0, description="longest a request waits for the index before routing on the local view"
    )


class GatewayConfig(BaseModel):
    """Gateway replica settings."""

    model_config = ConfigDict(extra="forbid")

    default_strategy: StrategyName = "least-request"
    num_replicas: int = Field(1, ge=1)
    max_ongoing_requests: int = Field(4096, ge=1)
    connect_timeout_s: float = Field(5.0, gt=0)
    read_timeout_s: float = Field(600.0, gt=0, description="longest silence allowed from an engine mid-response")
    seed: int | None = None
    scrape_interval_s: float = Field(0.5, gt=0, le=60, description="how often each engine's /metrics is read")
    activation_timeout_s: float = Field(
        120.0, ge=0, description="longest a request waits for an engine of a pool scaled to zero to start"
    )
    kv_index: KVIndexConfig = Field(default_factory=KVIndexConfig)
    strategy_options: StrategyOptions = Field(
        default_factory=dict,
        description="per strategy, its tuning knobs, e.g. {'prefix-cache': {'imbalance_abs': 4}}",
    )


class UsersConfig(BaseModel):
    """Users, API keys and per-user RPM/TPM limits (``serve_apps/users``)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="identify callers and enforce their limits; serve the user API")
    store: str = Field(
        "embedded",
        description="'embedded' (a SQLite file on this node, for one machine) or a Redis URL redis://HOST:PORT/DB",
    )
    embedded_path: str | None = Field(None, description="the embedded store's file; default $RAYFLEET_HOME/users.sqlite3")
    admin_token: str | None = Field(
        None, min_length=8, repr=False, description="bearer token of the user API; unset: the API is closed"
    )
    admin_token_sha256: str | None = Field(
        None, pattern=r"^[0-9a-f]{64}$",
        description="instead of admin_token, its SHA-256 (hex): a config anyone may read (the Ray dashboard "
        "shows Serve configs) then holds nothing that opens the user API",
    )  # fmt: skip
    require_api_keys: bool = Field(False, description="trust only API keys, not a bare 'user' header")
    anonymous: Literal["allow", "reject"] = Field(
        "allow", description="requests with no identity: served without limits, or refused with 401"
    )
    on_store_error: Literal["open", "closed"] = Field(
        "open", description="store unreachable: admit without limits (open) or answer 503 (closed)"
    )
    store_timeout_s: float = Field(0.25, gt=0, le=10, description="longest wait for the store per call")
    store_retry_s: float = Field(1.0, gt=0, le=300, description="after a store failure, how long to skip it")
    output_reservation_tokens: int = Field(
        256, ge=0, description="tokens reserved against TPM for a request that sets no max_tokens"
    )

    @model_validator(mode="after")
    def _known_store(self) -> UsersConfig:
        if self.store != "embedded" and not self.store.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"users.store must be 'embedded' or a redis:// URL, not {self.store!r}")
        if self.admin_token is not None and self.admin_token_sha256 is not None:
            raise ValueError("set users.admin_token or users.admin_token_sha256, not both")
        return self

    def admin_digest(self) -> str | None:
        """The admin token's ``key_digest``, whichever way it was given; None: the user API is closed."""
        return key_digest(self.admin_token) if self.admin_token is not None else self.admin_token_sha256


class KubernetesDiscoveryConfig(BaseModel):
    """Endpoints from Kubernetes pods (``serve_apps/kube_discovery.py``): Ready pods that carry
    the ``rayfleet.io/model`` label, such as the heads of a RayClusterFleet's clusters."""

    model_config = ConfigDict(extra="forbid")

    namespace: str | None = Field(None, description="where to look for pods; unset: every namespace")
    label_selector: str = Field(LABEL_MODEL, description="which pods serve models")
    kubeconfig: str | None = Field(
        None, description="a kubeconfig file; unset: the in-cluster service account (inside a KubeRay pod)"
    )


class AppConfig(BaseModel):
    """The whole rayfleet Serve application."""

    model_config = ConfigDict(extra="forbid")

    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    users: UsersConfig = Field(default_factory=UsersConfig)
    models: list[ModelConfig] = Field(default_factory=list)
    kubernetes_discovery: KubernetesDiscoveryConfig | None = Field(
        None, description="also route to serving pods found in Kubernetes"
    )

    @model_validator(mode="after")
    def _unique_models(self) -> AppConfig:
        names = [m.name for m in self.models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"model listed twice: {', '.join(duplicates)}")
        return self

    @property
    def uses_kv_events(self) -> bool:
        return any(model.prefix_index == "events" for model in self.models)

    def routing_options(self, model: ModelConfig | None = None) -> dict[str, dict[str, Any]]:
        """The options each strategy is built with for ``model`` (None: models not in the
        config, such as adapters), lowest precedence first:

        1. signal ages follow the scrape interval (four missed scrapes make a metric stale);
        2. prefix strategies hash blocks as the model's pool engines do (algorithm, seed and
           block size), so gateway hashes equal engine hashes without extra configuration;
        3. the gateway's ``strategy_options``; 4. the model's ``strategy_options``.
        """
        layers: list[dict[str, dict[str, Any]]] = [
            {"least-kv-cache": {"max_age_s": 4 * self.gateway.scrape_interval_s}}
        ]
        engine = model.pool.engine_config if model is not None and model.pool is not None else None
        if engine is not None and engine.hash_seed is not None:
            hashing = {"hash_algo": engine.prefix_caching_hash_algo, "hash_seed": engine.hash_seed,
                       "block_size": engine.block_size}  # fmt: skip
            layers.append({name: hashing for name in STRATEGY_CLASSES if "hash_algo" in options_model(name).model_fields})
        layers.append(self.gateway.strategy_options)
        if model is not None:
            layers.append(model.strategy_options)
        merged: dict[str, dict[str, Any]] = {}
        for layer in layers:
            for name, options in layer.items():
                merged[name] = {**merged.get(name, {}), **options}
        return merged
