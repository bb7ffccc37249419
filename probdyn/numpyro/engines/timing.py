"""Compile-time accounting from JAX's own monitoring events."""

from __future__ import annotations

import time
from types import TracebackType

from jax import monitoring

_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)


class CompileTimer:
    """Measure wall time spent tracing, lowering and compiling inside a ``with`` block.

    Tracing events nest (tracing an outer ``jit`` traces the inner ones), so the
    events are kept as time intervals and the length of their union is reported.
    """

    def __init__(self) -> None:
        self._intervals: list[tuple[float, float]] = []

    def _listener(self, event: str, duration_secs: float, **_: str | int) -> None:
        if event in _EVENTS:
            end = time.perf_counter()
            self._intervals.append((end - duration_secs, end))

    def __enter__(self) -> CompileTimer:
        monitoring.register_event_duration_secs_listener(self._listener)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        monitoring.unregister_event_duration_listener(self._listener)

    @property
    def seconds(self) -> float:
        total, end = 0.0, -float("inf")
        for a, b in sorted(self._intervals):
            if b <= end:
                continue
            total += b - max(a, end)
            end = b
        return total
