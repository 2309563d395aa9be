"""Measured activations per request for `allocmoe serve`, fed by a forward hook on the served model.

Sequentially one `generate` runs at a time, so a request's meter holds exactly its own prompt and generated
tokens ("scope": "request"). Under continuous batching a forward call packs tokens of several requests; a
request's meter then holds every call made while it was in flight ("scope": "batch"): for `fixed`/`threshold`
plans that is the same figure, for `global` it is the budget the batch shared. The server-wide figure since
start is always given too.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

HEADER = "x-allocmoe-activations-per-token"
SERVER_HEADER = "x-allocmoe-server-activations-per-token"


@dataclass
class Meter:
    """Measured pairs and real tokens of the forward calls made while it was open."""

    pairs: int = 0
    tokens: int = 0
    open: bool = False

    @property
    def activations_per_token(self) -> float | None:
        return self.pairs / self.tokens if self.tokens else None


@dataclass
class ActivationMeters:
    """Per-request meters fed by a forward hook on the served model (thread-safe)."""

    handle: object
    scope: str = "request"
    meters: dict = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    total: Meter = field(default_factory=Meter)  # whole forward calls since start (read under the lock)

    def install(self, model):
        return model.register_forward_hook(self.after_forward)

    def after_forward(self, module, args, output):
        last = self.handle.counts()["last"]
        pairs, tokens = sum(last["pairs_per_layer"]), last["tokens"]
        with self.lock:
            self.total.pairs += pairs
            self.total.tokens += tokens
            for m in self.meters.values():
                if m.open:
                    m.pairs += pairs
                    m.tokens += tokens

    def create(self, rid: str, open: bool) -> Meter:
        with self.lock:
            m = self.meters[rid] = Meter(open=open)
        return m

    def set_open(self, rid: str | None, value: bool) -> None:
        with self.lock:
            m = self.meters.get(rid)
            if m is not None:
                m.open = value

    def pop(self, rid: str) -> Meter | None:
        with self.lock:
            return self.meters.pop(rid, None)

    def server(self) -> dict:
        with self.lock:  # not handle.counts(): another thread may be half-way through a forward call
            apt, tokens = self.total.activations_per_token, self.total.tokens
        return {"activations_per_token": apt, "tokens": tokens,
                "full_activations_per_token": sum(l.top_k for l in self.handle.layers)}

    def usage_extra(self, rid: str) -> dict:
        """The fields added to a finished request's usage block (its meter is closed and dropped)."""
        m = self.pop(rid)
        srv = self.server()
        return {"activations_per_token": m.activations_per_token if m else None,
                "activations_scope": self.scope,
                "routed_tokens": m.tokens if m else 0,
                "server_activations_per_token": srv["activations_per_token"],
                "full_activations_per_token": srv["full_activations_per_token"]}
