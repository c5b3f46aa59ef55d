"""TPUs without a TPU: which strategy the environment picks, what the resolver is asked, and in what
order TensorFlow's TPU set-up runs. No TPU has run these paths (none can be lent here)."""

import contextlib

import pytest
import tensorflow as tf

from trainer import distribute
from trainer.cli import UserError
from trainer.cluster import Cluster

ALONE = Cluster((), 0)


class FakeTPUStrategy:
    num_replicas_in_sync = 8  # a v3-8's cores

    def __init__(self, resolver):
        self.resolver = resolver

    def scope(self):
        return contextlib.nullcontext("tpu scope")


@pytest.fixture
def tpu_calls(monkeypatch):
    """The TPU set-up's calls, in order, as (name, argument); the resolver is the string 'resolver'."""
    calls = []

    def record(name, result=None):
        def call(argument):
            calls.append((name, argument))
            return result

        return call

    monkeypatch.setattr(distribute, "tpu_cluster_resolver", record("resolver", "resolver"))
    monkeypatch.setattr(tf.config, "experimental_connect_to_cluster", record("connect"))
    monkeypatch.setattr(tf.tpu.experimental, "initialize_tpu_system", record("initialize"))

    def strategy(resolver):
        calls.append(("TPUStrategy", resolver))
        return FakeTPUStrategy(resolver)

    monkeypatch.setattr(tf.distribute, "TPUStrategy", strategy)
    return calls


def test_tpu_name_in_the_environment_sets_up_tpu_strategy_in_order(monkeypatch, tpu_calls):
    monkeypatch.setenv("TPU_NAME", "my-tpu")
    scope, replicas = distribute.setup("tensorflow", ALONE)
    assert tpu_calls == [("resolver", "my-tpu"), ("connect", "resolver"), ("initialize", "resolver"),
                         ("TPUStrategy", "resolver")]
    assert replicas == 8
    with scope as entered:
        assert entered == "tpu scope"  # the model is built in the strategy's scope


def test_the_tpu_flag_wins_over_the_environment(monkeypatch, tpu_calls):
    monkeypatch.setenv("TPU_NAME", "from-environment")
    distribute.setup("tensorflow", ALONE, tpu="from-flag")
    assert tpu_calls[0] == ("resolver", "from-flag")


def test_without_a_tpu_name_nothing_tpu_related_happens(monkeypatch, tpu_calls):
    monkeypatch.delenv("TPU_NAME", raising=False)
    distribute.setup("tensorflow", ALONE)  # this host's GPUs, if any: MirroredStrategy or none
    assert tpu_calls == []


def test_the_resolver_is_asked_for_the_named_tpu(monkeypatch):
    asked = []
    monkeypatch.setattr(tf.distribute.cluster_resolver, "TPUClusterResolver", lambda **kwargs: asked.append(kwargs))
    distribute.tpu_cluster_resolver("my-tpu")
    assert asked == [{"tpu": "my-tpu"}]


def test_an_unreachable_tpu_is_one_line_naming_it(monkeypatch, tpu_calls):
    def unreachable(name):
        raise ValueError(f"Could not lookup TPU metadata from name '{name}'.\nPlease doublecheck the tpu argument")

    monkeypatch.setattr(distribute, "tpu_cluster_resolver", unreachable)
    with pytest.raises(UserError, match=r"TPU_NAME=gone: no such TPU can be reached \(Could not lookup") as error:
        distribute.setup("tensorflow", ALONE, tpu="gone")
    assert "\n" not in str(error.value) and tpu_calls == []


@pytest.mark.parametrize("backend, cluster, tpu, message", [
    ("jax", ALONE, "my-tpu", "--tpu is for --backend=tensorflow"),
    ("tensorflow", Cluster(("a:1", "b:2"), 0), "my-tpu", "drives the whole TPU from one trainer process"),
])
def test_tpu_where_it_cannot_work_is_refused_before_any_tpu_call(tpu_calls, backend, cluster, tpu, message):
    with pytest.raises(UserError, match=message):
        distribute.setup(backend, cluster, tpu=tpu)
    assert tpu_calls == []
