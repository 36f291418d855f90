"""Moving experts from the slow tier into fast slots: worker threads for a host store, a side
stream for a GPU, or the caller's thread (offload/cache.py decides what to load, and when)."""

from __future__ import annotations

import itertools
import queue
import threading
from concurrent.futures import Future

import torch


class Loader:
    """Moves experts from the store into slots: up to `reads` loads in flight on worker
    threads (demand loads taken before prefetches, a queued prefetch can be cancelled),
    synchronously (`threaded` False), or on a CUDA stream.

    Several reads in flight because one positioned read at a time leaves most of a disk's
    bandwidth unused (an NVMe drive serves ~2 GB/s to many readers, ~0.4 GB/s to one).
    """

    def __init__(self, store, device: torch.device, threaded: bool = True, reads: int = 4):
        self.store, self.device = store, device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.queue: queue.PriorityQueue = queue.PriorityQueue()
        self.order = itertools.count()  # FIFO within a priority; futures are never compared
        self.workers = []
        if threaded and not self.stream:
            self.workers = [threading.Thread(target=self._work, name=f"moe-edge-load-{i}", daemon=True)
                            for i in range(max(1, reads))]
            for w in self.workers:
                w.start()

    def start(self, index: int, dst: torch.Tensor, prefetch: bool = False):
        if self.stream is not None:
            with torch.cuda.stream(self.stream):
                self.store.read_into(index, dst, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self.stream)
            return event
        if self.workers:
            future = Future()
            self.queue.put((int(prefetch), next(self.order), future, index, dst))
            return future
        self.store.read_into(index, dst)
        return None

    def _work(self) -> None:
        while True:
            _, _, future, index, dst = self.queue.get()
            if future is None:
                return
            if not future.set_running_or_notify_cancel():
                continue  # a prefetch cancelled while queued
            try:
                self.store.read_into(index, dst)
                future.set_result(None)
            except BaseException as exc:  # handed to whoever waits on the load
                future.set_exception(exc)

    @staticmethod
    def cancel(handle) -> bool:
        """Cancel a load not yet started (a queued prefetch); whether it was."""
        return isinstance(handle, Future) and handle.cancel()

    @staticmethod
    def done(handle) -> bool:
        return handle is None or (handle.done() if isinstance(handle, Future) else handle.query())

    @staticmethod
    def wait_host(handle) -> None:
        if isinstance(handle, Future):
            handle.result()
        elif handle is not None:
            handle.synchronize()

    @staticmethod
    def wait(handle) -> None:
        if isinstance(handle, Future):
            handle.result()
        elif handle is not None:  # CUDA: the compute stream waits, the host does not
            torch.cuda.current_stream().wait_event(handle)

    def close(self) -> None:
        for _ in self.workers:
            self.queue.put((2, next(self.order), None, 0, None))
        for w in self.workers:
            w.join()
        self.workers = []
