"""`python -m api`: serve the REST API on `api_host:api_port` (127.0.0.1:8001 by default)."""

from __future__ import annotations

import argparse
import os

import uvicorn

from api.app import create_app
from turnout.config import ModelSwitchingConfig
from turnout.runtime import setup_logging


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m api")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    args = parser.parse_args()
    setup_logging(os.environ.get("TURNOUT_LOG_LEVEL", "INFO"))
    settings = ModelSwitchingConfig.from_env()
    if not settings.enable_management_api:
        raise SystemExit("the management API is disabled (VLLM_MODEL_SWITCHING_ENABLE_API)")
    uvicorn.run(create_app(settings), host=args.host or settings.api_host,
                port=args.port or settings.api_port, log_config=None)


if __name__ == "__main__":
    main()
