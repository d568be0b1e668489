"""The PodAutoscaler wire format and the knobs its annotations set.

A ``PodAutoscaler`` names a scale target, its replica bounds, the metrics to scale on and a
strategy (HPA, KPA or APA). It follows AIBrix's CRD (``autoscaling.aibrix.ai/v1alpha1``) field
for field where the fields mean the same thing, so a user can bring an AIBrix manifest and
change little more than ``apiVersion``; the Kubernetes CRD in the fleet work serialises these
models as they are.

The strategies' tuning knobs are annotations, as in Knative and AIBrix, read under our prefix
``autoscaling.rayfleet.io/<knob>``. AIBrix's keys are accepted too, with lower precedence:
``autoscaling.aibrix.ai/<knob>`` (its current prefix) and the historic strategy-specific
``kpa.autoscaling.aibrix.ai/<knob>`` and ``apa.autoscaling.aibrix.ai/<knob>``. A knob under our
prefix that the strategy does not have is an error (a typo would otherwise be silently
ignored); an AIBrix knob we do not implement (``scale-to-zero``, ``storm-service-mode``, ...)
is ignored so that AIBrix manifests load.

Knobs, by strategy (defaults are the sources', except KPA's scale-down delay):

KPA (Knative's ``config-autoscaler`` defaults)
    ``stable-window`` 60s (6s..1h), ``panic-window`` 10% of the stable window (at least 1s),
    ``panic-threshold`` 2.0 (a ratio: 2.0 = Knative's 200%; "200%" is accepted, 1.1..10),
    ``max-scale-up-rate`` 1000, ``max-scale-down-rate`` 2, ``scale-down-delay`` 5m (..1h;
    Knative's is 0s, see ``KpaSettings``),
    ``activation-scale`` 1, ``target-burst-capacity`` 211 (-1 = unlimited),
    ``target-utilization-percentage`` 70 (only for the burst capacity: a pod's capacity is
    targetValue / utilization), ``sync-period`` 2s (Knative's tick interval).
APA (AIBrix's ``apa.autoscaling.aibrix.ai`` defaults)
    ``up-fluctuation-tolerance`` 0.1, ``down-fluctuation-tolerance`` 0.2, ``window`` 60s,
    ``max-scale-up-rate`` 2, ``max-scale-down-rate`` 2, ``sync-period`` 10s (AIBrix's resync).
    AIBrix's current ``scale-up-tolerance`` / ``scale-down-tolerance`` map to the two
    tolerances.
HPA (Kubernetes' ``autoscaling/v2`` defaults; names follow ``spec.behavior``)
    ``tolerance`` 0.1 (both directions, the controller's ``--horizontal-pod-autoscaler-tolerance``),
    ``scale-up-tolerance`` / ``scale-down-tolerance`` (per direction, ``behavior.*.tolerance``),
    ``scale-up-stabilization-window`` 0s, ``scale-down-stabilization-window`` 300s (..1h),
    ``scale-up-policies`` "Percent:100/15s,Pods:4/15s", ``scale-up-select-policy`` Max,
    ``scale-down-policies`` "Percent:100/15s", ``scale-down-select-policy`` Max
    (Max, Min or Disabled), ``sync-period`` 15s. AIBrix's ``scale-up-cooldown-window`` and
    ``scale-down-cooldown-window`` map to the stabilization windows.

Durations are Go duration strings ("60s", "30m", "1h30m", "1.5h", "500ms") or plain seconds.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

API_VERSION = "autoscaling.rayfleet.io/v1alpha1"
AIBRIX_API_VERSION = "autoscaling.aibrix.ai/v1alpha1"
ANNOTATION_PREFIX = "autoscaling.rayfleet.io"
AIBRIX_ANNOTATION_PREFIX = "autoscaling.aibrix.ai"
AIBRIX_STRATEGY_PREFIXES = {"KPA": "kpa.autoscaling.aibrix.ai", "APA": "apa.autoscaling.aibrix.ai"}

ScalingStrategy = Literal["HPA", "KPA", "APA"]
MetricSourceType = Literal["pod", "gateway", "external"]

GATEWAY_IN_FLIGHT = "in_flight"
GATEWAY_QUEUED = "queued"
GATEWAY_METRICS = (GATEWAY_IN_FLIGHT, GATEWAY_QUEUED)


# ---------------------------------------------------------------------------------------
# The PodAutoscaler resource
# ---------------------------------------------------------------------------------------


class ScaleTargetRef(BaseModel):
    """What to scale: a Kubernetes-style object reference.

    ``kind`` is free text so new target kinds need no schema change; the runners know:
    ``EnginePool`` (``rayfleet up``'s local pool; ``name`` is the model name),
    ``ServeDeployment`` (``name`` is "app/deployment"), ``Deployment`` and ``RayClusterFleet``
    (through its ``/scale`` subresource).
    """

    model_config = ConfigDict(extra="forbid")

    apiVersion: str | None = None
    kind: str = Field(min_length=1)
    name: str = Field(min_length=1)
    namespace: str | None = None


class MetricSource(BaseModel):
    """One signal to scale on and its per-replica target.

    ``pod``: a Prometheus metric scraped from every ready engine's ``/metrics`` (for example
    ``vllm:num_requests_waiting`` or ``vllm:kv_cache_usage_perc``). ``gateway``: the gateway's own
    per-model count of requests in flight (``in_flight``) or waiting for an endpoint
    (``queued``); unlike an engine metric it is still there when no replica is ready, which is
    what lets a target scale up from zero. ``external``: one value read from ``endpoint``.
    ``targetValue`` is always per replica; AIBrix writes it as a string, which is accepted.
    """

    model_config = ConfigDict(extra="forbid")

    metricSourceType: MetricSourceType
    targetMetric: str = Field(min_length=1)
    targetValue: float = Field(gt=0)
    protocolType: Literal["http", "https"] = "http"
    port: int | None = Field(None, ge=1, le=65535)
    path: str = "/metrics"
    endpoint: str | None = None

    @field_validator("targetValue", mode="before")
    @classmethod
    def _number_from_string(cls, value: Any) -> Any:
        """AIBrix's CRD types targetValue as a string ("0.5"): read it as the number it is."""
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise ValueError(f'targetValue {value!r} is not a number; write it like 0.5 or "0.5"') from None
        return value

    @field_validator("path")
    @classmethod
    def _absolute_path(cls, value: str) -> str:
        """AIBrix manifests write ``path: metrics``; a URL path starts with a slash."""
        return value if value.startswith("/") else f"/{value}"

    @model_validator(mode="after")
    def _source_fields(self) -> MetricSource:
        if self.metricSourceType == "external" and not self.endpoint:
            raise ValueError(
                f"external metric {self.targetMetric!r} needs an endpoint (host:port) to read the value from"
            )
        if self.metricSourceType == "gateway" and self.targetMetric not in GATEWAY_METRICS:
            raise ValueError(
                f"gateway metric {self.targetMetric!r} is not one the gateway keeps; "
                f"use {GATEWAY_IN_FLIGHT!r} (requests in flight) or {GATEWAY_QUEUED!r} (requests waiting for an endpoint)"
            )
        return self


class PodAutoscalerSpec(BaseModel):
    """Bounds, signals and strategy for one scale target."""

    model_config = ConfigDict(extra="forbid")

    scaleTargetRef: ScaleTargetRef
    minReplicas: int = Field(1, ge=0)
    maxReplicas: int = Field(ge=1)
    metricsSources: list[MetricSource] = Field(min_length=1)
    scalingStrategy: ScalingStrategy

    @model_validator(mode="after")
    def _consistent(self) -> PodAutoscalerSpec:
        if self.minReplicas > self.maxReplicas:
            raise ValueError(
                f"minReplicas ({self.minReplicas}) is above maxReplicas ({self.maxReplicas}); "
                "raise maxReplicas or lower minReplicas"
            )
        names = [source.targetMetric for source in self.metricsSources]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            # Observations name their source by metric, so two sources may not share one.
            raise ValueError(f"metricsSources name {', '.join(repeated)} more than once; list each metric once")
        return self

    def source(self, metric: str) -> MetricSource:
        """The source an observation of ``metric`` belongs to."""
        for source in self.metricsSources:
            if source.targetMetric == metric:
                return source
        known = ", ".join(s.targetMetric for s in self.metricsSources)
        raise ValueError(f"no metricsSource is named {metric!r}; this autoscaler scales on {known}")


class ObjectMeta(BaseModel):
    """The part of Kubernetes' metadata we read; server-set fields (uid, ...) are ignored."""

    model_config = ConfigDict(extra="ignore")

    name: str = Field(min_length=1)
    namespace: str = "default"
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class PodAutoscaler(BaseModel):
    """The whole resource. Its annotations are parsed on load, so a bad knob fails here."""

    model_config = ConfigDict(extra="ignore")  # a live object also carries status

    apiVersion: Literal["autoscaling.rayfleet.io/v1alpha1", "autoscaling.aibrix.ai/v1alpha1"] = API_VERSION
    kind: Literal["PodAutoscaler"] = "PodAutoscaler"
    metadata: ObjectMeta
    spec: PodAutoscalerSpec

    @model_validator(mode="after")
    def _annotations_parse(self) -> PodAutoscaler:
        self.settings()
        return self

    def settings(self) -> KpaSettings | ApaSettings | HpaSettings:
        return settings_from_annotations(self.spec.scalingStrategy, self.metadata.annotations)


# ---------------------------------------------------------------------------------------
# Parsed knobs
# ---------------------------------------------------------------------------------------

HOUR = 3600.0


class KpaSettings(BaseModel):
    """Knative's decider knobs (``config-autoscaler`` defaults and bounds)."""

    model_config = ConfigDict(extra="forbid")

    stable_window: float = Field(60.0, ge=6.0, le=HOUR)
    # Knative derives it as panic-window-percentage (10) of the stable window, at least one
    # metric bucket (1 s); the validator below fills it in when it is not given.
    panic_window: float = Field(ge=1.0)
    panic_threshold: float = Field(2.0, ge=1.1, le=10.0)
    max_scale_up_rate: float = Field(1000.0, gt=1.0)
    max_scale_down_rate: float = Field(2.0, gt=1.0)
    # Knative's default is 0 s, sized for containers that start in a second. An LLM engine
    # takes about a minute to start and bursts come back within minutes: with 0 s, KPA gives
    # the replicas back right after a burst and meets the next one cold (on the Azure code
    # trace: 51% SLO attainment against HPA's 90%, `rayfleet bench autoscale`). Five minutes
    # is HPA's scale-down stabilisation; AIBrix's historic KPA default was 30 minutes.
    scale_down_delay: float = Field(300.0, ge=0.0, le=HOUR)
    activation_scale: int = Field(1, ge=1)
    target_burst_capacity: float = Field(211.0, ge=-1.0)
    target_utilization_percentage: float = Field(70.0, gt=0.0, le=100.0)
    sync_period: float = Field(2.0, gt=0.0)

    @model_validator(mode="before")
    @classmethod
    def _default_panic_window(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("panic_window") is None:
            stable = float(data.get("stable_window", cls.model_fields["stable_window"].default))
            data = {**data, "panic_window": max(1.0, stable * 0.10)}
        return data

    @model_validator(mode="after")
    def _windows_nest(self) -> KpaSettings:
        if self.panic_window > self.stable_window:
            raise ValueError(
                f"panic-window ({self.panic_window:g}s) is longer than stable-window ({self.stable_window:g}s); "
                "the panic window must fit inside the stable window"
            )
        if -1.0 < self.target_burst_capacity < 0.0:
            raise ValueError("target-burst-capacity must be -1 (unlimited), 0 or positive")
        return self


class ApaSettings(BaseModel):
    """AIBrix's APA knobs (historic ``apa.autoscaling.aibrix.ai`` defaults)."""

    model_config = ConfigDict(extra="forbid")

    up_fluctuation_tolerance: float = Field(0.1, ge=0.0)
    down_fluctuation_tolerance: float = Field(0.2, ge=0.0, lt=1.0)
    window: float = Field(60.0, ge=1.0, le=HOUR)
    max_scale_up_rate: float = Field(2.0, gt=1.0)
    max_scale_down_rate: float = Field(2.0, gt=1.0)
    sync_period: float = Field(10.0, gt=0.0)


class HpaScalingPolicy(BaseModel):
    """One ``behavior.scaleUp/scaleDown.policies[]`` entry: change at most ``value`` pods or
    percent of the replicas the period started with, per ``period`` seconds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["Pods", "Percent"]
    value: int = Field(gt=0)
    period: float = Field(ge=1.0, le=1800.0)


SelectPolicy = Literal["Max", "Min", "Disabled"]


def _default_scale_up_policies() -> list[HpaScalingPolicy]:
    return [
        HpaScalingPolicy(type="Percent", value=100, period=15.0),
        HpaScalingPolicy(type="Pods", value=4, period=15.0),
    ]


def _default_scale_down_policies() -> list[HpaScalingPolicy]:
    return [HpaScalingPolicy(type="Percent", value=100, period=15.0)]


class HpaSettings(BaseModel):
    """Kubernetes' HPA knobs: the controller's tolerance and sync period, and ``spec.behavior``
    with the API server's defaults."""

    model_config = ConfigDict(extra="forbid")

    scale_up_tolerance: float = Field(0.1, ge=0.0)
    scale_down_tolerance: float = Field(0.1, ge=0.0, lt=1.0)
    scale_up_stabilization_window: float = Field(0.0, ge=0.0, le=HOUR)
    scale_down_stabilization_window: float = Field(300.0, ge=0.0, le=HOUR)
    scale_up_policies: list[HpaScalingPolicy] = Field(default_factory=_default_scale_up_policies)
    scale_up_select_policy: SelectPolicy = "Max"
    scale_down_policies: list[HpaScalingPolicy] = Field(default_factory=_default_scale_down_policies)
    scale_down_select_policy: SelectPolicy = "Max"
    sync_period: float = Field(15.0, gt=0.0)

    @model_validator(mode="after")
    def _policies_present(self) -> HpaSettings:
        for direction in ("up", "down"):
            if getattr(self, f"scale_{direction}_select_policy") != "Disabled" and not getattr(
                self, f"scale_{direction}_policies"
            ):
                raise ValueError(
                    f"scale-{direction}-policies is empty; give at least one policy or set "
                    f"scale-{direction}-select-policy to Disabled"
                )
        return self


# ---------------------------------------------------------------------------------------
# Annotation values
# ---------------------------------------------------------------------------------------

_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": HOUR}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")


def parse_duration(text: str) -> float:
    """Seconds in a Go duration ("1h30m", "90s", "1.5h") or a plain number of seconds.

    Go's syntax because Knative and AIBrix annotations use it (``time.ParseDuration``); plain
    numbers because that is what people type. Negative durations mean nothing here.
    """
    text = text.strip()
    try:
        seconds = float(text)
    except ValueError:
        if not text or _DURATION_PART.sub("", text) != "":
            raise ValueError("not a duration") from None
        seconds = sum(float(number) * _DURATION_UNITS[unit] for number, unit in _DURATION_PART.findall(text))
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError("not a non-negative duration")
    return seconds


def _parse_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError("not a number") from None
    if not math.isfinite(value):
        raise ValueError("not a finite number")
    return value


def _parse_integer(text: str) -> int:
    value = _parse_number(text)
    if value != int(value):
        raise ValueError("not a whole number")
    return int(value)


def _parse_ratio(text: str) -> float:
    """A ratio (2.0) or a percentage ("200%", Knative's panic-threshold-percentage form)."""
    text = text.strip()
    return _parse_number(text[:-1]) / 100.0 if text.endswith("%") else _parse_number(text)


def _parse_policies(text: str) -> list[HpaScalingPolicy]:
    """``Type:value/period`` entries separated by commas, e.g. "Percent:100/15s,Pods:4/15s"."""
    policies = []
    for entry in filter(None, (part.strip() for part in text.split(","))):
        match = re.fullmatch(r"(\w+)\s*:\s*(\d+)\s*/\s*(\S+)", entry)
        kind = match and {"pods": "Pods", "percent": "Percent"}.get(match.group(1).lower())
        if not kind:
            raise ValueError(f"not a policy list ({entry!r} is not Type:value/period)")
        policies.append(HpaScalingPolicy(type=kind, value=int(match.group(2)), period=parse_duration(match.group(3))))
    return policies


def _parse_select_policy(text: str) -> str:
    value = {"max": "Max", "min": "Min", "disabled": "Disabled"}.get(text.strip().lower())
    if value is None:
        raise ValueError("not a select policy")
    return value


@dataclass(frozen=True)
class _Knob:
    """One annotation: the settings fields it sets, how to read it, and how to write it right."""

    fields: tuple[str, ...]
    parse: Callable[[str], Any]
    hint: str


_DURATION_HINT = "write a Go duration such as '60s', '30m' or '1h30m', or a number of seconds"
_RATE_HINT = "write a factor above 1.0, e.g. 2.0 to at most double (or halve) the replicas per step"


def _tolerance_knob(field: str) -> _Knob:
    return _Knob((field,), _parse_number, "write a fraction of the target such as 0.1 (10%)")


_KPA_KNOBS: dict[str, _Knob] = {
    "stable-window": _Knob(("stable_window",), parse_duration, f"{_DURATION_HINT}, between 6s and 1h"),
    "panic-window": _Knob(
        ("panic_window",), parse_duration, f"{_DURATION_HINT}, at least 1s and at most the stable window"
    ),
    "panic-threshold": _Knob(
        ("panic_threshold",), _parse_ratio, "write a ratio between 1.1 and 10, e.g. 2.0 (or '200%')"
    ),
    "max-scale-up-rate": _Knob(("max_scale_up_rate",), _parse_number, _RATE_HINT),
    "max-scale-down-rate": _Knob(("max_scale_down_rate",), _parse_number, _RATE_HINT),
    "scale-down-delay": _Knob(("scale_down_delay",), parse_duration, f"{_DURATION_HINT}, at most 1h"),
    "activation-scale": _Knob(("activation_scale",), _parse_integer, "write a whole number of replicas, 1 or more"),
    "target-burst-capacity": _Knob(
        ("target_burst_capacity",), _parse_number, "write a number of requests, 0 to disable, or -1 for unlimited"
    ),
    "target-utilization-percentage": _Knob(
        ("target_utilization_percentage",), _parse_number, "write a percentage above 0 and at most 100, e.g. 70"
    ),
    "sync-period": _Knob(("sync_period",), parse_duration, _DURATION_HINT),
}

_APA_KNOBS: dict[str, _Knob] = {
    "up-fluctuation-tolerance": _tolerance_knob("up_fluctuation_tolerance"),
    "down-fluctuation-tolerance": _tolerance_knob("down_fluctuation_tolerance"),
    "window": _Knob(("window",), parse_duration, f"{_DURATION_HINT}, between 1s and 1h"),
    "max-scale-up-rate": _Knob(("max_scale_up_rate",), _parse_number, _RATE_HINT),
    "max-scale-down-rate": _Knob(("max_scale_down_rate",), _parse_number, _RATE_HINT),
    "sync-period": _Knob(("sync_period",), parse_duration, _DURATION_HINT),
}

_POLICIES_HINT = "write Type:value/period entries separated by commas, e.g. 'Percent:100/15s,Pods:4/15s'"
_SELECT_HINT = "write Max, Min or Disabled"

# Order matters: ``tolerance`` sets both directions first, so the per-direction knobs win.
_HPA_KNOBS: dict[str, _Knob] = {
    "tolerance": _Knob(
        ("scale_up_tolerance", "scale_down_tolerance"),
        _parse_number,
        "write a fraction of the target such as 0.1 (10%)",
    ),
    "scale-up-tolerance": _tolerance_knob("scale_up_tolerance"),
    "scale-down-tolerance": _tolerance_knob("scale_down_tolerance"),
    "scale-up-stabilization-window": _Knob(
        ("scale_up_stabilization_window",), parse_duration, f"{_DURATION_HINT}, at most 1h"
    ),
    "scale-down-stabilization-window": _Knob(
        ("scale_down_stabilization_window",), parse_duration, f"{_DURATION_HINT}, at most 1h"
    ),
    "scale-up-policies": _Knob(("scale_up_policies",), _parse_policies, f"{_POLICIES_HINT}; periods 1s..30m"),
    "scale-up-select-policy": _Knob(("scale_up_select_policy",), _parse_select_policy, _SELECT_HINT),
    "scale-down-policies": _Knob(("scale_down_policies",), _parse_policies, f"{_POLICIES_HINT}; periods 1s..30m"),
    "scale-down-select-policy": _Knob(("scale_down_select_policy",), _parse_select_policy, _SELECT_HINT),
    "sync-period": _Knob(("sync_period",), parse_duration, _DURATION_HINT),
}

_KNOBS: dict[str, dict[str, _Knob]] = {"KPA": _KPA_KNOBS, "APA": _APA_KNOBS, "HPA": _HPA_KNOBS}
_SETTINGS: dict[str, type[KpaSettings] | type[ApaSettings] | type[HpaSettings]] = {
    "KPA": KpaSettings,
    "APA": ApaSettings,
    "HPA": HpaSettings,
}

# AIBrix's current names for knobs we name after its historic APA annotations or Kubernetes' behavior.
_AIBRIX_ALIASES: dict[str, dict[str, str]] = {
    "KPA": {},
    "APA": {"scale-up-tolerance": "up-fluctuation-tolerance", "scale-down-tolerance": "down-fluctuation-tolerance"},
    "HPA": {
        "scale-up-cooldown-window": "scale-up-stabilization-window",
        "scale-down-cooldown-window": "scale-down-stabilization-window",
    },
}


def _prefixes(strategy: ScalingStrategy) -> list[str]:
    """Prefixes in precedence order: ours, AIBrix's current one, AIBrix's historic one."""
    historic = AIBRIX_STRATEGY_PREFIXES.get(strategy)
    return [ANNOTATION_PREFIX, AIBRIX_ANNOTATION_PREFIX, *([historic] if historic else [])]


def _given_knobs(strategy: ScalingStrategy, annotations: dict[str, str]) -> dict[str, tuple[str, str]]:
    """knob -> (annotation key, raw value) for every knob set, the highest-precedence key winning."""
    knobs = _KNOBS[strategy]
    given: dict[str, tuple[int, str, str]] = {}
    prefixes = _prefixes(strategy)
    for key, raw in annotations.items():
        prefix, _, name = key.partition("/")
        if prefix not in prefixes:
            continue
        if prefix == ANNOTATION_PREFIX and name not in knobs:
            elsewhere = [other for other, table in _KNOBS.items() if other != strategy and name in table]
            where = f"it belongs to {' and '.join(elsewhere)}" if elsewhere else "no strategy has it"
            raise ValueError(
                f"annotation {key}: {strategy} has no knob {name!r} ({where}); {strategy} knobs are {', '.join(knobs)}"
            )
        if prefix != ANNOTATION_PREFIX:
            name = _AIBRIX_ALIASES[strategy].get(name, name)
            if name not in knobs:
                continue  # an AIBrix knob we do not implement: ignored so AIBrix manifests load
        rank = prefixes.index(prefix)
        if name not in given or rank < given[name][0]:
            given[name] = (rank, key, raw)
    return {name: (key, raw) for name, (_, key, raw) in given.items()}


def settings_from_annotations(
    strategy: ScalingStrategy, annotations: dict[str, str]
) -> KpaSettings | ApaSettings | HpaSettings:
    """Parse the strategy's knobs out of a PodAutoscaler's annotations.

    Raises ``ValueError`` naming the annotation, the value and how to write it instead.
    """
    knobs = _KNOBS[strategy]
    given = _given_knobs(strategy, annotations)
    values: dict[str, Any] = {}
    source_of_field: dict[str, str] = {}
    for name, knob in knobs.items():  # table order: general knobs before the ones that refine them
        if name not in given:
            continue
        key, raw = given[name]
        try:
            value = knob.parse(raw)
        except ValueError as exc:  # pydantic's ValidationError included
            raise ValueError(f"annotation {key}={raw!r} is {_reason(exc)}; {knob.hint}") from None
        for field in knob.fields:
            values[field] = value
            source_of_field[field] = name
    try:
        return _SETTINGS[strategy](**values)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else ""
            if field in source_of_field:
                name = source_of_field[field]
                key, raw = given[name]
                problems.append(f"annotation {key}={raw!r}: {error['msg']}; {knobs[name].hint}")
            else:
                problems.append(f"{strategy} annotations: {error['msg'].removeprefix('Value error, ')}")
        raise ValueError("; ".join(problems)) from None


def _reason(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "out of range (" + "; ".join(e["msg"] for e in exc.errors()) + ")"
    return str(exc)  # the parsers' messages read "not a ..."
