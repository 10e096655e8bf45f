"""Deployment: load a version into a torch model; follow a tag, swapping only between requests."""

from __future__ import annotations

import threading

import torch
from torch import nn

from share import merge
from subspace_store import SubspaceStore, TagFollower, load_version


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Linear(16, 24)
        self.value = nn.Linear(16, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.query(x) + self.value(x)


class _Tiny(nn.Module):
    """Module names match the test adapters': layer.0.query, layer.0.value, classifier."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.ModuleList([_Block()])
        self.classifier = nn.Linear(24, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.layer[0](x))


def test_load_version_into_a_plain_model(redis_client, namespace, make_adapter) -> None:
    store = SubspaceStore(redis_client, namespace)
    head = {"classifier.weight": (3, 24)}
    sub, _ = merge(None, {"a": make_adapter(0, head=head), "b": make_adapter(1, head=head)})
    store.tag(store.publish(sub, None), "prod")
    loaded = load_version(store, "prod", _Tiny(), tasks=["b"])
    assert loaded.version == "v1" and list(loaded.subspace.tasks) == ["b"]
    x = torch.randn(2, 16)
    with torch.no_grad():
        out = loaded.model(x, tasks="b")
        # Reference: the base model with task b's update added to each module and its head.
        ref = _Tiny()
        for name in ("query", "value"):
            layer = getattr(ref.layer[0], name)
            layer.weight += sub.delta_weight("b", f"layer.0.{name}")
        ref.classifier.weight.copy_(sub.tasks["b"].head["classifier.weight"])
        # Outputs reach ~80: float32 rounding of the two summation orders is ~1e-5 of that.
        assert torch.allclose(out, ref(x), atol=1e-4)
    assert load_version(store, "head").model is None  # no model: just the subspace


def test_tag_follower_swaps_only_between_requests(redis_client, namespace, make_adapter) -> None:
    store = SubspaceStore(redis_client, namespace)
    sub, _ = merge(None, {"a": make_adapter(0)})
    v1 = store.publish(sub, None)
    store.tag(v1, "prod")
    events: list[str] = []
    follower = TagFollower(store, "prod", on_swap=lambda loaded: events.append(f"swap {loaded.version}"))
    assert follower.version == v1 and events == [f"swap {v1}"]
    assert follower.poll() is False  # tag did not move

    sub2, _ = merge(sub, {"b": make_adapter(1)})
    v2 = store.publish(sub2, v1)
    store.tag(v2, "prod")
    swapper = threading.Thread(target=follower.poll)
    with follower.request() as loaded:
        events.append(f"request start {loaded.version}")
        swapper.start()
        while not follower._lock._writers_waiting:  # the swap has its version and waits for us
            swapper.join(0.01)
        assert follower.current.version == v1 and list(loaded.subspace.tasks) == ["a"]
        events.append(f"request end {loaded.version}")
    swapper.join()
    assert events == [f"swap {v1}", f"request start {v1}", f"request end {v1}", f"swap {v2}"]
    with follower.request() as loaded:
        assert loaded.version == v2 and list(loaded.subspace.tasks) == ["a", "b"]


def test_tag_follower_background_thread_reports_errors(redis_client, namespace, make_adapter) -> None:
    store = SubspaceStore(redis_client, namespace)
    sub, _ = merge(None, {"a": make_adapter(0)})
    store.tag(store.publish(sub, None), "prod")
    errors: list[Exception] = []
    swapped = threading.Event()
    failed = threading.Event()

    def on_error(err: Exception) -> None:
        errors.append(err)
        failed.set()

    follower = TagFollower(store, "prod", interval_s=0.01, on_swap=lambda _: swapped.set(), on_error=on_error)
    swapped.clear()
    with follower:
        store.tag(store.publish(sub, "v1"), "prod")
        swapped.wait(60)
        assert follower.version == "v2"
        store.untag("prod")  # the tag disappears: keep serving v2, report the error
        failed.wait(60)
    assert follower.version == "v2" and "prod" in str(errors[0])
