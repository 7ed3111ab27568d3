"""One logging set-up for the server process and the inference worker (a spawned process that does not
inherit the parent's handlers). Every line carries the request id of the request it concerns ("-" when
none): the HTTP process sets it per request, the worker per job."""

import contextvars
import logging

LOG_FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s [%(request_id)s]: %(message)s"
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get()
        return True


def configure_logging(level: int = logging.INFO) -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level, format=LOG_FORMAT)
    for handler in root.handlers:
        if not any(isinstance(f, _RequestIdFilter) for f in handler.filters):
            handler.addFilter(_RequestIdFilter())
    # bitsandbytes logs a warning on every 8-bit matmul that it casts bf16 inputs to fp16.
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
