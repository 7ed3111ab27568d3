"""Wire dialects besides OpenAI's chat and legacy completions (`ptserve/protocol.py`, `streaming.py`).

Each module translates its requests into the one internal request (an OpenAI chat body, validated and
prepared by `frontend.Frontend` like any other) and renders the engine's output back in its own shape:
bodies, stream events and errors. `api.py` registers their routes.
"""
