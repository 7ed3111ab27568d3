"""Fault injection for tests/test_faults.py, loaded by every Python process of a test server (the
inference worker is a fresh spawned interpreter) when this folder is on PYTHONPATH and FAULT_INJECT says
what to break. Nothing in ptserve knows about it.

    FAULT_INJECT=oom:N     the engine's Nth decode step raises torch.OutOfMemoryError (once)
    FAULT_INJECT=fatal:N   the Nth decode step raises a CUDA error that leaves the device unusable
    FAULT_INJECT=thread:N  the engine thread itself dies (BaseException) at the Nth decode step
"""

import os

_SPEC = os.environ.get("FAULT_INJECT")


class EngineThreadKilled(BaseException):
    """Not an Exception: nothing in a step handler catches it, as with a bug outside the step."""


def _install(kind: str, at: int) -> None:
    import torch

    from ptserve.engine import scheduler

    real = scheduler.Engine._decode_step
    errors = {
        "oom": lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)"),
        "fatal": lambda: RuntimeError("CUDA error: an illegal memory access was encountered (injected)"),
        "thread": lambda: EngineThreadKilled("engine thread killed (injected)"),
    }

    def decode_step(self):
        self._injected_steps = getattr(self, "_injected_steps", 0) + 1
        if self._injected_steps == at:
            raise errors[kind]()
        return real(self)

    scheduler.Engine._decode_step = decode_step


if _SPEC:
    _kind, _, _at = _SPEC.partition(":")
    _install(_kind, int(_at))
