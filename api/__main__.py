"""`python -m api`: serve the REST API on `api_host:api_port` (127.0.0.1:8001 by default)."""

from __future__ import annotations

import argparse
import os

import uvicorn

from api.app import create_app
from turnout.auth import AuthConfigError
from turnout.config import ConfigError, ModelSwitchingConfig
from turnout.runtime import setup_logging
from turnout.tracing import setup_tracing


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m api")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    args = parser.parse_args()
    setup_logging(os.environ.get("TURNOUT_LOG_LEVEL", "INFO"))
    try:
        settings = ModelSwitchingConfig.from_env()
    except ConfigError as exc:
        raise SystemExit(f"turnout API: {exc}") from None
    if not settings.enable_management_api:
        raise SystemExit("the management API is disabled (VLLM_MODEL_SWITCHING_ENABLE_API)")
    setup_tracing("api")
    try:
        app = create_app(settings)
    except AuthConfigError as exc:  # names the setting: fix it, nothing else is wrong
        raise SystemExit(f"turnout API: {exc}") from None
    uvicorn.run(app, host=args.host or settings.api_host,
                port=args.port or settings.api_port, log_config=None)


if __name__ == "__main__":
    main()
