"""The engine seam: `AdapterSync` drives any `EngineClient` (a recording one here) through the
protocol's sequence at each sync, and a load that fails leaves the engines resumed, with nothing
marked loaded, before the error reaches the trainer."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from megatron_lora.sync.peft_tensors import PeftTensors

ADAPTER = PeftTensors({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}, {})


class Recording:
    def __init__(self, fail_load_at: int | None = None):
        self.calls, self.loads, self.fail_load_at = [], 0, fail_load_at

    def pause(self, engines):
        self.calls.append(("pause", tuple(engines)))

    def resume(self, engines):
        self.calls.append(("resume", tuple(engines)))

    def unload(self, engines, name):
        self.calls.append(("unload", tuple(engines), name))

    def load(self, engines, name, adapter, version):
        self.loads += 1
        if self.loads == self.fail_load_at:
            raise RuntimeError("engine refused the adapter")
        self.calls.append(("load", tuple(engines), name, version))

    def set_version(self, engines, version):
        self.calls.append(("version", tuple(engines), version))


@pytest.fixture
def sync(monkeypatch):
    from megatron_lora import AdapterSync
    from megatron_lora.sync import peft_tensors

    monkeypatch.setattr(peft_tensors, "gather_peft_adapter",
                        lambda tensors, model, **form: ADAPTER)

    def make(client):
        sync = AdapterSync(SimpleNamespace(use_lora=True, lora_sync="adapter"), model=None,
                           client=client)
        sync.connect(["a", "b"], paused=["a"])  # the caller pauses "a"; the sync pauses "b"
        return sync

    return make


def test_each_sync_pauses_unloads_loads_versions_and_resumes(sync):
    client = Recording()
    adapter_sync = sync(client)
    adapter_sync.push_adapter({}, 1)
    adapter_sync.push_adapter({}, 2)
    assert client.calls == [
        ("pause", ("b",)), ("load", ("a", "b"), "policy", "1"), ("version", ("a", "b"), "1"),
        ("resume", ("b",)),
        ("pause", ("b",)), ("unload", ("a", "b"), "policy"), ("load", ("a", "b"), "policy", "2"),
        ("version", ("a", "b"), "2"), ("resume", ("b",))]
    adapter_sync.unload()
    assert client.calls[-1] == ("unload", ("a", "b"), "policy")
    adapter_sync.unload()  # nothing is loaded any more: no call
    assert len(client.calls) == 10


def test_a_failed_load_resumes_the_engines_and_marks_nothing_loaded(sync):
    client = Recording(fail_load_at=2)
    adapter_sync = sync(client)
    adapter_sync.push_adapter({}, 1)
    with pytest.raises(RuntimeError, match="engine refused the adapter"):
        adapter_sync.push_adapter({}, 2)
    assert client.calls[-2:] == [("unload", ("a", "b"), "policy"), ("resume", ("b",))]
    assert adapter_sync.loaded == []
    adapter_sync.push_adapter({}, 3)  # the next sync loads without unloading what is gone
    assert ("unload", ("a", "b"), "policy") not in client.calls[-4:]
    assert client.calls[-3] == ("load", ("a", "b"), "policy", "3")
