"""PodAutoscaler parsing: the wire format, AIBrix manifests, annotation knobs and their errors."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from autoscaling.spec import (
    ApaSettings,
    HpaScalingPolicy,
    HpaSettings,
    KpaSettings,
    MetricSource,
    PodAutoscaler,
    PodAutoscalerSpec,
    parse_duration,
    settings_from_annotations,
)

POD_SOURCE = {
    "metricSourceType": "pod",
    "targetMetric": "vllm:num_requests_waiting",
    "targetValue": 5,
}


def _spec(**overrides: object) -> dict:
    spec: dict = {
        "scaleTargetRef": {"kind": "EnginePool", "name": "llama"},
        "maxReplicas": 8,
        "metricsSources": [POD_SOURCE],
        "scalingStrategy": "KPA",
    }
    spec.update(overrides)
    return spec


def test_spec_defaults() -> None:
    spec = PodAutoscalerSpec.model_validate(_spec())
    assert spec.minReplicas == 1
    source = spec.metricsSources[0]
    assert (source.protocolType, source.path, source.port, source.endpoint) == ("http", "/metrics", None, None)
    assert spec.source("vllm:num_requests_waiting") is source


def test_aibrix_manifest_loads_with_its_own_api_version_and_annotations() -> None:
    # The shape of AIBrix's benchmark manifests (benchmarks/scenarios/autoscaling/*.yaml).
    manifest = {
        "apiVersion": "autoscaling.aibrix.ai/v1alpha1",
        "kind": "PodAutoscaler",
        "metadata": {
            "name": "deepseek-llm-7b-chat-kpa",
            "namespace": "default",
            "labels": {"app.kubernetes.io/name": "aibrix"},
            "annotations": {
                "kpa.autoscaling.aibrix.ai/scale-down-delay": "3m",
                "kpa.autoscaling.aibrix.ai/panic-window": "10s",
                "autoscaling.aibrix.ai/scale-to-zero": "false",  # an AIBrix knob we do not have: ignored
            },
            "uid": "6f9c…",  # server-set metadata is ignored
        },
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "deepseek-llm-7b-chat"},
            "minReplicas": 1,
            "maxReplicas": 10,
            "metricsSources": [
                {
                    "metricSourceType": "pod",
                    "protocolType": "http",
                    "port": "8000",
                    "path": "metrics",
                    "targetMetric": "gpu_cache_usage_perc",
                    "targetValue": "0.5",
                }
            ],
            "scalingStrategy": "KPA",
        },
        "status": {"desiredScale": 3},
    }
    pa = PodAutoscaler.model_validate(manifest)
    source = pa.spec.metricsSources[0]
    assert source.targetValue == 0.5  # AIBrix's string form
    assert source.path == "/metrics"
    assert source.port == 8000
    settings = pa.settings()
    assert isinstance(settings, KpaSettings)
    assert settings.scale_down_delay == 180.0  # "3m"
    assert settings.panic_window == 10.0


def test_our_api_version_is_the_default() -> None:
    pa = PodAutoscaler.model_validate({"metadata": {"name": "a"}, "spec": _spec()})
    assert pa.apiVersion == "autoscaling.rayfleet.io/v1alpha1"
    assert pa.metadata.namespace == "default"
    assert pa.model_dump()["spec"]["metricsSources"][0]["targetValue"] == 5.0


def test_min_above_max_is_rejected_with_the_fix() -> None:
    with pytest.raises(ValidationError, match=r"minReplicas \(9\) is above maxReplicas \(8\)"):
        PodAutoscalerSpec.model_validate(_spec(minReplicas=9))


def test_metric_source_validation() -> None:
    with pytest.raises(ValidationError, match="needs an endpoint"):
        MetricSource.model_validate({"metricSourceType": "external", "targetMetric": "replicas", "targetValue": 1})
    with pytest.raises(ValidationError, match="use 'in_flight'.*or 'queued'"):
        MetricSource.model_validate({"metricSourceType": "gateway", "targetMetric": "qps", "targetValue": 1})
    with pytest.raises(ValidationError, match="greater than 0"):
        MetricSource.model_validate({**POD_SOURCE, "targetValue": "0"})
    with pytest.raises(ValidationError, match="targetValue 'half' is not a number"):
        MetricSource.model_validate({**POD_SOURCE, "targetValue": "half"})
    with pytest.raises(ValidationError, match="Input should be 'pod', 'gateway' or 'external'"):
        MetricSource.model_validate({**POD_SOURCE, "metricSourceType": "resource"})
    gateway = MetricSource.model_validate({"metricSourceType": "gateway", "targetMetric": "queued", "targetValue": 2})
    assert gateway.targetMetric == "queued"


def test_spec_rejects_repeated_metrics_and_unknown_fields() -> None:
    with pytest.raises(ValidationError, match="name vllm:num_requests_waiting more than once"):
        PodAutoscalerSpec.model_validate(_spec(metricsSources=[POD_SOURCE, POD_SOURCE]))
    with pytest.raises(ValidationError, match="metricsSources"):
        PodAutoscalerSpec.model_validate(_spec(metricsSources=[]))
    with pytest.raises(ValidationError, match="observeWindowSeconds"):
        PodAutoscalerSpec.model_validate(_spec(observeWindowSeconds=60))


def test_unknown_source_is_named() -> None:
    spec = PodAutoscalerSpec.model_validate(_spec())
    with pytest.raises(
        ValueError, match="no metricsSource is named 'qps'; this autoscaler scales on vllm:num_requests_waiting"
    ):
        spec.source("qps")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("60s", 60.0), ("30m", 1800.0), ("1h30m", 5400.0), ("1.5h", 5400.0), ("500ms", 0.5), ("90", 90.0), ("0", 0.0)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "10x", "-5s", "-5", "1h-2m"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_source_defaults() -> None:
    kpa = settings_from_annotations("KPA", {})
    assert kpa == KpaSettings(
        stable_window=60.0,
        panic_window=6.0,  # 10% of the stable window
        panic_threshold=2.0,
        max_scale_up_rate=1000.0,
        max_scale_down_rate=2.0,
        scale_down_delay=300.0,  # ours, not Knative's 0 s: see KpaSettings
        activation_scale=1,
        target_burst_capacity=211.0,
        target_utilization_percentage=70.0,
        sync_period=2.0,
    )
    apa = settings_from_annotations("APA", {})
    assert (apa.up_fluctuation_tolerance, apa.down_fluctuation_tolerance, apa.window) == (0.1, 0.2, 60.0)
    assert (apa.max_scale_up_rate, apa.max_scale_down_rate, apa.sync_period) == (2.0, 2.0, 10.0)
    hpa = settings_from_annotations("HPA", {})
    assert isinstance(hpa, HpaSettings)
    assert (hpa.scale_up_tolerance, hpa.scale_down_tolerance) == (0.1, 0.1)
    assert (hpa.scale_up_stabilization_window, hpa.scale_down_stabilization_window, hpa.sync_period) == (
        0.0,
        300.0,
        15.0,
    )
    assert hpa.scale_up_policies == [
        HpaScalingPolicy(type="Percent", value=100, period=15.0),
        HpaScalingPolicy(type="Pods", value=4, period=15.0),
    ]
    assert hpa.scale_down_policies == [HpaScalingPolicy(type="Percent", value=100, period=15.0)]
    assert (hpa.scale_up_select_policy, hpa.scale_down_select_policy) == ("Max", "Max")


def test_panic_window_follows_the_stable_window() -> None:
    settings = settings_from_annotations("KPA", {"autoscaling.rayfleet.io/stable-window": "2m"})
    assert settings.panic_window == 12.0  # 10% of 120 s
    assert KpaSettings(stable_window=6.0).panic_window == 1.0  # 0.6 s raised to one bucket


def test_our_knobs_parse() -> None:
    kpa = settings_from_annotations(
        "KPA",
        {
            "autoscaling.rayfleet.io/target-burst-capacity": "-1",
            "autoscaling.rayfleet.io/activation-scale": "3",
            "autoscaling.rayfleet.io/panic-threshold": "300%",
            "autoscaling.rayfleet.io/stable-window": "1m30s",
            "autoscaling.rayfleet.io/panic-window": "9",
            "autoscaling.rayfleet.io/scale-down-delay": "30m",
            "autoscaling.rayfleet.io/max-scale-up-rate": "10",
            "autoscaling.rayfleet.io/max-scale-down-rate": "4",
        },
    )
    assert isinstance(kpa, KpaSettings)
    assert kpa.target_burst_capacity == -1.0
    assert kpa.activation_scale == 3
    assert kpa.panic_threshold == 3.0
    assert (kpa.stable_window, kpa.panic_window, kpa.scale_down_delay) == (90.0, 9.0, 1800.0)
    assert (kpa.max_scale_up_rate, kpa.max_scale_down_rate) == (10.0, 4.0)

    apa = settings_from_annotations(
        "APA",
        {
            "autoscaling.rayfleet.io/up-fluctuation-tolerance": "0.05",
            "autoscaling.rayfleet.io/down-fluctuation-tolerance": "0.3",
            "autoscaling.rayfleet.io/window": "2m",
        },
    )
    assert apa == ApaSettings(up_fluctuation_tolerance=0.05, down_fluctuation_tolerance=0.3, window=120.0)

    hpa = settings_from_annotations(
        "HPA",
        {
            "autoscaling.rayfleet.io/tolerance": "0.2",
            "autoscaling.rayfleet.io/scale-down-tolerance": "0.05",  # the per-direction knob wins
            "autoscaling.rayfleet.io/scale-up-policies": "Pods:2/60s",
            "autoscaling.rayfleet.io/scale-up-select-policy": "min",
            "autoscaling.rayfleet.io/scale-down-select-policy": "Disabled",
            "autoscaling.rayfleet.io/scale-down-stabilization-window": "10m",
        },
    )
    assert isinstance(hpa, HpaSettings)
    assert (hpa.scale_up_tolerance, hpa.scale_down_tolerance) == (0.2, 0.05)
    assert hpa.scale_up_policies == [HpaScalingPolicy(type="Pods", value=2, period=60.0)]
    assert (hpa.scale_up_select_policy, hpa.scale_down_select_policy) == ("Min", "Disabled")
    assert hpa.scale_down_stabilization_window == 600.0


def test_aibrix_keys_and_precedence() -> None:
    annotations = {
        "kpa.autoscaling.aibrix.ai/stable-window": "120s",
        "autoscaling.aibrix.ai/stable-window": "90s",
        "autoscaling.rayfleet.io/stable-window": "80s",
        "autoscaling.aibrix.ai/panic-threshold": "3.0",
        "kpa.autoscaling.aibrix.ai/target-burst-capacity": "2.0",
        "apa.autoscaling.aibrix.ai/window": "30s",  # another strategy's historic prefix: not ours to read
    }
    kpa = settings_from_annotations("KPA", annotations)
    assert isinstance(kpa, KpaSettings)
    assert kpa.stable_window == 80.0  # ours beat AIBrix's current prefix, which beats the historic one
    assert kpa.panic_threshold == 3.0
    assert kpa.target_burst_capacity == 2.0
    assert (
        settings_from_annotations("KPA", {k: v for k, v in annotations.items() if "rayfleet" not in k}).stable_window
        == 90.0
    )

    apa = settings_from_annotations(
        "APA",
        {
            "autoscaling.aibrix.ai/scale-up-tolerance": "0.15",  # AIBrix's current names for the band
            "autoscaling.aibrix.ai/scale-down-tolerance": "0.25",
            "apa.autoscaling.aibrix.ai/window": "30s",
            "autoscaling.aibrix.ai/scale-down-cooldown-window": "300s",  # not an APA knob here: ignored
        },
    )
    assert apa == ApaSettings(up_fluctuation_tolerance=0.15, down_fluctuation_tolerance=0.25, window=30.0)

    hpa = settings_from_annotations(
        "HPA",
        {
            "autoscaling.aibrix.ai/scale-down-cooldown-window": "120s",
            "autoscaling.aibrix.ai/scale-up-cooldown-window": "30s",
        },
    )
    assert isinstance(hpa, HpaSettings)
    assert (hpa.scale_up_stabilization_window, hpa.scale_down_stabilization_window) == (30.0, 120.0)


def test_unrelated_annotations_are_ignored() -> None:
    settings = settings_from_annotations("KPA", {"kubectl.kubernetes.io/last-applied-configuration": "{}"})
    assert settings == KpaSettings()


@pytest.mark.parametrize(
    ("strategy", "annotations", "message"),
    [
        (
            "KPA",
            {"autoscaling.rayfleet.io/stable-window": "soon"},
            r"annotation autoscaling.rayfleet.io/stable-window='soon' is not a duration; write a Go duration such as '60s'",
        ),
        (
            "KPA",
            {"autoscaling.rayfleet.io/stable-window": "2h"},
            r"annotation autoscaling.rayfleet.io/stable-window='2h': Input should be less than or equal to 3600; .*between 6s and 1h",
        ),
        (
            "KPA",
            {"kpa.autoscaling.aibrix.ai/panic-threshold": "1.0"},
            r"annotation kpa.autoscaling.aibrix.ai/panic-threshold='1.0': .*greater than or equal to 1.1; write a ratio between 1.1 and 10",
        ),
        (
            "KPA",
            {"autoscaling.rayfleet.io/max-scale-down-rate": "1"},
            r"max-scale-down-rate='1': Input should be greater than 1; write a factor above 1.0",
        ),
        (
            "KPA",
            {"autoscaling.rayfleet.io/activation-scale": "1.5"},
            r"activation-scale='1.5' is not a whole number; write a whole number of replicas",
        ),
        (
            "KPA",
            {"autoscaling.rayfleet.io/panic-window": "90s"},
            r"panic-window \(90s\) is longer than stable-window \(60s\)",
        ),
        (
            "KPA",
            {"autoscaling.rayfleet.io/window": "60s"},
            r"KPA has no knob 'window' \(it belongs to APA\); KPA knobs are stable-window, panic-window",
        ),
        (
            "APA",
            {"autoscaling.rayfleet.io/up-fluctuation-tolerance": "lots"},
            r"up-fluctuation-tolerance='lots' is not a number; write a fraction of the target",
        ),
        (
            "HPA",
            {"autoscaling.rayfleet.io/scale-up-policies": "Percent=100/15s"},
            r"scale-up-policies='Percent=100/15s' is not a policy list .*; write Type:value/period entries",
        ),
        (
            "HPA",
            {"autoscaling.rayfleet.io/scale-down-policies": "Pods:1/1h"},
            r"scale-down-policies='Pods:1/1h' is out of range .*less than or equal to 1800",
        ),
        (
            "HPA",
            {"autoscaling.rayfleet.io/scale-up-select-policy": "Biggest"},
            r"scale-up-select-policy='Biggest' is not a select policy; write Max, Min or Disabled",
        ),
        (
            "HPA",
            {"autoscaling.rayfleet.io/scale-down-policies": ""},
            r"scale-down-policies is empty; give at least one policy or set scale-down-select-policy to Disabled",
        ),
    ],
)
def test_bad_annotations_name_the_annotation_and_the_fix(
    strategy: str, annotations: dict[str, str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        settings_from_annotations(strategy, annotations)  # type: ignore[arg-type]


def test_bad_annotation_fails_when_the_resource_loads() -> None:
    with pytest.raises(ValidationError, match="autoscaling.rayfleet.io/window"):
        PodAutoscaler.model_validate(
            {"metadata": {"name": "a", "annotations": {"autoscaling.rayfleet.io/window": "x"}}, "spec": _spec()}
        )
