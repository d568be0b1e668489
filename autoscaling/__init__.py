"""Autoscaling: PodAutoscaler specs and the HPA, KPA and APA policies, as pure code.

Nothing here reads a clock or does I/O: a runner (the autoscaler actor, or the discrete-event
simulation) feeds observations and asks for decisions at times it chooses.
"""

from autoscaling.apa import ApaPolicy
from autoscaling.hpa import HpaPolicy
from autoscaling.kpa import KpaPolicy
from autoscaling.policy import Decision, Observation, ScalingPolicy, build_policy
from autoscaling.spec import (
    ApaSettings,
    HpaSettings,
    KpaSettings,
    MetricSource,
    PodAutoscaler,
    PodAutoscalerSpec,
    ScaleTargetRef,
    settings_from_annotations,
)

__all__ = [
    "ApaPolicy",
    "ApaSettings",
    "Decision",
    "HpaPolicy",
    "HpaSettings",
    "KpaPolicy",
    "KpaSettings",
    "MetricSource",
    "Observation",
    "PodAutoscaler",
    "PodAutoscalerSpec",
    "ScaleTargetRef",
    "ScalingPolicy",
    "build_policy",
    "settings_from_annotations",
]
