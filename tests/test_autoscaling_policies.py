"""HPA, KPA and APA against cases computed by hand from their sources' formulas.

Every expected number has its arithmetic next to it. Time is passed explicitly; nothing here
sleeps or reads a clock.
"""

from __future__ import annotations

import pytest

from autoscaling.apa import ApaPolicy
from autoscaling.hpa import (
    HpaPolicy,
    Recommendation,
    ScaleEvent,
    Tolerances,
    plain_metric_replicas,
    scale_down_limit,
    scale_up_limit,
    stabilize_recommendation,
)
from autoscaling.kpa import KpaPolicy, excess_burst_capacity
from autoscaling.policy import Observation, build_policy
from autoscaling.spec import HpaScalingPolicy, PodAutoscalerSpec
from autoscaling.windows import MaxWindow, TimedBuckets

WAITING = "vllm:num_requests_waiting"
TOLERANCE = Tolerances(scale_down=0.1, scale_up=0.1)


def _pod(target: float = 5.0) -> dict:
    return {"metricSourceType": "pod", "targetMetric": WAITING, "targetValue": target}


def _gateway(metric: str = "in_flight", target: float = 5.0) -> dict:
    return {"metricSourceType": "gateway", "targetMetric": metric, "targetValue": target}


def _spec(
    strategy: str, sources: list[dict] | None = None, min_replicas: int = 1, max_replicas: int = 10
) -> PodAutoscalerSpec:
    return PodAutoscalerSpec.model_validate(
        {
            "scaleTargetRef": {"kind": "EnginePool", "name": "llama"},
            "minReplicas": min_replicas,
            "maxReplicas": max_replicas,
            "metricsSources": sources or [_pod()],
            "scalingStrategy": strategy,
        }
    )


def _policy(strategy: str, annotations: dict[str, str] | None = None, **spec_args: object):
    knobs = {f"autoscaling.rayfleet.io/{k}": v for k, v in (annotations or {}).items()}
    return build_policy(_spec(strategy, **spec_args), knobs)  # type: ignore[arg-type]


def _feed(policy, metric: str, total: float, pods: int, start: int, end: int) -> None:
    """One observation a second for t = start..end inclusive."""
    for t in range(start, end + 1):
        policy.observe(float(t), Observation(metric, total, pods))


def test_build_policy_picks_the_strategy() -> None:
    assert isinstance(_policy("HPA"), HpaPolicy)
    assert isinstance(_policy("APA"), ApaPolicy)
    kpa = _policy("KPA", {"stable-window": "2m"})
    assert isinstance(kpa, KpaPolicy)
    assert kpa.settings.stable_window == 120.0
    assert (kpa.sync_period, _policy("HPA").sync_period, _policy("APA").sync_period) == (2.0, 15.0, 10.0)


def test_observation_for_an_unknown_metric_is_refused() -> None:
    with pytest.raises(ValueError, match="no metricsSource is named 'qps'"):
        _policy("HPA").observe(0.0, Observation("qps", 1.0, 1))


# ---------------------------------------------------------------------------------------
# Windows (Knative's aggregation)
# ---------------------------------------------------------------------------------------


def test_window_average_counts_gaps_as_zero_but_not_trailing_silence() -> None:
    window = TimedBuckets(window=10.0, granularity=1.0)
    window.record(0.0, 10.0)
    window.record(1.0, 20.0)
    window.record(3.0, 30.0)  # nothing at t=2
    assert window.window_average(3.0) == 15.0  # (10 + 20 + 0 + 30) / 4 buckets since the first write
    assert window.window_average(5.0) == 15.0  # buckets 4, 5 come after the last write: not counted
    assert window.window_average(12.0) == 30.0  # window is buckets 3..12, data only in 3: 30 / 1
    assert window.window_average(13.0) == 0.0  # 10 s after the last write: nothing inside the window
    assert not window.is_empty(13.0)  # silent for exactly the window: not yet empty (Knative's ">")
    assert window.is_empty(14.0)
    window.record(20.0, 7.0)  # after a whole silent window the average starts afresh
    assert window.window_average(20.0) == 7.0


def test_window_bucket_keeps_the_mean_of_its_samples() -> None:
    window = TimedBuckets(window=10.0, granularity=1.0)
    window.record(0.2, 10.0)
    window.record(0.7, 20.0)
    window.record(1.5, 30.0)
    assert window.window_average(1.9) == 22.5  # bucket 0: (10 + 20) / 2 = 15; bucket 1: 30; (15 + 30) / 2


def test_window_floors_to_six_decimals() -> None:
    window = TimedBuckets(window=3.0)
    for t in range(3):
        window.record(float(t), 1.0 / 3.0)
    assert window.window_average(2.0) == 0.333333  # floor(0.3333333... x 1e6) / 1e6


def test_max_window_holds_the_largest_value_for_its_duration() -> None:
    window = MaxWindow(duration=30.0, granularity=2.0)  # ceil(30 / 2) = 15 buckets
    window.record(60.0, 4.0)  # bucket 30
    window.record(70.0, 2.0)  # bucket 35
    assert window.current() == 4.0
    window.record(88.0, 2.0)  # bucket 44: 44 - 30 = 14 < 15, the 4 still counts
    assert window.current() == 4.0
    window.record(90.0, 2.0)  # bucket 45: 45 - 30 = 15, the 4 has left the window
    assert window.current() == 2.0
    window.record(90.5, 3.0)  # same bucket, larger value: it replaces the 2
    assert window.current() == 3.0


# ---------------------------------------------------------------------------------------
# HPA (kubernetes/kubernetes pkg/controller/podautoscaler)
# ---------------------------------------------------------------------------------------


def test_hpa_ratio_and_tolerance() -> None:
    # 30 waiting over 2 pods = 15 per pod; / target 5 = ratio 3; ceil(3 x 2) = 6
    assert plain_metric_replicas(WAITING, 2, 30.0, 2, 0, 0, 5.0, TOLERANCE).replicas == 6
    # 21 over 4 = 5.25; ratio 1.05 <= 1.1: keep 4
    assert plain_metric_replicas(WAITING, 4, 21.0, 4, 0, 0, 5.0, TOLERANCE).replicas == 4
    # 22 over 4 = 5.5; ratio 1.1 is on the band's edge, which is inside: keep 4
    assert plain_metric_replicas(WAITING, 4, 22.0, 4, 0, 0, 5.0, TOLERANCE).replicas == 4
    # 22.4 over 4 = 5.6; ratio 1.12 > 1.1: ceil(1.12 x 4) = ceil(4.48) = 5
    assert plain_metric_replicas(WAITING, 4, 22.4, 4, 0, 0, 5.0, TOLERANCE).replicas == 5
    # 14 over 4 = 3.5; ratio 0.7 < 0.9: ceil(0.7 x 4) = ceil(2.8) = 3
    assert plain_metric_replicas(WAITING, 4, 14.0, 4, 0, 0, 5.0, TOLERANCE).replicas == 3
    # per-direction tolerance: up 0.5 keeps ratio 1.4 (28 over 4 = 7; 7 / 5) inside [0.9, 1.5]
    assert plain_metric_replicas(WAITING, 4, 28.0, 4, 0, 0, 5.0, Tolerances(0.1, 0.5)).replicas == 4


def test_hpa_missing_and_unready_pods() -> None:
    # Scale-down, 1 of 4 ready pods missing: 6 over 3 = 2, ratio 0.4 < 1, so the missing pod
    # counts at the target: (6 + 5) / 4 = 2.75, ratio 0.55; ceil(0.55 x 4) = ceil(2.2) = 3
    # (ignoring it would give ceil(0.4 x 3) = 2).
    down = plain_metric_replicas(
        WAITING, 4, 6.0, 3, missing_pods=1, unready_pods=0, target_usage=5.0, tolerances=TOLERANCE
    )
    assert down.replicas == 3
    assert "1 pods without data counted at the target" in down.explanation
    # Scale-up, 1 of 4 missing: 30 over 3 = 10, ratio 2 > 1, so it counts at 0: 30 / 4 = 7.5,
    # ratio 1.5; ceil(1.5 x 4) = 6
    assert plain_metric_replicas(WAITING, 4, 30.0, 3, 1, 0, 5.0, TOLERANCE).replicas == 6
    # Scale-up with 2 of 4 replicas still starting: 20 over 2 = 10, ratio 2; the starting ones
    # count at 0: 20 / 4 = 5, ratio 1.0 inside the band: keep 4 (they will take the load)
    assert plain_metric_replicas(WAITING, 4, 20.0, 2, 0, 2, 5.0, TOLERANCE).replicas == 4
    # The correction reverses the direction: 6 over 1 = 6, ratio 1.2 > 1; 2 missing at 0:
    # 6 / 3 = 2, ratio 0.4 < 1: keep 3 rather than scale down on a scale-up signal
    flipped = plain_metric_replicas(WAITING, 3, 6.0, 1, 2, 0, 5.0, TOLERANCE)
    assert flipped.replicas == 3
    assert "reverses the direction" in flipped.explanation


def test_hpa_scales_up_at_the_behavior_rate() -> None:
    policy = _policy("HPA")
    policy.observe(0.0, Observation(WAITING, 50.0, 1))
    # 50 over 1 pod, ratio 10: ceil(10 x 1) = 10. Scale-up policies from 1 replica:
    # Percent 100 -> ceil(1 x 2) = 2, Pods 4 -> 1 + 4 = 5; selectPolicy Max -> 5
    first = policy.recommend(0.0, current=1, ready=1)
    assert first.desired == 5
    assert first.details["recommendation"] == 10.0
    assert first.details["scale_up_limit"] == 5.0
    assert "limited to 5 by the scale-up policies (Max of Percent 100 per 15s, Pods 4 per 15s)" in first.reason

    policy.observe(5.0, Observation(WAITING, 250.0, 5))
    # Same period: the +4 at t=0 is within 15 s, so the period started at 5 - 4 = 1 replica and
    # the limit is still max(2, 5) = 5: hold at 5
    assert policy.recommend(5.0, current=5, ready=5).desired == 5

    policy.observe(15.0, Observation(WAITING, 250.0, 5))
    # t=15: the event at t=0 is not after 15 - 15 = 0, so the period starts at 5:
    # Percent -> 10, Pods -> 9, Max 10; ceil(10 x 5) = 50 is capped by maxReplicas 10
    third = policy.recommend(15.0, current=5, ready=5)
    assert third.desired == 10
    assert "capped at maxReplicas 10" in third.reason


def test_hpa_scale_down_stabilization_window() -> None:
    policy = _policy("HPA")
    policy.observe(0.0, Observation(WAITING, 30.0, 6))
    assert policy.recommend(0.0, current=6, ready=6).desired == 6  # 30 / 6 = 5 per pod, ratio 1
    policy.observe(15.0, Observation(WAITING, 6.0, 6))
    # 6 / 6 = 1 per pod, ratio 0.2: ceil(0.2 x 6) = ceil(1.2) = 2, but the last 300 s recommended
    # 6 (t=0): the highest of them, 6, holds
    held = policy.recommend(15.0, current=6, ready=6)
    assert (held.desired, held.details["recommendation"], held.details["stabilized"]) == (6, 2.0, 6.0)
    assert "300s scale-down stabilization window holds it at 6" in held.reason
    policy.observe(301.0, Observation(WAITING, 6.0, 6))
    # t=301: the t=0 recommendations are 301 s old; only t=15's 2 is left. Scale-down policy
    # Percent 100 allows int(6 x 0) = 0, so minReplicas 1 is the floor: 2
    assert policy.recommend(301.0, current=6, ready=6).desired == 2


def test_hpa_scale_up_stabilization_window() -> None:
    policy = _policy("HPA", {"scale-up-stabilization-window": "60s"})
    policy.observe(0.0, Observation(WAITING, 30.0, 2))
    # ratio 3 -> 6, but the window holds the controller's first recommendation (the current 2):
    # the lowest recommendation of the last 60 s is 2
    assert policy.recommend(0.0, current=2, ready=2).desired == 2
    policy.observe(30.0, Observation(WAITING, 30.0, 2))
    assert policy.recommend(30.0, current=2, ready=2).desired == 2  # min(2 at t=0, 6 at t=0, 6) = 2
    policy.observe(61.0, Observation(WAITING, 30.0, 2))
    # t=61: only t=30's 6 is inside the window: min(6, 6) = 6; Pods 4 allows 2 + 4 = 6
    assert policy.recommend(61.0, current=2, ready=2).desired == 6


def test_hpa_scale_down_rate_limit() -> None:
    policy = _policy("HPA", {"scale-down-stabilization-window": "0s", "scale-down-policies": "Pods:1/60s"})
    policy.observe(0.0, Observation(WAITING, 5.0, 5))
    # 5 / 5 = 1 per pod, ratio 0.2: ceil(0.2 x 5) = 1; Pods 1 per 60 s allows 5 - 1 = 4
    first = policy.recommend(0.0, current=5, ready=5)
    assert first.desired == 4
    assert "limited to 4 by the scale-down policies (Max of Pods 1 per 60s)" in first.reason
    policy.observe(30.0, Observation(WAITING, 4.0, 4))
    # t=30: 1 pod removed within 60 s, so the period started at 4 + 1 = 5 and allows 5 - 1 = 4
    assert policy.recommend(30.0, current=4, ready=4).desired == 4
    policy.observe(61.0, Observation(WAITING, 4.0, 4))
    # t=61: the removal at t=0 is out of the period: 4 - 1 = 3
    assert policy.recommend(61.0, current=4, ready=4).desired == 3


def test_hpa_rate_limit_functions() -> None:
    up = [HpaScalingPolicy(type="Percent", value=100, period=15.0), HpaScalingPolicy(type="Pods", value=4, period=15.0)]
    # from 10 replicas: Percent -> ceil(10 x 2) = 20, Pods -> 14; Max 20, Min 14
    assert scale_up_limit(0.0, 10, [], [], up, "Max") == 20
    assert scale_up_limit(0.0, 10, [], [], up, "Min") == 14
    assert scale_up_limit(0.0, 10, [], [], up, "Disabled") == 10
    # 3 added and 1 removed within the period: it started at 10 - 3 + 1 = 8 -> Percent 16, Pods 12
    events_up, events_down = [ScaleEvent(-5.0, 3)], [ScaleEvent(-2.0, 1)]
    assert scale_up_limit(0.0, 10, events_up, events_down, up, "Max") == 16
    down = [
        HpaScalingPolicy(type="Percent", value=50, period=60.0),
        HpaScalingPolicy(type="Pods", value=2, period=60.0),
    ]
    # from 9: Percent -> int(9 x 0.5) = 4, Pods -> 7; Max (largest change) 4, Min (smallest) 7
    assert scale_down_limit(0.0, 9, [], [], down, "Max") == 4
    assert scale_down_limit(0.0, 9, [], [], down, "Min") == 7


def test_hpa_stabilization_function() -> None:
    recs = [Recommendation(0.0, 8), Recommendation(100.0, 3)]
    # at t=200, up window 0 (none), down window 300 (both): max(2, 8, 3) = 8; current 5 -> min(5, 8) = 5
    assert stabilize_recommendation(200.0, 5, 2, recs, 0.0, 300.0) == 5
    # at t=350 only the 3 is left: min(max(5, 2), max(2, 3)) = 3
    assert stabilize_recommendation(350.0, 5, 2, recs, 0.0, 300.0) == 3


def test_hpa_missing_metrics() -> None:
    policy = _policy("HPA", sources=[_pod(), _gateway("queued", 2.0)])
    no_data = policy.recommend(0.0, current=3, ready=3)
    assert no_data.desired == 3
    assert no_data.reason == f"hold at 3: no data for {WAITING}, queued"

    policy.observe(15.0, Observation(WAITING, 3.0, 3))  # 1 per pod, ratio 0.2: would go to 1
    policy.observe(15.0, Observation("queued", 0.0, 0))  # the gateway value could not be read
    partial = policy.recommend(15.0, current=3, ready=3)
    assert partial.desired == 3
    assert "would scale down but queued has no data" in partial.reason

    policy.observe(30.0, Observation(WAITING, 30.0, 3))  # 10 per pod, ratio 2: ceil(2 x 3) = 6
    up = policy.recommend(30.0, current=3, ready=3)
    assert up.desired == 6  # a scale-up may proceed on partial data
    assert "no data for queued" in up.reason


def test_hpa_takes_the_largest_proposal() -> None:
    policy = _policy("HPA", sources=[_pod(), _gateway("queued", 2.0)])
    policy.observe(0.0, Observation(WAITING, 10.0, 2))  # 5 per pod, ratio 1: keep 2
    policy.observe(0.0, Observation("queued", 10.0, 1))  # 10 / (2 x 2) = 2.5 > 1.1: ceil(10 / 2) = 5
    decision = policy.recommend(0.0, current=2, ready=2)
    assert decision.desired == 5  # max(2, 5); the scale-up policies allow max(4, 6) = 6
    assert decision.details[f"{WAITING}.proposal"] == 2.0
    assert decision.details["queued.proposal"] == 5.0
    assert "largest of 2 proposals" in decision.reason


def test_hpa_bounds_and_zero() -> None:
    policy = _policy("HPA")
    assert policy.recommend(0.0, current=12, ready=12).desired == 10  # above maxReplicas 10
    assert policy.recommend(1.0, current=0, ready=0).desired == 0  # a target at 0 is left alone
    # With minReplicas 0 a gateway queue scales from zero: ceil(3 / 1) = 3
    from_zero = _policy("HPA", sources=[_gateway("queued", 1.0)], min_replicas=0)
    from_zero.observe(0.0, Observation("queued", 3.0, 1))
    assert from_zero.recommend(0.0, current=0, ready=0).desired == 3


# ---------------------------------------------------------------------------------------
# KPA (knative/serving pkg/autoscaler/scaling/autoscaler.go)
# ---------------------------------------------------------------------------------------


def _kpa(annotations: dict[str, str] | None = None, **spec_args: object) -> KpaPolicy:
    """A KPA whose first decision saw one ready pod, so it does not start in panic.

    Knative's own default scale-down delay (0 s) unless the test sets one: the cases below
    are Knative's formulas; rayfleet's 5-minute default is tested on its own.
    """
    policy = _policy("KPA", {"scale-down-delay": "0s", **(annotations or {})}, **spec_args)
    assert isinstance(policy, KpaPolicy)
    first = policy.recommend(0.0, current=1, ready=1)
    assert "no data" in first.reason and not policy.in_panic
    return policy


def test_kpa_sums_over_pods() -> None:
    policy = _kpa()
    _feed(policy, WAITING, total=12.0, pods=3, start=1, end=60)  # 4 per pod on 3 pods
    decision = policy.recommend(60.0, current=3, ready=3)
    # stable = panic = 12; dspc = ceil(12 / 5) = 3 (AIBrix's average gives ceil(4 / 5) = 1);
    # panic check 3 / 3 = 1 < 2
    assert decision.desired == 3
    assert decision.details[f"{WAITING}.stable_value"] == 12.0
    assert not policy.in_panic


def test_kpa_panic_entry_hold_and_exit() -> None:
    policy = _kpa()
    _feed(policy, WAITING, total=10.0, pods=2, start=1, end=54)
    _feed(policy, WAITING, total=40.0, pods=2, start=55, end=60)  # a burst over the last 6 s
    entry = policy.recommend(60.0, current=2, ready=2)
    # stable = (54 x 10 + 6 x 40) / 60 = 780 / 60 = 13 -> dspc ceil(13 / 5) = 3
    # panic (6 s) = 40 -> dppc 8; 8 / 2 ready = 4 >= 2: panic, desired max(3, 8) = 8
    assert entry.desired == 8
    assert policy.in_panic and policy.panic_time == 60.0
    assert "panic: 8 panic pods / 2 ready = 4 >= panic-threshold 2" in entry.reason
    assert (entry.details["desired_stable_pod_count"], entry.details["desired_panic_pod_count"]) == (3.0, 8.0)

    _feed(policy, WAITING, total=10.0, pods=8, start=61, end=70)
    hold = policy.recommend(70.0, current=8, ready=8)
    # panic = 10 -> dppc 2; 2 / 8 < 2 but panic lasts a stable window past t=60;
    # stable = (44 x 10 + 6 x 40 + 10 x 10) / 60 = 13 -> 3, raised to floor(8 / 2) = 4 by the
    # scale-down rate; in panic the count never drops below the 8 it reached
    assert hold.desired == 8
    assert policy.in_panic
    assert "never below 8 while panicking" in hold.reason

    _feed(policy, WAITING, total=10.0, pods=8, start=71, end=120)
    assert policy.recommend(120.0, current=8, ready=8).desired == 8  # 60 + 60 < 120 is false: still panic
    _feed(policy, WAITING, total=10.0, pods=8, start=121, end=121)
    exit_ = policy.recommend(121.0, current=8, ready=8)
    # 60 + 60 < 121: panic ends. stable (62..121) = 10 -> dspc 2, but max-scale-down-rate 2
    # allows no fewer than floor(8 / 2) = 4
    assert exit_.desired == 4
    assert not policy.in_panic
    assert "panic over" in exit_.reason


def test_kpa_panics_on_high_steady_load() -> None:
    # AIBrix enters panic on panic/stable > 2, which a steady load never satisfies; Knative
    # compares the panic pods with the ready pods.
    policy = _kpa()
    _feed(policy, WAITING, total=40.0, pods=2, start=1, end=60)
    decision = policy.recommend(60.0, current=2, ready=2)  # dppc = ceil(40 / 5) = 8; 8 / 2 = 4 >= 2
    assert decision.desired == 8 and policy.in_panic


def test_kpa_max_scale_up_and_down_rates() -> None:
    up = _kpa({"max-scale-up-rate": "2", "panic-threshold": "10"})
    _feed(up, WAITING, total=50.0, pods=2, start=1, end=60)
    decision = up.recommend(60.0, current=2, ready=2)
    # dspc = ceil(50 / 5) = 10, capped at ceil(2 x 2 ready) = 4; panic 10 / 2 = 5 < 10
    assert decision.desired == 4
    assert decision.details["max_scale_up"] == 4.0
    assert "allow 1..4 pods from 2 ready" in decision.reason

    down = _kpa()
    _feed(down, WAITING, total=5.0, pods=10, start=1, end=60)
    # dspc = ceil(5 / 5) = 1, raised to floor(10 ready / 2) = 5
    assert down.recommend(60.0, current=10, ready=10).desired == 5


def test_kpa_scale_down_delay() -> None:
    # A 6 s stable window (panic 1 s) so the load drop shows quickly; no panic (threshold 10).
    policy = _kpa({"stable-window": "6s", "scale-down-delay": "30s", "panic-threshold": "10"})
    _feed(policy, WAITING, total=20.0, pods=4, start=1, end=60)
    assert policy.recommend(60.0, current=4, ready=4).desired == 4  # ceil(20 / 5) = 4, recorded in bucket 60 / 2 = 30
    _feed(policy, WAITING, total=0.0, pods=4, start=61, end=90)
    delayed = policy.recommend(70.0, current=4, ready=4)
    # stable 0 -> 0, raised to floor(4 / 2) = 2; the delay window (15 buckets of 2 s) still has the 4
    assert delayed.desired == 4
    assert delayed.details["desired_stable_pod_count"] == 2.0
    assert "scale-down delay 30s holds 4" in delayed.reason
    assert policy.recommend(88.0, current=4, ready=4).desired == 4  # bucket 44 - 30 = 14 < 15
    assert policy.recommend(90.0, current=4, ready=4).desired == 2  # bucket 45 - 30 = 15: the 4 has expired


def test_kpa_activation_scale() -> None:
    policy = _kpa({"activation-scale": "3"}, min_replicas=0)
    _feed(policy, WAITING, total=1.0, pods=1, start=1, end=60)
    # dspc = ceil(1 / 5) = 1 > 0, so at least activation-scale 3; panic 1 / 1 = 1 < 2
    decision = policy.recommend(60.0, current=1, ready=1)
    assert decision.desired == 3
    assert "activation-scale raises a non-zero count to 3" in decision.reason

    idle = _kpa({"activation-scale": "3"}, min_replicas=0)
    _feed(idle, WAITING, total=0.0, pods=1, start=1, end=60)
    assert idle.recommend(60.0, current=1, ready=1).desired == 0  # dspc 0: no activation, minReplicas 0


def test_kpa_excess_burst_capacity() -> None:
    # capacity per pod = target 5 / 70% = 7.142857; 2 x 7.142857 - 10 - 3 = 1.2857 -> floor 1
    assert excess_burst_capacity(2, 5.0 / 0.7, 10.0, 3.0) == 1.0
    assert excess_burst_capacity(2, 5.0 / 0.7, 0.0, 3.0) == 0.0  # 0 disables the check
    assert excess_burst_capacity(2, 5.0 / 0.7, -1.0, 3.0) == -1.0  # -1: unlimited, always short
    policy = _kpa({"target-burst-capacity": "10", "target-utilization-percentage": "100"})
    _feed(policy, WAITING, total=12.0, pods=3, start=1, end=60)
    decision = policy.recommend(60.0, current=3, ready=3)
    # capacity 5 / 100% = 5; 3 ready x 5 - 10 - panic 12 = -7: this burst would not fit
    assert decision.details["excess_burst_capacity"] == -7.0
    assert policy.excess_burst_capacity == -7.0


def test_kpa_starts_in_panic_at_the_ready_count() -> None:
    policy = _policy("KPA", {"scale-down-delay": "0s"})
    assert isinstance(policy, KpaPolicy)
    _feed(policy, WAITING, total=5.0, pods=3, start=1, end=10)
    first = policy.recommend(10.0, current=3, ready=3)
    # dspc = ceil(5 / 5) = 1, but a new autoscaler starts in panic at the 3 ready pods
    assert first.desired == 3 and policy.in_panic
    assert "starts in panic at the 3 ready pods" in first.reason
    _feed(policy, WAITING, total=5.0, pods=3, start=11, end=71)
    # 10 + 60 < 71: panic ends; dspc 1 raised to floor(3 / 2) = 1
    assert policy.recommend(71.0, current=3, ready=3).desired == 1


def test_kpa_default_scale_down_delay_is_five_minutes() -> None:
    """rayfleet's default (not Knative's 0 s): replicas stay 300 s after the load is gone."""
    policy = _policy("KPA", {"panic-threshold": "10"})
    assert isinstance(policy, KpaPolicy) and policy.settings.scale_down_delay == 300.0
    policy.recommend(0.0, current=1, ready=1)
    _feed(policy, WAITING, total=20.0, pods=4, start=1, end=60)
    assert policy.recommend(60.0, current=4, ready=4).desired == 4  # ceil(20 / 5)
    _feed(policy, WAITING, total=0.0, pods=4, start=61, end=400)
    # The load is gone at 61 and the stable window has forgotten it by 121, but the 4 decided
    # at 60 stays the most decided within the last 300 s until 360.
    assert policy.recommend(300.0, current=4, ready=4).desired == 4
    assert policy.recommend(362.0, current=4, ready=4).desired < 4


def test_kpa_missing_data() -> None:
    policy = _kpa(sources=[_pod(), _gateway("in_flight", 5.0)])
    _feed(policy, "in_flight", total=5.0, pods=1, start=1, end=60)
    policy.observe(60.0, Observation(WAITING, 0.0, 0))  # a failed scrape is not recorded as 0
    decision = policy.recommend(60.0, current=4, ready=4)
    # in_flight: ceil(5 / 5) = 1, raised to floor(4 / 2) = 2 -> a scale-down while the pod
    # metric has no data: hold
    assert decision.desired == 4
    assert f"2 would scale down but {WAITING} has no data" in decision.reason


# ---------------------------------------------------------------------------------------
# APA (vllm-project/aibrix pkg/controller/podautoscaler/algorithm/apa.go)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("per_pod", "expected", "why"),
    [
        (5.4, 4, "ratio 1.08 <= 1 + 0.1: inside the band, keep 4"),
        (4.1, 4, "ratio 0.82 >= 1 - 0.2: inside the band, keep 4"),
        (7.0, 6, "ratio 1.4 > 1.1: ceil(4 x 1.4) = ceil(5.6) = 6 <= ceil(2 x 4) = 8"),
        (15.0, 8, "ratio 3 > 1.1: ceil(4 x 3) = 12, capped by max-scale-up-rate at ceil(2 x 4) = 8"),
        (2.0, 2, "ratio 0.4 < 0.8: ceil(4 x 0.4) = ceil(1.6) = 2 >= floor(4 / 2) = 2"),
        (1.0, 2, "ratio 0.2 < 0.8: ceil(4 x 0.2) = 1, raised by max-scale-down-rate to floor(4 / 2) = 2"),
    ],
)
def test_apa_tolerance_bands_and_rates(per_pod: float, expected: int, why: str) -> None:
    policy = _policy("APA")
    policy.observe(0.0, Observation(WAITING, per_pod * 4, 4))
    assert policy.recommend(0.0, current=4, ready=4).desired == expected, why


def test_apa_averages_over_its_window() -> None:
    policy = _policy("APA")
    _feed(policy, WAITING, total=40.0, pods=4, start=1, end=30)  # 10 per pod
    _feed(policy, WAITING, total=0.0, pods=4, start=31, end=60)  # idle
    # window (60 s) average per pod = (30 x 10 + 30 x 0) / 60 = 5, ratio 1: keep 4
    assert policy.recommend(60.0, current=4, ready=4).desired == 4
    _feed(policy, WAITING, total=0.0, pods=4, start=61, end=90)
    # window 31..90 is all 0: ratio 0 < 0.8, ceil(0) = 0 raised to floor(4 / 2) = 2
    assert policy.recommend(90.0, current=4, ready=4).desired == 2


def test_apa_does_not_undercut_starting_replicas() -> None:
    policy = _policy("APA")
    policy.observe(0.0, Observation(WAITING, 20.0, 2))  # 10 per ready pod, ratio 2
    decision = policy.recommend(0.0, current=6, ready=2)
    # ceil(2 ready x 2) = 4 = ceil(2 x 2) bound: the load needs 4, but 6 are already coming up
    assert decision.desired == 6
    assert "a scale-up keeps the 6 replicas there are" in decision.reason


def test_apa_gateway_value_is_shared_by_the_ready_pods() -> None:
    policy = _policy("APA", sources=[_gateway("in_flight", 5.0)])
    policy.observe(0.0, Observation("in_flight", 28.0, 1))
    # 28 in flight / 4 ready = 7 per pod, ratio 1.4: ceil(4 x 1.4) = 6
    assert policy.recommend(0.0, current=4, ready=4).desired == 6


def test_apa_bounds_and_missing_data() -> None:
    policy = _policy("APA", max_replicas=5)
    policy.observe(0.0, Observation(WAITING, 60.0, 4))  # 15 per pod: 8 as above, capped at maxReplicas 5
    capped = policy.recommend(0.0, current=4, ready=4)
    assert capped.desired == 5
    assert "capped at maxReplicas 5" in capped.reason

    empty = _policy("APA")
    assert empty.recommend(0.0, current=2, ready=2).desired == 2  # no data: hold
    two = _policy("APA", sources=[_pod(), _gateway("queued", 2.0)])
    two.observe(0.0, Observation(WAITING, 4.0, 4))  # ratio 0.2 -> 2, a scale-down
    assert two.recommend(0.0, current=4, ready=4).desired == 4  # queued missing: hold
