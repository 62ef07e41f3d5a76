"""The replica options: what reaches Ray Serve from `loraplex serve` settings (no cluster)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from loraplex.serve_settings import ServeSettings, load_settings

pytest.importorskip("ray")  # the `ray` extra
from loraplex.replicas.app import (  # after the skip
    default_gpus,
    engine_options,
    replica_count,
)


def test_a_fixed_count_or_autoscaling_passes_through_to_ray_serve():
    fixed = ServeSettings(replicas=3, max_num_seqs=32, cpus_per_replica=2)
    options = engine_options(fixed, num_gpus=1)
    assert options["num_replicas"] == 3 and "autoscaling_config" not in options
    assert options["max_ongoing_requests"] == 32
    assert options["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 1}
    assert replica_count(fixed) == 3 and fixed.uses_replicas

    auto = load_settings(
        {"replica_autoscaling": '{"min_replicas": 1, "max_replicas": 4}'}, {}
    )
    options = engine_options(auto, num_gpus=1)
    assert options["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4}
    assert "num_replicas" not in options
    assert replica_count(auto) == 4 and auto.uses_replicas
    assert not ServeSettings().uses_replicas


def test_autoscaling_from_the_environment_and_conflicts():
    env = {"LORAPLEX_REPLICA_AUTOSCALING": '{"max_replicas": 2}'}
    assert load_settings({}, env).replica_autoscaling == {"max_replicas": 2}
    with pytest.raises(ValidationError, match="not both"):
        ServeSettings(replicas=2, replica_autoscaling={"max_replicas": 2})
    with pytest.raises(ValidationError, match="not valid JSON"):
        load_settings({"replica_autoscaling": "{max_replicas: 2"}, {})


def test_gpus_per_replica_defaults_to_one_only_where_there_are_gpus():
    assert default_gpus(ServeSettings(), cluster_gpus=8) == 1
    assert default_gpus(ServeSettings(), cluster_gpus=0) == 0
    assert default_gpus(ServeSettings(device="cpu"), cluster_gpus=8) == 0
    assert default_gpus(ServeSettings(gpus_per_replica=0.5), cluster_gpus=0) == 0.5


def test_build_app_needs_a_model():
    from loraplex.replicas import build_app

    with pytest.raises(ValueError, match="model"):
        build_app({"replicas": 2})
