"""`python -m bench [--short] [--stack NAME --port-base N] [...]`: run the benchmark, print a table, write JSON.

Order: the stack's services -> a fresh `swarm_bench` database -> benchmark devices (rows,
certificates, broker users) -> raw limits (the app not running) -> the app (uvicorn, N workers)
-> `tasks/next` on the empty database -> intake -> round trip -> connections -> fairness -> bulk load ->
`tasks/next` again -> processes (step transitions, empty and with stored instances; in the
bench process, before the app starts). Other sections can be left out with --sections.
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import uvloop

from bench import connections, fairness, fleet, intake, plans, processes, raw, roundtrip, scale
from bench.env import ROOT, Stack, busy_percent, fresh_database, measured_commit, running_app, start_services
from bench.progress import Progress, print_waits

SECTIONS = ("raw", "intake", "roundtrip", "scale", "connections", "fairness", "processes")
RESULTS_DIR = ROOT / "bench-results"
FLEET_PREFIX = "b-"
# Before anything starts, the machine is watched this long: a run on a busy box measures its
# neighbours too, and says so.
BUSY_SAMPLE_S = 2.0
# What a stopped run may take to stop the app (30 s) and the simulators (60 s) it started.
STOP_GRACE_S = 120.0

# (full, short) defaults of every sized parameter.
DEFAULTS: dict[str, tuple[float, float]] = {
    "raw_seconds": (10, 2),
    "concurrency": (64, 16),
    "intake_seconds": (15, 3),
    "intake_devices": (1000, 50),
    "rt_devices": (1000, 20),
    # Closed loop, one task in flight each: enough to keep the broker busy, few enough that the
    # single device process is not what limits it.
    "raw_devices": (20, 5),
    "rt_rate": (1000, 50),
    "rt_seconds": (20, 3),
    "scale_devices": (100_000, 1000),
    "scale_calls": (1000, 30),
    "connections": (10_000, 50),
    # This box's broker takes ~50 TLS connects/s; at 250/s its accept queue overflows and the run
    # measures the collapse of the connect path, not how many devices stay connected.
    "connect_rate": (50, 100),
    "hold_seconds": (20, 2),
    "sim_processes": (2, 1),
    "process_workers": (32, 4),
    "process_seconds": (15, 1),
    "process_instances": (1_000_000, 2_000),
    "fair_victims": (20, 3),
    "fair_rate": (20, 10),
    "fair_seconds": (20, 4),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", action="store_true", help="CI mode: small sizes, under a minute")
    parser.add_argument("--stack", default="bench", help="the stack to run against (scripts/stack.sh)")
    parser.add_argument("--port-base", type=int, default=43000, help="the stack's SWARM_PORT_BASE")
    parser.add_argument("--workers", type=int, default=2, help="uvicorn worker processes")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list out of {','.join(SECTIONS)}")
    parser.add_argument("--token", default=os.environ.get("BENCH_TOKEN"), help="bearer token, if the API wants one")
    parser.add_argument(
        "--no-hello", action="store_true", help="connections: devices only connect (no hello, no tasks/next)"
    )
    parser.add_argument(
        "--no-ask-next", action="store_true", help="roundtrip: devices report results without `next` (older SDKs)"
    )
    parser.add_argument("--flood-method", default="tasks/next", help="fairness: the method the flooding device sends")
    parser.add_argument(
        "--deadline-s", type=float, default=None, help="stop the run (and say where it was) after this many seconds"
    )
    parser.add_argument("--output", type=Path, default=None, help="JSON file (default: bench-results/<time>.json)")
    parser.add_argument(
        "--busy-threshold",
        type=float,
        default=25.0,
        help="warn when the processors were more than this percent busy before the run (default 25)",
    )
    for name in DEFAULTS:
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=None)
    args = parser.parse_args(argv)
    for name, (full, short) in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, short if args.short else full)
    args.sections = [s for s in args.sections.split(",") if s]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    return args


async def run(args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    RESULTS_DIR.mkdir(exist_ok=True)
    logs = {"app": RESULTS_DIR / f"{stamp}-app.log", "simulator": RESULTS_DIR / f"{stamp}-simulator.log"}
    results: dict[str, Any] = {"meta": _meta(args, stamp, logs)}
    wanted = set(args.sections)

    busy = await busy_percent(BUSY_SAMPLE_S)
    box = {"cpu_busy_pct": busy, "sample_s": BUSY_SAMPLE_S, "threshold_pct": args.busy_threshold}
    results["meta"]["box_before"] = box | {"busy": busy > args.busy_threshold}
    progress.say("setup", f"commit {results['meta']['commit'][:7]}; {_box_line(results['meta'])}")
    if warning := _busy_warning(results["meta"]):
        progress.say("setup", warning)

    progress.say("setup", f"stack {args.stack} (port base {args.port_base})")
    stack = await asyncio.to_thread(start_services, args.stack, args.port_base)
    settings = stack.settings
    if args.token is None:
        args.token = _mint_token(stack)
    results["meta"]["bearer_token"] = args.token is not None
    await fresh_database(stack)
    if purged := await fleet.purge_queues(settings):
        progress.say("setup", f"purged {purged} messages an earlier run left in the broker's queues")
    # The sections' simulated devices, and one more: the scale section's probe.
    simulated = [
        int(args.rt_devices) if "roundtrip" in wanted else 0,
        int(args.connections) if "connections" in wanted else 0,
        # The victims and the flooding device.
        int(args.fair_victims) + 1 if "fairness" in wanted else 0,
    ]
    enrolled = max(simulated) + 1
    progress.say("setup", f"enrolling {enrolled} devices (rows, certificates, broker users)")
    devices = await fleet.enrol(settings, stack.dsn, FLEET_PREFIX, enrolled, stack.run_dir / "bench-devices")
    probe = devices.ids()[-1]

    if "raw" in wanted or "intake" in wanted or "processes" in wanted:
        progress.say("raw", f"postgres INSERT+COMMIT, {int(args.concurrency)} connections")
        db = await raw.database_ceiling(stack.dsn, int(args.concurrency), args.raw_seconds, progress)
        progress.say("raw", "rabbitmq publish with confirms to amq.topic, 64 in flight")
        amqp = await raw.broker_ceiling(settings, 64, args.raw_seconds, progress)
        results["raw"] = {"postgres_insert_commit": db, "amqp_publish_confirmed": amqp}
        await _forget_raw_rows(stack)
    if "roundtrip" in wanted:
        progress.say("raw", f"the round trip without the app: {int(args.raw_devices)} closed-loop MQTT 5 devices")
        ceiling = await raw.roundtrip_ceiling(settings, devices, int(args.raw_devices), args.raw_seconds, progress)
        results.setdefault("raw", {})["roundtrip"] = ceiling
        # The raw devices' requests also reached the app's queues, the flood meter's among them:
        # read once the app starts, that backlog would look like a flood and block those devices.
        await fleet.purge_queues(settings)

    if "processes" in wanted:
        progress.say("processes", f"step transitions, {int(args.process_workers)} workers")
        results["processes"] = await processes.run(
            settings,
            stack.dsn,
            concurrency=int(args.process_workers),
            duration_s=args.process_seconds,
            loaded=int(args.process_instances),
            progress=progress,
        )
        ceiling = results["raw"]["postgres_insert_commit"]["per_s"]
        results["processes"]["ratio_to_db_ceiling"] = round(results["processes"]["empty"]["per_s"] / ceiling, 3)
    if set(wanted) <= {"raw", "processes"}:
        return _finish(results, args)
    if "intake" in wanted:
        await intake.prepare(settings, stack.dsn, int(args.intake_devices))
    progress.say("setup", f"starting the app: uvicorn, {args.workers} workers")
    async with running_app(stack, args.workers, logs["app"]) as app:
        results["meta"]["app_pids"] = app.pids()
        if "scale" in wanted:
            progress.say("scale", "tasks/next on the empty database, and the plans of the hot queries")
            empty = await scale.pull_latency(settings, devices, probe, int(args.scale_calls))
            empty_plans = await _plans(stack, probe)
        if "intake" in wanted:
            results["intake"] = await intake.run(
                stack.app_port,
                stack.dsn,
                devices=int(args.intake_devices),
                concurrency=int(args.concurrency),
                duration_s=args.intake_seconds,
                headers=_headers(args),
                app_pids=app.pids(),
                progress=progress,
            )
            ceiling = results["raw"]["postgres_insert_commit"]["per_s"]
            results["intake"]["ratio_to_db_ceiling"] = round(results["intake"]["persisted_per_s"] / ceiling, 3)
            floor = await intake.http_floor(
                stack.app_port,
                concurrency=int(args.concurrency),
                duration_s=args.intake_seconds,
                headers=_headers(args),
                app_pids=app.pids(),
                progress=progress,
            )
            floor["intake_ratio"] = round(results["intake"]["persisted_per_s"] / floor["per_s"], 3)
            results["intake"]["http_floor"] = floor
            results["intake"]["batch"] = await intake.run_batch(
                stack.app_port,
                stack.dsn,
                devices=int(args.intake_devices),
                clients=4,
                duration_s=args.intake_seconds,
                headers=_headers(args),
                progress=progress,
            )
        if "roundtrip" in wanted:
            results["roundtrip"] = await roundtrip.run(
                settings,
                stack.dsn,
                devices,
                stack=stack,
                app_pids=app.pids(),
                app_port=stack.app_port,
                devices=int(args.rt_devices),
                rate=args.rt_rate,
                duration_s=args.rt_seconds,
                headers=_headers(args),
                log_file=logs["simulator"],
                progress=progress,
                ask_next=not args.no_ask_next,
            )
            ceiling = results["raw"]["roundtrip"]["per_s"]
            results["roundtrip"]["share_of_raw_ceiling"] = round(results["roundtrip"]["achieved_per_s"] / ceiling, 3)
        if "connections" in wanted:
            results["connections"] = await connections.run(
                stack,
                devices,
                target=int(args.connections),
                connect_rate=args.connect_rate,
                hold_s=args.hold_seconds,
                processes=int(args.sim_processes),
                no_hello=args.no_hello,
                app_pids=app.pids(),
                log_file=logs["simulator"],
                progress=progress,
            )
        if "fairness" in wanted:
            results["fairness"] = await fairness.run(
                settings,
                stack.dsn,
                devices,
                app_port=stack.app_port,
                victims=int(args.fair_victims),
                rate=args.fair_rate,
                duration_s=args.fair_seconds,
                flood_method=args.flood_method,
                headers=_headers(args),
                log_file=logs["simulator"],
                progress=progress,
            )
        if "scale" in wanted:
            progress.say("scale", f"bulk load: {int(args.scale_devices)} devices x {scale.TASKS_PER_DEVICE} tasks")
            loaded = await scale.load(stack.dsn, int(args.scale_devices), probe, progress)
            progress.say("scale", "tasks/next on the loaded database")
            loaded["next_empty_ms"] = empty
            loaded["next_loaded_ms"] = await scale.pull_latency(settings, devices, probe, int(args.scale_calls))
            loaded["p50_change_pct"] = round((loaded["next_loaded_ms"]["p50"] / empty["p50"] - 1) * 100, 1)
            progress.say("scale", "EXPLAIN ANALYZE of the hot and periodic queries")
            loaded["plans_empty"] = empty_plans
            loaded["plans"] = await _plans(stack, probe)
            results["scale"] = loaded
    return _finish(results, args)


def _finish(results: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    results["meta"]["loadavg_end"] = os.getloadavg()
    results["targets"] = _targets(results, args)
    return results


async def _plans(stack: Stack, probe: str) -> dict[str, dict[str, Any]]:
    url = stack.settings.database.url.get_secret_value()
    return await plans.explain(url, scale.PENDING_DEVICE, scale.IN_PROGRESS_DEVICE, probe)


def _mint_token(stack: Stack) -> str | None:
    """A bearer token from the operator CLI, so the API is measured as a control center uses it."""
    minted = subprocess.run(
        [
            sys.executable,
            "-m",
            "app.cli",
            "token",
            "--sub=bench",
            "--ttl=86400",
            f"--env-file={stack.run_dir / 'app.env'}",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    # An app without API authentication has no `token` command: run without a token.
    return minted.stdout.strip() if minted.returncode == 0 else None


def _headers(args: argparse.Namespace) -> dict[str, str]:
    return {"Authorization": f"Bearer {args.token}"} if args.token else {}


async def _forget_raw_rows(stack: Stack) -> None:
    # Their notices were never sent: the app's re-send job would publish them all during intake.
    conn = await asyncpg.connect(stack.dsn)
    try:
        await conn.execute("DELETE FROM tasks WHERE device_id = $1", raw.RAW_DEVICE)
        await conn.execute("VACUUM ANALYZE tasks")
    finally:
        await conn.close()


def _meta(args: argparse.Namespace, stamp: str, logs: dict[str, Path]) -> dict[str, Any]:
    commit = measured_commit()
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "started_at": stamp,
        "mode": "short" if args.short else "full",
        "command": " ".join(["python -m bench", *sys.argv[1:]]),
        "commit": commit.sha,
        "commit_dirty": commit.dirty,
        "machine": {"cpus": os.cpu_count(), "cpu": cpu, "python": platform.python_version()},
        "loadavg_start": os.getloadavg(),
        "parameters": {name: getattr(args, name) for name in DEFAULTS} | {"workers": args.workers},
        "logs": {name: str(path.relative_to(ROOT)) for name, path in logs.items()},
    }


def _targets(results: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """The issue's targets against what this run measured (None: not measured in this run)."""
    targets: list[dict[str, Any]] = []

    def check(name: str, measured: float | None, met: bool | None) -> None:
        targets.append({"target": name, "measured": measured, "met": met})

    if "intake" in results:
        persisted = results["intake"]["persisted_per_s"]
        check("intake >= 5,000 tasks/s", persisted, persisted >= 5000)
        ratio = results["intake"]["ratio_to_db_ceiling"]
        check("intake >= 50% of the raw database ceiling", ratio, ratio >= 0.5)
        batch = results["intake"]["batch"]["persisted_per_s"]
        check("batch intake >= 50,000 tasks/s", batch, batch >= 50_000)
    if "roundtrip" in results:
        rt = results["roundtrip"]
        at_target_load = rt["devices"] >= 1000 and rt["offered_per_s"] >= 1000
        p99 = rt["latency_ms"]["p99"]
        lost = rt["not_final_after_wait"] + rt["post_errors"]
        check(
            "round trip p99 < 50 ms at 1,000 tasks/s, 1,000 devices",
            p99,
            p99 < 50 and not lost if at_target_load else None,
        )
        share = rt["share_of_raw_ceiling"]
        offered_enough = rt["offered_per_s"] >= results["raw"]["roundtrip"]["per_s"]
        check("round trip >= 70% of the raw round-trip ceiling", share, share >= 0.7 if offered_enough else None)
    if "scale" in results:
        sc = results["scale"]
        at_size = sc["tasks"] >= 1_000_000
        change = sc["p50_change_pct"]
        check("tasks/next p50 within 20% at 1M stored tasks", change, abs(change) <= 20 if at_size else None)
    if "processes" in results:
        pr = results["processes"]
        rate = pr["empty"]["per_s"]
        check("process step transitions >= 2,000/s", rate, rate >= 2000)
        change = pr["loaded_change_pct"]
        at_size = pr["loaded_instances"] >= 1_000_000
        check("transitions no slower with 1M stored instances", change, change >= -20 if at_size else None)
    if "connections" in results:
        cn = results["connections"]
        stayed = cn["stayed_connected"]
        # Connected is not enough when they said hello: each must have had its answer too.
        answered = cn["no_hello"] or cn["ready"] >= 10_000
        check(
            ">= 10,000 connected TLS devices" + (" (connect only)" if cn["no_hello"] else ", hellos answered"),
            stayed,
            stayed >= 10_000 and answered if args.connections >= 10_000 else None,
        )
    if "fairness" in results:
        fair = results["fairness"]
        ratio = fair["p99_ratio"]
        lost = fair["flooded"]["not_final_after_wait"] + fair["flooded"]["post_errors"]
        check(
            "other devices' p99 within 2x while one device floods",
            ratio,
            ratio is not None and ratio <= 2.0 and not lost,
        )
    return targets


def _box_line(meta: dict[str, Any]) -> str:
    box = meta["box_before"]
    return (
        f"processors {box['cpu_busy_pct']}% busy over the {box['sample_s']:g} s before the run "
        f"(load average {meta['loadavg_start'][0]:.2f})"
    )


def _busy_warning(meta: dict[str, Any]) -> str | None:
    box = meta["box_before"]
    if not box["busy"]:
        return None
    return (
        f"WARNING: the box was busy before the run ({box['cpu_busy_pct']}% > {box['threshold_pct']:g}%): "
        "these figures measure the neighbours too"
    )


def print_table(results: dict[str, Any]) -> None:
    meta = results["meta"]
    dirty = " (uncommitted changes)" if meta["commit_dirty"] else ""
    print(f"\n  commit {meta['commit'][:7]}{dirty}: {meta['command']}")
    print(f"  {_box_line(meta)}")
    if warning := _busy_warning(meta):
        print(f"  {warning}")
    rows: list[tuple[str, str]] = []
    if "postgres_insert_commit" in results.get("raw", {}):
        db, amqp = results["raw"]["postgres_insert_commit"], results["raw"]["amqp_publish_confirmed"]
        rows.append(("raw: postgres INSERT+COMMIT", f"{db['per_s']:,.0f}/s ({db['concurrency']} connections)"))
        rows.append(("raw: amqp publish, confirmed", f"{amqp['per_s']:,.0f}/s ({amqp['in_flight']} in flight)"))
    if "roundtrip" in results.get("raw", {}):
        ceiling = results["raw"]["roundtrip"]
        rows.append(
            (
                "raw: round trip without the app",
                f"{ceiling['per_s']:,.0f} tasks/s ({ceiling['devices']} closed-loop devices, "
                f"p50 {ceiling['latency_ms']['p50']} ms)",
            )
        )
    if "intake" in results:
        it = results["intake"]
        lat = it["answer_latency_ms"]
        rows.append(("intake: persisted", f"{it['persisted_per_s']:,.0f} tasks/s ({it['concurrency']} clients)"))
        rows.append(("intake: noticed", f"{it['noticed_per_s']:,.0f} tasks/s"))
        rows.append(("intake: ratio to db ceiling", f"{it['ratio_to_db_ceiling']:.0%}"))
        floor = it["http_floor"]
        rows.append(
            (
                "intake: HTTP floor (GET /healthz)",
                f"{floor['per_s']:,.0f}/s, same clients and workers; intake is {floor['intake_ratio']:.0%} of it",
            )
        )
        rows.append(("intake: answer p50/p99", f"{lat['p50']} / {lat['p99']} ms; errors {it['errors'] or 0}"))
        rows.append(
            (
                "intake: app CPU per request",
                f"{it['app_cpu_ms_per_task']} ms a task, {floor['app_cpu_ms_per_request']} ms per GET /healthz",
            )
        )
        batch = it["batch"]
        rows.append(
            (
                "intake: batch",
                f"{batch['persisted_per_s']:,.0f} tasks/s persisted, "
                f"{batch['noticed_per_s']:,.0f} noticed (batches of {batch['batch_size']})",
            )
        )
    if "processes" in results:
        pr = results["processes"]
        rows.append(
            (
                "processes: step transitions",
                f"{pr['empty']['per_s']:,.0f}/s empty ({pr['ratio_to_db_ceiling']:.0%} of the db ceiling), "
                f"{pr['loaded']['per_s']:,.0f}/s with {pr['loaded_instances']:,} stored instances "
                f"({pr['loaded_change_pct']:+}%); {pr['concurrency']} workers",
            )
        )
    if "roundtrip" in results:
        rt = results["roundtrip"]
        lat = rt["latency_ms"]
        rows.append(
            (
                "round trip: load",
                f"{rt['offered_per_s']:g}/s offered, {rt['devices']} devices, "
                f"{rt['completed']} done, {rt['not_final_after_wait']} not final",
            )
        )
        rows.append(("round trip: p50/p95/p99/max", f"{lat['p50']} / {lat['p95']} / {lat['p99']} / {lat['max']} ms"))
        before, left = rt["left_by_earlier_sections"], rt["left_for_next_section"]
        rows.append(
            (
                "round trip: settled",
                f"canceled {before['tasks_canceled']} unfinished tasks before it and {left['tasks_canceled']} after, "
                f"purged {before['messages_purged']} + {left['messages_purged']} messages",
            )
        )
        rows.append(
            ("round trip: share of raw ceiling", f"{rt['achieved_per_s']:g}/s = {rt['share_of_raw_ceiling']:.0%}")
        )
        per_task = ", ".join(f"{part} {ms}" for part, ms in rt["cpu"]["ms_per_task"].items())
        rows.append(("round trip: CPU ms per task", f"{per_task} (load average {rt['cpu']['load_average']:.1f})"))
    if "scale" in results:
        sc = results["scale"]
        empty, loaded = sc["next_empty_ms"], sc["next_loaded_ms"]
        rows.append(("scale: stored", f"{sc['devices']:,} devices, {sc['tasks']:,} tasks"))
        rows.append(("scale: tasks/next empty p50/p99", f"{empty['p50']} / {empty['p99']} ms"))
        rows.append(
            ("scale: tasks/next loaded p50/p99", f"{loaded['p50']} / {loaded['p99']} ms ({sc['p50_change_pct']:+}%)")
        )
        pull = [sum(sc[key][name]["ms"] for name in plans.PULL) for key in ("plans_empty", "plans")]
        rows.append(("scale: tasks/next in the database", f"{pull[0]:.2f} ms empty, {pull[1]:.2f} ms loaded"))
        slowest = sorted(sc["plans"].items(), key=lambda item: -item[1]["ms"])[:3]
        rows.append(("scale: slowest query plans", "; ".join(f"{name} {plan['ms']} ms" for name, plan in slowest)))
    if "connections" in results:
        cn = results["connections"]
        rows.append(
            (
                "connections: stayed connected",
                f"{cn['stayed_connected']:,} of {cn['target']:,} (connect {cn['connect_s']} s)",
            )
        )
        cpu = ", ".join(f"{name} {ms}" for name, ms in cn["cpu_ms_per_connect"].items())
        rows.append(("connections: rate", f"{cn['connect_per_s']}/s ({cn['simulator_processes']} simulator processes)"))
        rows.append(("connections: CPU ms/connect", cpu))
        held = ", ".join(f"{name} {pct}%" for name, pct in cn["hold_cpu_percent"].items())
        rows.append(("connections: CPU holding", held))
        backlogs = cn["app_queue_backlogs"]
        backlog = "unknown" if backlogs is None else ", ".join(f"{n} {c}" for n, c in backlogs.items()) or "none"
        rows.append(
            (
                "connections: app backlog then",
                f"{cn['ready']:,} said hello; {cn['connect_failures']:,} failed connects; waiting: {backlog}",
            )
        )
        rows.append(
            (
                "connections: memory/device",
                f"broker {cn['broker_bytes_per_device'] / 1024:.0f} KiB, "
                f"app {cn['app_bytes_per_device'] / 1024:.1f} KiB, "
                f"simulator {cn['simulator_bytes_per_device'] / 1024:.0f} KiB",
            )
        )
    if "fairness" in results:
        fair = results["fairness"]
        alone, flooded = fair["alone"]["latency_ms"], fair["flooded"]["latency_ms"]
        rows.append(
            (
                "fairness: load",
                f"{fair['offered_per_s']:g} tasks/s over {fair['victims']} devices; {fair['flooder']} floods "
                f"{fair['flood_method']} ({fair['flood_sent']:,} sent, {fair['flood_per_s']:,.0f}/s; "
                f"limited: {fair['flooder_limited']})",
            )
        )
        rows.append(("fairness: p50/p99 alone", f"{alone['p50']} / {alone['p99']} ms"))
        rows.append(
            (
                "fairness: p50/p99 flooded",
                f"{flooded['p50']} / {flooded['p99']} ms (p99 x{fair['p99_ratio']}; "
                f"{fair['flooded']['not_final_after_wait']} not final)",
            )
        )
    width = max(len(name) for name, _ in rows) if rows else 0
    print()
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    print()
    for target in results.get("targets", []):
        verdict = {True: "MET", False: "MISSED", None: "not measured at size"}[target["met"]]
        print(f"  {verdict:<22} {target['target']} (measured: {target['measured']})")


async def _stoppable(work: Coroutine[Any, Any, dict[str, Any]], deadline_s: float | None) -> dict[str, Any]:
    """`work`, cancelled on SIGINT or SIGTERM or past `deadline_s`, so that the app and the
    simulators it started (in sessions of their own) are stopped on the way out; under uvloop a
    plain SIGINT went unheard. A stopped run first prints what each of its tasks was waiting on."""
    task = asyncio.ensure_future(work)
    loop = asyncio.get_running_loop()

    def stop(reason: str) -> None:
        print_waits(reason)
        task.cancel(reason)

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop, signal.Signals(signum).name)
    if deadline_s is None:
        return await task
    loop.call_later(deadline_s, stop, f"past the {deadline_s:.0f} s deadline")
    # A loop that stopped turning cancels nothing: then every thread's stack, and exit.
    faulthandler.dump_traceback_later(deadline_s + STOP_GRACE_S, exit=True)
    try:
        return await task
    finally:
        faulthandler.cancel_dump_traceback_later()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    progress = Progress()
    started = time.monotonic()
    # uvloop: the load generator must cost as little CPU as it can on a box it shares with the app.
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        try:
            results = runner.run(_stoppable(run(args, progress), args.deadline_s))
        except asyncio.CancelledError as stopped:
            progress.say("stopped", f"{stopped}; what it started was stopped")
            return 3
    results["meta"]["wall_s"] = round(time.monotonic() - started, 1)
    output = args.output or RESULTS_DIR / f"{results['meta']['started_at']}-{results['meta']['mode']}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    print_table(results)
    print(f"\n  JSON: {output}  ({results['meta']['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
