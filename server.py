"""ptserve: an OpenAI-compatible server for microsoft/Phi-3.5-mini-instruct.

python server.py [--config PATH] [--model ID_OR_DIR] [--port N] [--host H] [--api-key KEY ...]
                 [--quantization none|4bit|8bit]
"""

import argparse
import logging
import os
import signal
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the API server forks after loading the tokenizer


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="OpenAI-compatible server for Phi-3.5-mini-instruct")
    parser.add_argument("--config", default="config.yaml", help="YAML config file (default: config.yaml)")
    parser.add_argument("--model", help="hub id or local directory (model.id)")
    parser.add_argument("--port", type=int, help="port to listen on (server.port)")
    parser.add_argument("--host", help="127.0.0.1, 0.0.0.0 or :: (server.host)")
    parser.add_argument(
        "--api-key",
        action="append",
        help="require 'Authorization: Bearer KEY' on /v1 routes (server.api_key); repeat for several keys",
    )
    parser.add_argument("--quantization", choices=["none", "4bit", "8bit"], help="quantization.mode")
    return parser.parse_args(argv)


_MAIN_PID = os.getpid()


def _interrupt(signum, frame):
    if os.getpid() != _MAIN_PID:  # a forked API-server process inherited this: default behaviour there
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise KeyboardInterrupt  # LitServe's graceful shutdown path


def main(argv=None) -> int:
    from ptserve.config import ConfigError, load_config
    from ptserve.logs import configure_logging

    args = parse_args(argv)
    configure_logging()
    overrides = {
        ("model", "id"): args.model,
        ("server", "port"): args.port,
        ("server", "host"): args.host,
        ("server", "api_key"): args.api_key,
        ("quantization", "mode"): args.quantization,
    }
    config_path = args.config if (args.config != "config.yaml" or os.path.exists(args.config)) else None
    try:
        config = load_config(config_path, overrides=overrides)
    except ConfigError as exc:
        print(f"ptserve: {exc}", file=sys.stderr)
        return 2
    logging.getLogger("ptserve").info("settings that differ from the defaults: %s", config.non_defaults())
    # SIGTERM (docker stop, Kubernetes) and SIGINT (even when a shell started us in the background with
    # SIGINT ignored) both shut down gracefully.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    from ptserve.api import run

    try:
        return 0 if run(config) else 1
    except OSError as exc:  # transformers' word for a model id or directory it cannot load
        print(f"ptserve: cannot load model {config.model.id!r}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
