"""``openblip bootstrap``: the whole CapFilt loop (pre-train, fine-tune, CapFilt, pre-train again)."""

from __future__ import annotations

import argparse
import datetime
import json
import sys

from .common import EXIT_OK, CliError

# Rank 0 alone splits data and scores captions while the other ranks wait in a barrier.
BARRIER_TIMEOUT = datetime.timedelta(hours=48)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bootstrap", help="run the CapFilt bootstrapping loop from one config file",
        description="Pre-train on web + human data, fine-tune a captioner and a filter on the human data, "
                    "CapFilt the web data, pre-train a new model on the filtered web + synthetic + human data, "
                    "and optionally compare both pre-trained models on held-out data (report.json). Each stage "
                    "writes OUTPUT/<stage> and is skipped once complete: rerun the same command to continue. "
                    "Launch with torchrun --nproc_per_node N to use N processes in every stage.",
    )
    p.add_argument("--config", required=True,
                   help="JSON file or shipped preset (fashion-mnist-noisy, openclipart, tiny-test)")
    p.add_argument("--output", default=None, help="run folder (default: the config's \"output\")")
    p.add_argument("--resume", action="store_true",
                   help="insist on continuing an earlier run in --output (an error if there is none)")
    p.add_argument("--until", default=None, metavar="STAGE", help="stop after this stage")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config entry, e.g. --set pretrain.max_steps=100 "
                        "--set data.noisy_split.source='DIR/train-{00000..00005}.tar'")
    p.add_argument("--plan", action="store_true", help="print the stages and their status, then exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    p.set_defaults(run=run_bootstrap_cli)


def run_bootstrap_cli(args: argparse.Namespace) -> int:
    from ..capfilt.bootstrap import load_bootstrap_config, run_bootstrap, stage_status
    from ..train import distributed as dist
    from ..train.config import parse_override

    try:
        cfg = load_bootstrap_config(args.config, dict(parse_override(item) for item in args.set))
    except (OSError, ValueError, TypeError) as exc:
        raise CliError(str(exc)) from exc
    output = args.output or cfg.output
    if args.plan:
        for stage in cfg.stages():
            status = stage_status(output, stage) if output else "pending"
            print(f"{stage:24s} {status:8s} {output}/{stage}" if output else stage)
        return EXIT_OK
    info = dist.init_distributed(timeout=BARRIER_TIMEOUT)
    try:
        report = run_bootstrap(cfg, output, resume=args.resume, until=args.until, progress=not args.no_progress,
                               info=info)
    except (ValueError, OSError) as exc:  # BootstrapError, missing shards, a resume with another world size
        raise CliError(str(exc)) from exc
    finally:
        dist.cleanup()
    if info.is_main:
        _print_summary(report)
    return EXIT_OK


def _print_summary(report: dict) -> None:
    print(f"report: {report['output']}/report.json ({'complete' if report['complete'] else 'partial'})")
    if "noise" in report:
        noise = report["noise"]
        print("filter vs swapped captions: " + json.dumps({k: noise[k] for k in ("precision", "recall", "f1")}))
    if "comparison" in report:
        print(report["comparison"]["markdown"])
    sys.stdout.flush()
