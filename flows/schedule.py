"""Scheduled and event-driven retraining.

    metaloop serve            # serves `nightly` (params.flow.cron) and `watch-sources`
                              # (every params.flow.watch_every_minutes) from this process
    prefect deploy --all      # the same two deployments to a work pool (prefect.yaml)

`watch-sources` is the event-driven option: it fingerprints the declared sources (file
digests, S3 ETags) and starts the retrain flow only when they differ from what the last
curation read. Schedules stay active when `serve` stops (pause_on_shutdown=False).
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow, get_run_logger

from flows.retrain import retrain
from metaloop.config import load_params
from metaloop.curate import STATS
from metaloop.sources import source_fingerprint


def sources_changed(params_path: str = "params.yaml") -> bool:
    params = load_params(params_path)
    stats = Path(params.curation.output_dir) / STATS
    recorded = json.loads(stats.read_text()).get("source_fingerprint") if stats.is_file() else None
    return recorded != source_fingerprint(params.sources)


@flow(name="metaloop-watch-sources", log_prints=True)
def watch_sources(params_path: str = "params.yaml") -> str:
    if not sources_changed(params_path):
        get_run_logger().info("sources unchanged since the last curation; nothing to do")
        return "unchanged"
    get_run_logger().info("sources changed: starting the retrain flow")
    retrain(params_path)
    return "retrained"


def deployments(params_path: str = "params.yaml") -> list:
    params = load_params(params_path)
    from prefect.client.schemas.schedules import CronSchedule

    nightly = retrain.to_deployment(
        name="nightly", schedule=CronSchedule(cron=params.flow.cron, timezone=params.flow.timezone),
        parameters={"params_path": params_path}, tags=["metaloop"], concurrency_limit=1,
        description="Scheduled retraining of every target domain.",
    )
    watch = watch_sources.to_deployment(
        name="watch-sources", interval=params.flow.watch_every_minutes * 60,
        parameters={"params_path": params_path}, tags=["metaloop"], concurrency_limit=1,
        description="Retrain when the raw sources change.",
    )
    return [nightly, watch]


def serve(params_path: str = "params.yaml") -> None:
    from prefect import serve as prefect_serve

    prefect_serve(*deployments(params_path), pause_on_shutdown=False)
