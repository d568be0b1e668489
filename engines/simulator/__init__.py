"""A process that answers like ``vllm serve`` for everything rayfleet uses, without a GPU.

``python -m engines.simulator serve MODEL [vLLM flags] [--gpu --time-scale --seed
--error-rate --added-latency]`` runs the clock-free engine core from ``engines.core``
behind vLLM's OpenAI-compatible HTTP API, sleeping each step's modelled GPU time (times
the time scale) so that latency, batching and KV-cache pressure behave like a real
engine's.
"""
