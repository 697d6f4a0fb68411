"""The Prometheus text parser on vLLM-shaped /metrics output."""

from __future__ import annotations

import math

from apps.fleet.metrics import parse_samples, parse_vllm_load

VLLM_METRICS = r"""# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="meta-llama/Llama-3-8B"} 3.0
vllm:num_requests_running{engine="1",model_name="meta-llama/Llama-3-8B"} 2.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="meta-llama/Llama-3-8B"} 7.0
vllm:num_requests_waiting{engine="1",model_name="meta-llama/Llama-3-8B"} NaN
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="meta-llama/Llama-3-8B"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="meta-llama/Llama-3-8B"} 0.75
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="meta-llama/Llama-3-8B"} 12.0
vllm:num_requests_running_total{engine="0"} 999
python_gc_objects_collected_total{generation="0"} 1234.0
"""


def test_sums_running_and_waiting_over_engines_and_averages_kv_usage() -> None:
    load = parse_vllm_load(VLLM_METRICS)
    assert (load.running, load.waiting) == (5, 7)  # NaN is ignored, lookalike names too
    assert math.isclose(load.kv_cache_usage, 0.5)


def test_labels_with_spaces_braces_and_escaped_quotes_do_not_confuse_the_parser() -> None:
    text = (
        'vllm:num_requests_running{model_name="a \\"weird} {name\\" x",engine="0"} 4 1700000000000\n'
        "vllm:num_requests_waiting 2e0\n"
        "vllm:kv_cache_usage_perc{} +Inf\n"
    )
    load = parse_vllm_load(text)
    assert (load.running, load.waiting, load.kv_cache_usage) == (4, 2, None)


def test_garbage_and_missing_metrics_give_unknown_not_an_error() -> None:
    text = 'not prometheus at all\n{broken\nvllm:num_requests_running{unterminated="x 5\n\n# only comments\n'
    assert parse_vllm_load(text).running is None
    assert parse_vllm_load("").kv_cache_usage is None


def test_the_pre_0_10_kv_cache_name_is_understood() -> None:
    load = parse_vllm_load('vllm:gpu_cache_usage_perc{model_name="m"} 0.4\n')
    assert math.isclose(load.kv_cache_usage, 0.4)


def test_the_simulators_exposition_round_trips() -> None:
    from vllm_sim.text import metrics_text

    text = metrics_text(model='odd "name" {x}', running=3, waiting=11, kv_usage=0.125).decode()
    load = parse_vllm_load(text)
    assert (load.running, load.waiting, load.kv_cache_usage) == (3, 11, 0.125)
    assert parse_samples(text)["vllm:num_requests_waiting"] == [11.0]
