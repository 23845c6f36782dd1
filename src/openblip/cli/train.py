"""``openblip pretrain`` and ``openblip finetune caption|retrieval``.

Single process: ``openblip pretrain ...``. Several: ``torchrun --nproc_per_node N -m openblip pretrain ...``
(each process reads its own shards; the run folder is written by rank 0).
"""

from __future__ import annotations

import argparse
import sys

from .common import EXIT_OK, CliError


def _train_args(p: argparse.ArgumentParser, *, default_config: str) -> None:
    p.add_argument("--config", default=default_config,
                   help=f"training preset name or JSON file (default: {default_config}); flags below override it")
    p.add_argument("--train-data", required=True,
                   help="WebDataset shards, brace-expanded, e.g. 'shards/train-{00000..00003}.tar', a BLIP JSON "
                        "annotation list [{'image', 'caption'}], or a folder of images with a JSONL/CSV of "
                        "captions (converted to shards in OUTPUT/data once); several sources joined by '::'")
    p.add_argument("--train-data-weights", default=None, help="sampling weights of the sources, e.g. '3::1'")
    p.add_argument("--output", required=True, help="run folder: checkpoints, logs, and the model itself")
    p.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--stop-at", type=int, default=None,
                   help="stop after this step with a checkpoint (e.g. a job time limit); --resume continues")
    p.add_argument("--batch-size", type=int, default=None, help="samples per process and step")
    p.add_argument("--grad-accum", type=int, default=None, help="micro-batches per step (caption task only)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate")
    p.add_argument("--warmup-steps", type=int, default=None)
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="bf16 autocast or fp32")
    p.add_argument("--grad-checkpointing", action="store_true", default=None)
    p.add_argument("--grad-clip", type=float, default=None, help="clip the gradient norm to this value")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--samples-per-epoch", type=int, default=None, help="per process; defines epochs")
    p.add_argument("--queue-size", type=int, default=None)
    p.add_argument("--num-workers", type=int, default=None, help="data loading processes")
    p.add_argument("--save-every", type=int, default=None)
    p.add_argument("--log-every", type=int, default=None)
    p.add_argument("--tensorboard", action="store_true", default=None,
                   help="also write TensorBoard scalars to OUTPUT/tensorboard (needs the tensorboard package)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other setting, e.g. --set alpha=0.3 --set schedule.min_lr=1e-6")
    p.add_argument("--no-progress", action="store_true")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="pre-train BLIP (ITC + ITM + LM)",
                       description="Pre-train BLIP from scratch or from BERT/ViT weights. " + (__doc__ or ""))
    _train_args(p, default_config="tiny")
    p.add_argument("--init-text", default=None, help="BERT checkpoint directory (Hugging Face format) for the text side")
    p.add_argument("--init-vision", default=None, help="timm/DeiT ViT weights (.pth/.safetensors) for the image side")
    p.add_argument("--model", default=None, help="model preset or checkpoint to continue pre-training from")
    p.set_defaults(run=run_pretrain, task="pretrain")

    ft = sub.add_parser("finetune", help="fine-tune for captioning or retrieval")
    ft_sub = ft.add_subparsers(dest="finetune_task", metavar="TASK", required=True)
    for task, preset_name, what in (("caption", "caption-coco", "the image-grounded decoder with the LM loss"),
                                    ("retrieval", "retrieval-coco", "ITC + ITM with momentum encoders and queues")):
        q = ft_sub.add_parser(task, help=f"fine-tune {what}", description=f"Fine-tune {what}.")
        q.add_argument("--model", required=True, help="checkpoint to start from (hub id, directory or .pth)")
        _train_args(q, default_config=preset_name)
        if task == "caption":
            q.add_argument("--prompt", default=None, help='caption prompt, masked from the loss (default "a picture of ")')
        q.set_defaults(run=run_pretrain, task=task)


def _config(args: argparse.Namespace):
    from ..train.config import load_train_config, parse_override

    try:
        cfg = load_train_config(args.config)
        changes = {
            "task": args.task,
            "max_steps": args.max_steps, "batch_size": args.batch_size, "grad_accum": args.grad_accum,
            "seed": args.seed, "precision": args.precision, "grad_checkpointing": args.grad_checkpointing,
            "grad_clip": args.grad_clip, "image_size": args.image_size, "samples_per_epoch": args.samples_per_epoch,
            "queue_size": args.queue_size, "num_workers": args.num_workers, "save_every": args.save_every,
            "log_every": args.log_every, "train_data_weights": args.train_data_weights,
            "tensorboard": args.tensorboard,
            "schedule.init_lr": args.lr, "schedule.warmup_steps": args.warmup_steps,
            "model": getattr(args, "model", None), "init_text": getattr(args, "init_text", None),
            "init_vision": getattr(args, "init_vision", None), "prompt": getattr(args, "prompt", None),
        }
        changes.update(parse_override(item) for item in args.set)
        return cfg.replace(**changes)
    except (ValueError, TypeError) as exc:
        raise CliError(str(exc)) from exc


def run_pretrain(args: argparse.Namespace) -> int:
    from ..train import distributed as dist
    from ..train.run import train

    cfg = _config(args)
    info = dist.init_distributed()
    try:
        last = train(cfg, args.train_data, args.output, resume=args.resume, info=info,
                     progress=not args.no_progress, stop_at=args.stop_at)
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        raise CliError(str(exc)) from exc
    finally:
        dist.cleanup()
    if info.is_main:
        summary = ", ".join(f"{k}={v:.4g}" for k, v in last.items())
        print(f"finished {cfg.task} in {args.output}: {summary}", file=sys.stderr)
    return EXIT_OK
