"""Fault injection for tests/test_faults.py, loaded by every Python process of a test server (the
inference worker is a fresh spawned interpreter) when this folder is on PYTHONPATH and FAULT_INJECT says
what to break. Nothing in ptserve knows about it.

    FAULT_INJECT=oom:N     the engine's Nth decoding forward pass (no row joining) raises
                           torch.OutOfMemoryError (once)
    FAULT_INJECT=fatal:N   the Nth decoding pass raises a CUDA error that leaves the device unusable
    FAULT_INJECT=thread:N  the engine thread itself dies (BaseException) at the Nth decoding pass
"""

import os
import sys

_SPEC = os.environ.get("FAULT_INJECT")
_TARGET = "ptserve.engine.scheduler"


class EngineThreadKilled(BaseException):
    """Not an Exception: nothing in a step handler catches it, as with a bug outside the step."""


def _install(scheduler, kind: str, at: int) -> None:
    import torch

    real = scheduler.Engine._forward
    errors = {
        "oom": lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)"),
        "fatal": lambda: RuntimeError("CUDA error: an illegal memory access was encountered (injected)"),
        "thread": lambda: EngineThreadKilled("engine thread killed (injected)"),
    }

    def forward(self, batch, input_ids, position_ids, prefill):
        if not prefill:
            self._injected_steps = getattr(self, "_injected_steps", 0) + 1
            if self._injected_steps == at:
                raise errors[kind]()
        return real(self, batch, input_ids, position_ids, prefill)

    scheduler.Engine._forward = forward


class _PatchOnImport:
    """Patches the scheduler when the server imports it: importing it here, before the script's folder is
    on sys.path, could load another checkout's ptserve."""

    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        for finder in sys.meta_path:
            spec = finder.find_spec(name, path, target) if finder is not self and hasattr(finder, "find_spec") else None
            if spec is not None:
                break
        else:
            return None
        exec_module = spec.loader.exec_module
        kind, _, at = _SPEC.partition(":")

        def patched(module):
            exec_module(module)
            _install(module, kind, int(at))

        spec.loader.exec_module = patched
        return spec


if _SPEC:
    sys.meta_path.insert(0, _PatchOnImport())
