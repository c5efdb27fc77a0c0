"""The `turnout` command: run the stack, make tiny models, register, switch, watch, and
steer running switches (rollback, pause, resume, promote, abort, emergency-rollback);
read health and alerts, change monitoring thresholds, mirror traffic to a shadow; list
the engine fleet and preload versions; make API keys, say which key is in use, read
the audit log.

`--watch` (on `switch`, `status`, `operations`, `engines`) redraws a live view in place on
a terminal and prints each change as plain text elsewhere; a watched switch exits 0 only
when promoted (see `turnout.client.views.EXIT_CODES`), and Ctrl-C ends the watch, never
the switch."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from turnout.domain import OmniModelConfig, OperationStatus, SwitchingStrategyType

# Operator controls of a running switch (the workflow updates of the same names).
CONTROL_HELP = {
    "rollback": "send all traffic back to the stable version and end the switch",
    "pause": "freeze a switch's weights and evaluation timer",
    "resume": "continue a paused switch",
    "promote": "jump to 100%% on the target and finish the switch",
    "abort": "stop a switch and return traffic to the stable version",
}


def _print(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def _up(args: argparse.Namespace) -> int:
    argv = [sys.executable, "-m", "workers.stack", "--state-dir", args.state_dir]
    if args.ui_port is not None:
        argv += ["--ui-port", str(args.ui_port)]
    os.execv(sys.executable, argv)  # replaces this process: Ctrl-C reaches the stack directly


def _make_models(args: argparse.Namespace) -> int:
    from turnout.tinymodels import ensure_tiny_models

    _print({name: str(path) for name, path in ensure_tiny_models(Path(args.dir)).items()})
    return 0


def _db_upgrade(args: argparse.Namespace) -> int:
    from turnout.config import ModelSwitchingConfig
    from turnout.store import upgrade

    upgrade(ModelSwitchingConfig.from_env().database_url)
    return 0


def _register(args: argparse.Namespace) -> int:
    from turnout.sdk import DynamicModelRegistry

    config = OmniModelConfig(model=args.model, model_arch=args.arch, model_stage=args.stage,
                             engine_args=args.engine_args)
    model_id = DynamicModelRegistry().register_model(config, args.version,
                                                     args.metadata,
                                                     aliases=args.alias)
    _print({"model_id": model_id, "version": args.version})
    return 0


def _switch(args: argparse.Namespace) -> int:
    from turnout.sdk import ModelSwitcher

    switcher = ModelSwitcher()
    result = asyncio.run(switcher.switch_model(
        args.model_id, args.version, SwitchingStrategyType(args.strategy),
        args.config, wait=False if args.watch else (args.wait or None),
        requested_by=os.environ.get("USER")))
    if args.watch and result.success and result.operation_id:
        return _watch_switch(switcher, result.operation_id, args.interval)
    _print(result.model_dump(mode="json"))
    return 0 if result.success else 1


def _status(args: argparse.Namespace) -> int:
    from turnout.sdk import ModelSwitcher

    if args.watch:
        return _watch_switch(ModelSwitcher(), args.operation_id, args.interval)
    _print(ModelSwitcher().get_switch_status(args.operation_id))
    return 0


def _watch_switch(switcher: Any, operation_id: str, interval_s: float) -> int:
    """Follow a switch until it ends; its exit code says how it ended."""
    from turnout.client.views import EXIT_INTERRUPTED, exit_code, switch_view
    from turnout.client.watch import watch

    try:
        status = watch(lambda: switcher.get_switch_status(operation_id),
                       lambda s, now, plain: switch_view(s, now, plain=plain),
                       done=lambda s: exit_code(s) is not None, interval_s=interval_s)
    except KeyboardInterrupt:
        print(f"stopped watching; the switch goes on (turnout status {operation_id} "
              f"--watch)", file=sys.stderr)
        return EXIT_INTERRUPTED
    code = exit_code(status)
    assert code is not None
    return code


def _watch_until_interrupted(fetch: Any, render: Any, interval_s: float, once: bool) -> int:
    """A view with no end of its own (operations, engines): until Ctrl-C, which is how it
    is meant to end (exit 0)."""
    from turnout.client.watch import watch

    try:
        watch(fetch, render, done=lambda _: False, interval_s=interval_s, once=once)
    except KeyboardInterrupt:
        pass
    return 0


def _control(args: argparse.Namespace) -> int:
    from turnout.sdk import ModelSwitcher

    act = getattr(ModelSwitcher(), args.action)
    _print(act(args.operation_id, args.reason, requested_by=os.environ.get("USER")))
    return 0


def _emergency_rollback(args: argparse.Namespace) -> int:
    from turnout.sdk import ModelSwitcher

    _print(ModelSwitcher().emergency_rollback(args.model_id, args.reason,
                                              requested_by=os.environ.get("USER")))
    return 0


def _operations(args: argparse.Namespace) -> int:
    from turnout.sdk import ModelSwitcher

    switcher = ModelSwitcher()
    if not args.watch:
        _print(switcher.list_operations(model_id=args.model, status=args.status))
        return 0

    def fetch() -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
        operations = switcher.list_operations(model_id=args.model, status=args.status)
        live = {op["operation_id"]: switcher.get_switch_status(op["operation_id"])
                for op in operations if not OperationStatus(op["status"]).terminal}
        return operations, live

    from turnout.client.views import operations_view

    return _watch_until_interrupted(
        fetch, lambda data, now, plain: operations_view(*data, plain=plain), args.interval,
        once=False)


def _models(args: argparse.Namespace) -> int:
    from turnout.sdk import DynamicModelRegistry

    _print([m.model_dump(mode="json") for m in DynamicModelRegistry().list_models()])
    return 0


def _health(args: argparse.Namespace) -> int:
    from turnout.client.health_monitor import HealthMonitor

    health = HealthMonitor().get_model_health(args.model_id)
    _print([m.model_dump(mode="json") for m in health] if isinstance(health, list)
           else health.model_dump(mode="json"))
    return 0


def _alerts(args: argparse.Namespace) -> int:
    from turnout.client.health_monitor import HealthMonitor

    monitor = HealthMonitor()
    if args.acknowledge is not None:
        _print(monitor.acknowledge_alert(args.acknowledge, os.environ.get("USER"))
               .model_dump(mode="json"))
        return 0
    alerts = monitor.get_alerts(args.model, severity=args.severity, state=args.state)
    _print([a.model_dump(mode="json") for a in alerts])
    return 0


def _thresholds(args: argparse.Namespace) -> int:
    from turnout.client.health_monitor import HealthMonitor

    changes: dict[str, Any] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"{item!r}: expected KEY=VALUE, e.g. error_rate_warning=0.03")
        changes[key] = json.loads(value)
    monitor = HealthMonitor()
    applied = monitor.update_thresholds(changes, args.model) if changes \
        else monitor.get_thresholds(args.model)
    _print(applied.model_dump(mode="json"))
    return 0


def _shadow(args: argparse.Namespace) -> int:
    from turnout.sdk import ModelSwitcher

    switcher, user = ModelSwitcher(), os.environ.get("USER")
    if args.stop:
        _print(switcher.stop_shadow(args.model_id, args.reason, requested_by=user))
    elif args.version:
        _print(switcher.start_shadow(args.model_id, args.version, args.percent,
                                     duration_minutes=args.minutes, requested_by=user))
    else:
        _print(switcher.get_shadow(args.model_id))
    return 0


def _engines(args: argparse.Namespace) -> int:
    from turnout.cache import ModelCache
    from turnout.client.views import engines_view

    cache = ModelCache()
    if args.json:
        _print(cache.fleet())
        return 0
    return _watch_until_interrupted(cache.fleet,
                                    lambda fleet, now, plain: engines_view(fleet, plain=plain),
                                    args.interval, once=not args.watch)


def _preload(args: argparse.Namespace) -> int:
    from turnout.cache import ModelCache

    cache, user = ModelCache(), os.environ.get("USER")
    if args.release:
        _print(cache.release(args.model_id, args.version, requested_by=user))
    elif args.status:
        _print(cache.preload_status(args.model_id, args.version))
    else:
        _print(cache.preload(args.model_id, args.version, priority=args.priority,
                             requested_by=user))
    return 0


def _key_name(value: str) -> str:
    from turnout.auth import ANONYMOUS, KEY_NAME_PATTERN

    if not re.fullmatch(KEY_NAME_PATTERN, value) or value == ANONYMOUS:
        raise argparse.ArgumentTypeError(f"{value!r}: up to 64 letters, digits and . _ @ -, "
                                         f"starting with a letter or digit (not {ANONYMOUS!r})")
    return value


def _make_key(args: argparse.Namespace) -> int:
    from turnout.auth import ApiKey, Role, hash_key, make_key

    key = make_key()
    entry = ApiKey(name=args.name, role=Role(args.role), key_sha256=hash_key(key))
    _print({"key": key, "entry": entry.model_dump(mode="json")})
    print("Give `key` to its holder (it is shown once); add `entry` to the key file "
          "(VLLM_MODEL_SWITCHING_API_KEYS_FILE) and restart the API.", file=sys.stderr)
    return 0


def _whoami(args: argparse.Namespace) -> int:
    from turnout.sdk import ModelSwitcher

    _print(ModelSwitcher().whoami())
    return 0


def _audit(args: argparse.Namespace) -> int:
    from turnout.sdk import ModelSwitcher

    _print(ModelSwitcher().list_audit(model_id=args.model, actor=args.actor,
                                      action=args.action, since=args.since,
                                      before=args.before, limit=args.limit))
    return 0


def _json_object(value: str) -> dict[str, Any]:
    """A JSON object option: argparse then names the option a bad value was given to."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc.msg} at character {exc.pos}): "
                                         f"{value[:80]!r}") from None
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError(f"a JSON object is needed, not {value[:80]!r}")
    return parsed


def _interval(value: str) -> float:
    seconds = float(value)
    if not 0.1 <= seconds <= 3600:
        raise argparse.ArgumentTypeError(f"{value}: between 0.1 and 3600 seconds")
    return seconds


def _watch_flags(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--watch", action="store_true", help=help_text)
    parser.add_argument("--interval", type=_interval, default=1.0, metavar="SECONDS",
                        help="seconds between looks when watching (default 1)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="turnout", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run the whole stack locally (what `make run` does)")
    up.add_argument("--state-dir", default=".turnout")
    up.add_argument("--ui-port", type=int, help="the Temporal Web UI's port (default 8233)")
    up.set_defaults(func=_up)

    make = sub.add_parser("make-models", help="make two tiny model versions (v1, v2) in DIR")
    make.add_argument("dir")
    make.set_defaults(func=_make_models)

    db = sub.add_parser("db-upgrade", help="apply the store's migrations")
    db.set_defaults(func=_db_upgrade)

    reg = sub.add_parser("register", help="register a model version (POST /models)")
    reg.add_argument("--model", required=True,
                     help="model directory (under the API's model roots) or hub id org/name")
    reg.add_argument("--arch", required=True, help="model_arch")
    reg.add_argument("--stage", default="default", help="model_stage")
    reg.add_argument("--version", required=True)
    reg.add_argument("--metadata", type=_json_object, default={}, help="JSON object")
    reg.add_argument("--engine-args", type=_json_object, default={},
                     help="JSON object of vLLM options")
    reg.add_argument("--alias", action="append", default=[])
    reg.set_defaults(func=_register)

    sw = sub.add_parser("switch", help="switch a model to a version (POST /switch)")
    sw.add_argument("model_id")
    sw.add_argument("version")
    sw.add_argument("--strategy", default="immediate",
                    choices=[s.value for s in SwitchingStrategyType])
    sw.add_argument("--config", type=_json_object, default={},
                    help="strategy_config as a JSON object")
    sw.add_argument("--wait", action="store_true", help="wait until it ends")
    _watch_flags(sw, "follow the switch live until it ends; exit code 0 only if promoted")
    sw.set_defaults(func=_switch)

    st = sub.add_parser("status", help="status of a switching operation")
    st.add_argument("operation_id")
    _watch_flags(st, "follow the switch live until it ends; exit code 0 only if promoted")
    st.set_defaults(func=_status)

    for action, help_text in CONTROL_HELP.items():
        ctl = sub.add_parser(action, help=help_text)
        ctl.add_argument("operation_id")
        ctl.add_argument("--reason", help="why (kept in the audit log and the status)")
        ctl.set_defaults(func=_control, action=action)

    emergency = sub.add_parser(
        "emergency-rollback",
        help="roll back the model's active switch, or switch it back to its previous version")
    emergency.add_argument("model_id")
    emergency.add_argument("--reason", help="why (kept in the audit log)")
    emergency.set_defaults(func=_emergency_rollback)

    ops = sub.add_parser("operations", help="list switching operations, newest first")
    ops.add_argument("--model", help="only this model id")
    ops.add_argument("--status", choices=[s.value for s in OperationStatus])
    _watch_flags(ops, "a live table of the operations (Ctrl-C ends it)")
    ops.set_defaults(func=_operations)

    models = sub.add_parser("models", help="list models and versions")
    models.set_defaults(func=_models)

    health = sub.add_parser("health", help="figures and state of every version "
                                           "(GET /health/models)")
    health.add_argument("model_id", nargs="?", help="only this model")
    health.set_defaults(func=_health)

    alerts = sub.add_parser("alerts", help="alerts (firing by default), or acknowledge one")
    alerts.add_argument("--model", help="only this model id")
    alerts.add_argument("--severity", choices=["info", "warning", "critical"])
    alerts.add_argument("--state", choices=["firing", "resolved"], default="firing")
    alerts.add_argument("--acknowledge", type=int, metavar="ALERT_ID")
    alerts.set_defaults(func=_alerts)

    thresholds = sub.add_parser("thresholds", help="read or change monitoring levels")
    thresholds.add_argument("set", nargs="*", metavar="KEY=VALUE",
                            help="e.g. error_rate_warning=0.03 latency_p95_warning=3000")
    thresholds.add_argument("--model", help="one model's levels (default: every model's)")
    thresholds.set_defaults(func=_thresholds)

    shadow = sub.add_parser("shadow", help="mirror a share of a model's requests to a "
                                           "version; without VERSION, show the shadow")
    shadow.add_argument("model_id")
    shadow.add_argument("version", nargs="?")
    shadow.add_argument("--percent", type=float, default=100.0)
    shadow.add_argument("--minutes", type=float, help="how long (default: until --stop)")
    shadow.add_argument("--stop", action="store_true", help="stop mirroring")
    shadow.add_argument("--reason")
    shadow.set_defaults(func=_shadow)

    engines = sub.add_parser("engines", help="engine hosts and every engine with its role "
                                             "(GET /engines), as tables")
    engines.add_argument("--json", action="store_true", help="the API's JSON instead")
    _watch_flags(engines, "redraw the tables live (Ctrl-C ends it)")
    engines.set_defaults(func=_engines)

    preload = sub.add_parser("preload", help="load a version without traffic so a switch "
                                             "to it needs no cold start")
    preload.add_argument("model_id")
    preload.add_argument("version")
    preload.add_argument("--priority", type=int, default=0,
                         help="cached engines of a lower priority may be evicted for it")
    preload.add_argument("--release", action="store_true", help="let go of the preload")
    preload.add_argument("--status", action="store_true", help="show the preload")
    preload.set_defaults(func=_preload)

    key = sub.add_parser("make-key", help="make a new API key for the key file: prints the "
                                          "key (once) and its file entry")
    key.add_argument("name", type=_key_name, help="the key's name: the actor in the audit "
                                                  "log (letters, digits, . _ @ -)")
    key.add_argument("--role", choices=["viewer", "operator", "admin"], default="viewer")
    key.set_defaults(func=_make_key)

    whoami = sub.add_parser("whoami", help="the name and role of the key this CLI sends")
    whoami.set_defaults(func=_whoami)

    audit = sub.add_parser("audit", help="the audit log, newest first (GET /audit)")
    audit.add_argument("--model", help="only this model id")
    audit.add_argument("--actor", help="only calls by this key name")
    audit.add_argument("--action", help="only this action, e.g. switch_requested")
    audit.add_argument("--since", help="ISO time, e.g. 2025-01-31T12:00:00Z")
    audit.add_argument("--before", type=int, help="only entries older than this id")
    audit.add_argument("--limit", type=int, default=50)
    audit.set_defaults(func=_audit)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except KeyboardInterrupt:  # before a watch began (a watch handles its own)
        code = 130
    except Exception as exc:  # one clear line for the operator, not a traceback
        print(f"turnout: {exc}", file=sys.stderr)
        code = 1
    sys.stdout.flush()
    os._exit(code)  # sdk-python #300: end deliberately rather than at interpreter teardown


if __name__ == "__main__":
    main()
