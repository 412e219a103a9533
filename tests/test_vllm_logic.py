"""What the vllm backend decides on a GPU, checked on any machine.

The worker's sleep mode, in the order it calls vLLM. vLLM sleeps only on CUDA (test_vllm.py runs it
there); here a recorder stands in for vLLM's `LLM`, so the order the worker relies on is checked
everywhere: a level-2 sleep drops the weights, so they are loaded again before anything samples, and a
reload wakes only the weights' memory, which it fills (the KV cache wakes when a batch needs it, emptied).
And the GPU each rank's vLLM is given."""

from __future__ import annotations

from posttrain.generation.vllm_backend import physical_gpu
from posttrain.generation.vllm_worker import Worker


class RecordedLLM:
    def __init__(self):
        self.calls = []

    def sleep(self, level):
        self.calls.append(f"sleep {level}")

    def wake_up(self, tags=None):
        self.calls.append(f"wake {','.join(tags)}")

    def collective_rpc(self, method, kwargs=None):
        if isinstance(method, str):
            self.calls.append(f"{method} {kwargs['weights_path']}")

    def reset_prefix_cache(self):
        self.calls.append("reset prefix cache")


def _worker(level):
    worker = Worker()
    worker.llm, worker.weights_path = RecordedLLM(), "base"
    worker.sleep(level=level)
    worker.sleep(level=level)  # asleep already: nothing more
    return worker, worker.llm.calls


def test_level_two_reloads_the_last_weights_before_sampling():
    worker, calls = _worker(2)
    worker._wake()  # what generate does first
    assert calls == ["sleep 2", "wake weights", "reload_weights base", "wake kv_cache", "reset prefix cache"]


def test_an_update_fills_the_woken_weights_and_leaves_the_cache_asleep():
    worker, calls = _worker(2)
    worker.reload("v1")
    assert calls == ["sleep 2", "wake weights", "reload_weights v1"]
    worker._wake()
    assert calls[3:] == ["wake kv_cache", "reset prefix cache"]  # v1 stays: no reload of older weights
    worker.sleep(level=2)
    worker._wake()
    assert calls[5:] == ["sleep 2", "wake weights", "reload_weights v1", "wake kv_cache", "reset prefix cache"]


def test_level_one_keeps_the_weights_and_awake_workers_are_left_alone():
    worker, calls = _worker(1)
    worker._wake()
    assert calls == ["sleep 1", "wake weights", "wake kv_cache", "reset prefix cache"]
    worker._wake()
    worker.reload("v2")
    assert calls[4:] == ["reload_weights v2", "reset prefix cache"]


def test_each_rank_gives_its_vllm_its_own_gpu():
    """The worker sees one GPU: the rank's, named as CUDA_VISIBLE_DEVICES names it where the rank was started with
    a list (a GPU index inside a process is counted among the visible ones)."""
    assert physical_gpu(1, "") == "1"
    assert physical_gpu(1, "4,6") == "6"
    assert physical_gpu(0, "GPU-3f2a, GPU-77c1") == "GPU-3f2a"
