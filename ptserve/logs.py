"""One logging set-up for the server process and the inference worker (a spawned process that does not
inherit the parent's handlers)."""

import logging

LOG_FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"


def configure_logging(level: int = logging.INFO) -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level, format=LOG_FORMAT)
    # bitsandbytes logs a warning on every 8-bit matmul that it casts bf16 inputs to fp16.
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
