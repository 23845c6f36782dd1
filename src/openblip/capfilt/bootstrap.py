"""The whole CapFilt loop of BLIP (section 3.3) from one JSON config, stage by stage.

Stages, each writing into ``OUTPUT/<stage>``:

1. ``noisy-split`` (only with ``data.noisy_split``): a clean "human" subset and a "web" set
   with a controlled share of swapped captions (`openblip.capfilt.noise`).
2. ``pretrain``: pre-train on web + human data (skipped when ``pretrain.checkpoint`` names a
   pre-trained model to start from).
3. ``captioner`` and ``filter``: fine-tune the pre-trained model on the human subset for
   captioning (LM) and for retrieval (ITC + ITM), as the paper's COCO fine-tunes.
4. ``capfilt``: caption every web image and filter web and synthetic texts (`run_capfilt`).
5. ``pretrain-bootstrapped``: pre-train a new model on the CapFilt output (filtered web +
   filtered synthetic texts) and the human pairs: the bootstrapped dataset D.
6. ``captioner-bootstrapped``, ``filter-bootstrapped``, ``evaluate`` (with ``evaluate``): both
   pre-trained models go through the same fine-tunes (as Table 1 of the paper) and are scored on
   a held-out set (retrieval recall, caption BLEU/CIDEr); ``OUTPUT/report.json`` compares them.

A stage is complete when ``OUTPUT/<stage>/bootstrap-stage.json`` exists; it is then skipped.
An interrupted training stage resumes from its last checkpoint and CapFilt finishes its missing
shards, so a killed run restarted with the same command continues where it stopped. Each stage
records its settings (and those of the stages it depends on) in ``bootstrap-settings.json``;
a restart whose config changes a started stage is refused rather than mixing two experiments.
Under ``torchrun`` training, CapFilt and retrieval scoring use every process; data splitting,
caption scoring and bookkeeping run on rank 0.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..data.shards import IMAGE_EXTENSIONS, expand_urls, iter_samples
from ..data.stream import split_captions
from ..train import distributed as dist
from ..train.config import TrainConfig, load_train_config
from .calibrate import check_keep
from .compare import EvaluateError, check_eval_settings, compare, evaluate_models
from .manifest import write_json
from .noise import NoiseSettings, capfilt_precision_recall, make_noisy_split, read_capfilt_decisions, read_noise_flags

__all__ = ["STAGES", "BootstrapConfig", "BootstrapError", "load_bootstrap_config", "run_bootstrap", "stage_status"]

STAGES = ("noisy-split", "pretrain", "captioner", "filter", "capfilt", "pretrain-bootstrapped",
          "captioner-bootstrapped", "filter-bootstrapped", "evaluate")
MARKER, SETTINGS = "bootstrap-stage.json", "bootstrap-settings.json"
PRESETS = "openblip.presets.bootstrap"
_TRAIN_PRESET = {"pretrain": "tiny", "caption": "caption-coco", "retrieval": "retrieval-coco"}
_LOOP_KEYS = ("preset", "checkpoint", "weights")  # section keys that are not TrainConfig fields
CAPFILT_KEYS = ("num_captions", "top_p", "top_k", "repetition_penalty", "max_length", "min_length", "prompt",
                "threshold", "first_token", "batch_size", "seed", "workers", "calibrate")
CALIBRATE_KEYS = ("keep", "positive_key", "limit")


class BootstrapError(ValueError):
    """A config or output folder that the loop cannot run; the message says what to change."""


@dataclass
class BootstrapConfig:
    """The loop's settings; see ``docs/capfilt.md`` for the JSON format."""

    data: dict[str, Any]
    pretrain: dict[str, Any] = field(default_factory=dict)
    captioner: dict[str, Any] = field(default_factory=dict)
    filter: dict[str, Any] = field(default_factory=dict)
    capfilt: dict[str, Any] = field(default_factory=dict)
    pretrain_bootstrapped: dict[str, Any] = field(default_factory=dict)
    evaluate: dict[str, Any] | None = None
    output: str | None = None
    description: str = ""

    def __post_init__(self) -> None:
        self.check()

    # -- derived settings -------------------------------------------------------------
    def train_config(self, section: str) -> TrainConfig:
        """The TrainConfig of a training stage: its preset with the section's overrides."""
        task = {"captioner": "caption", "filter": "retrieval"}.get(section.removesuffix("-bootstrapped"), "pretrain")
        values = self.section(section)
        if task != "pretrain" and "model" in values:
            raise BootstrapError(f"{section}.model: fine-tunes start from the pre-trained model of the loop")
        base = load_train_config(values.get("preset", _TRAIN_PRESET[task])).to_dict()
        for key, value in values.items():
            if key in _LOOP_KEYS:
                continue
            if key == "schedule":
                base["schedule"].update(value)
            elif key.startswith("schedule."):
                base["schedule"][key.split(".", 1)[1]] = value
            else:
                base[key] = value  # None is kept: "image_size": null means the model's own size
        base["task"] = task
        try:
            return TrainConfig.from_dict(base)
        except (TypeError, ValueError) as exc:
            raise BootstrapError(f"{section}: {exc}") from exc

    def section(self, section: str) -> dict[str, Any]:
        """The raw settings of a training stage (``pretrain-bootstrapped`` is merged onto ``pretrain``)."""
        base = section.removesuffix("-bootstrapped")
        if section == "pretrain-bootstrapped":  # the same recipe as the first model unless told otherwise
            merged = {k: v for k, v in self.pretrain.items() if k != "checkpoint"}
            extra = dict(self.pretrain_bootstrapped)
            if "schedule" in extra:
                extra["schedule"] = {**merged.get("schedule", {}), **extra["schedule"]}
            return {**merged, **extra}
        return dict(getattr(self, base))

    def noise_settings(self) -> NoiseSettings | None:
        split = self.data.get("noisy_split")
        if split is None:
            return None
        return NoiseSettings(**{k: v for k, v in split.items() if k != "source"})

    def stages(self) -> list[str]:
        """The stages this config runs, in order."""
        names = [s for s in STAGES if s != "noisy-split" or self.data.get("noisy_split")]
        if self.pretrain.get("checkpoint"):
            names.remove("pretrain")
        # The second model's fine-tunes serve only the evaluation (as the paper's Table 1).
        evaluated = ("captioner-bootstrapped", "filter-bootstrapped", "evaluate")
        if self.evaluate is None:
            return [s for s in names if s not in evaluated]
        if not self.evaluate.get("finetune", True):
            return [s for s in names if s not in evaluated[:2]]
        return names

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("description", "output", "data", "pretrain", "captioner", "filter",
                                               "capfilt", "pretrain_bootstrapped", "evaluate")}

    # -- validation: everything that would otherwise fail hours into the run -------------
    def check(self) -> None:
        self._check_data()
        for section in ("pretrain", "captioner", "filter", "pretrain-bootstrapped"):
            self.train_config(section)
        unknown = set(self.capfilt) - set(CAPFILT_KEYS)
        if unknown:
            raise BootstrapError(f"capfilt: unknown settings {sorted(unknown)}; known: {list(CAPFILT_KEYS)}")
        self._check_calibration()
        if self.evaluate is not None:
            try:
                check_eval_settings(self.evaluate)
            except EvaluateError as exc:
                raise BootstrapError(str(exc)) from exc

    def _check_data(self) -> None:
        split, web, human = self.data.get("noisy_split"), self.data.get("web"), self.data.get("human")
        if split is not None:
            if web or human:
                raise BootstrapError("data: give either noisy_split or web + human, not both")
            if not split.get("source"):
                raise BootstrapError("data.noisy_split.source is not set (e.g. --set data.noisy_split.source=DIR/"
                                     "train-{00000..00005}.tar)")
            try:
                self.noise_settings()
            except (TypeError, ValueError) as exc:
                raise BootstrapError(f"data.noisy_split: {exc}") from exc
        elif not (web and human):
            raise BootstrapError("data: set web and human shard lists, or noisy_split to make them")
        extra = set(self.data) - {"noisy_split", "web", "human", "calibration"}
        if extra:
            raise BootstrapError(f"data: unknown entries {sorted(extra)}")

    def _check_calibration(self) -> None:
        calibrate = self.capfilt.get("calibrate")
        if calibrate is None:
            return
        if not isinstance(calibrate, dict) or set(calibrate) - set(CALIBRATE_KEYS):
            raise BootstrapError(f"capfilt.calibrate: a section with {', '.join(CALIBRATE_KEYS)} (or null), got "
                                 f"{calibrate!r}")
        try:
            check_keep(calibrate.get("keep", 0.9))
        except (TypeError, ValueError) as exc:
            raise BootstrapError(f"capfilt.calibrate.keep: {exc}") from exc
        if self.capfilt.get("threshold") is not None:
            raise BootstrapError("capfilt: set threshold or calibrate, not both (--set capfilt.threshold=null)")
        split = self.data.get("noisy_split") or {}
        if not (split.get("calibration_size") or self.data.get("calibration")):
            raise BootstrapError("capfilt.calibrate needs held-out human pairs: data.noisy_split.calibration_size "
                                 "(e.g. 500) or data.calibration (shards)")
        if split and self.data.get("calibration"):
            raise BootstrapError("data: give noisy_split.calibration_size or calibration, not both")


def load_bootstrap_config(name_or_path: str, overrides: dict[str, Any] | None = None) -> BootstrapConfig:
    """A shipped preset (``fashion-mnist-noisy``, ``openclipart``, ``tiny-test``) or a JSON file,
    with dotted overrides such as ``{"data.noisy_split.source": "...", "pretrain.max_steps": 10}``."""
    from importlib import resources

    path = Path(name_or_path)
    if path.suffix == ".json" and path.exists():
        raw = json.loads(path.read_text(encoding="utf-8"))
    else:
        names = sorted(f.name[:-5] for f in resources.files(PRESETS).iterdir() if f.name.endswith(".json"))
        if name_or_path not in names:
            raise BootstrapError(f"unknown bootstrap config {name_or_path!r}: not a JSON file and not a preset "
                                 f"({', '.join(names)})")
        raw = json.loads(resources.files(PRESETS).joinpath(f"{name_or_path}.json").read_text(encoding="utf-8"))
    for key, value in (overrides or {}).items():
        _set_dotted(raw, key, value)
    known = set(BootstrapConfig.__dataclass_fields__)
    if set(raw) - known:
        raise BootstrapError(f"unknown config entries {sorted(set(raw) - known)}; known: {sorted(known)}")
    return BootstrapConfig(**raw)


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    node = raw
    for part in parents:
        if node.get(part) is None:  # also a section switched off with null, e.g. "evaluate": null
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise BootstrapError(f"cannot set {key}: {part} is not a section")
    node[last] = value


# -- the run ----------------------------------------------------------------------------------


@dataclass
class _Run:
    cfg: BootstrapConfig
    output: Path
    info: dist.DistInfo
    progress: bool

    def dir(self, stage: str) -> Path:
        return self.output / stage

    @property
    def web(self) -> str:
        return str(self.dir("noisy-split") / "web-*.tar") if self.cfg.data.get("noisy_split") else self.cfg.data["web"]

    @property
    def human(self) -> str:
        if self.cfg.data.get("noisy_split"):
            return str(self.dir("noisy-split") / "human-*.tar")
        return self.cfg.data["human"]

    @property
    def calibration(self) -> str | None:
        if (self.cfg.data.get("noisy_split") or {}).get("calibration_size"):
            return str(self.dir("noisy-split") / "calibration-*.tar")
        return self.cfg.data.get("calibration")

    def pretrained(self, bootstrapped: bool) -> str:
        if bootstrapped:
            return str(self.dir("pretrain-bootstrapped"))
        return self.cfg.pretrain.get("checkpoint") or str(self.dir("pretrain"))

    def log(self, message: str) -> None:
        if self.info.is_main:
            print(f"[bootstrap] {message}", file=sys.stderr, flush=True)


def _depends(stage: str, cfg: BootstrapConfig) -> list[str]:
    finetuned = (cfg.evaluate or {}).get("finetune", True)
    deps = {
        "pretrain": ["noisy-split"],
        "captioner": ["pretrain", "noisy-split"], "filter": ["pretrain", "noisy-split"],
        "capfilt": ["captioner", "filter", "noisy-split"],
        "pretrain-bootstrapped": ["capfilt", "noisy-split"],
        "captioner-bootstrapped": ["pretrain-bootstrapped"], "filter-bootstrapped": ["pretrain-bootstrapped"],
        "evaluate": ["captioner", "filter", "captioner-bootstrapped", "filter-bootstrapped"] if finetuned
        else ["pretrain", "pretrain-bootstrapped"],
    }.get(stage, [])
    return [d for d in deps if d in cfg.stages()]


def _own_settings(stage: str, cfg: BootstrapConfig) -> dict[str, Any]:
    if stage == "noisy-split":
        return dict(cfg.data["noisy_split"])
    if stage == "capfilt":
        own = dict(cfg.capfilt)
        if cfg.data.get("calibration") and own.get("calibrate") is not None:
            own["calibration_data"] = cfg.data["calibration"]
        return own
    if stage == "evaluate":
        return dict(cfg.evaluate or {})
    own: dict[str, Any] = {"train": cfg.train_config(stage).to_dict(), **{
        k: v for k, v in cfg.section(stage).items() if k in ("weights", "checkpoint")}}
    if not cfg.data.get("noisy_split"):
        own["data"] = {"web": cfg.data["web"], "human": cfg.data["human"]}
    if stage in ("captioner", "filter") and cfg.pretrain.get("checkpoint"):
        own["init"] = cfg.pretrain["checkpoint"]
    return own


def fingerprint(stage: str, cfg: BootstrapConfig) -> dict[str, Any]:
    """The settings that decide a stage's output: its own and those of the stages it reads."""
    value = {"own": _own_settings(stage, cfg), "after": {d: fingerprint(d, cfg) for d in _depends(stage, cfg)}}
    return json.loads(json.dumps(value))  # tuples -> lists, as read back from disk


def stage_status(output: str | Path, stage: str) -> str:
    """``"done"``, ``"started"`` (a folder from an unfinished run) or ``"pending"``."""
    folder = Path(output) / stage
    if (folder / MARKER).is_file():
        return "done"
    return "started" if folder.exists() else "pending"


def _fill_new_defaults(settings: Any) -> Any:
    """Recorded settings with training fields added since they were written, at their defaults
    (a run started by an earlier version continues when nothing it used has changed)."""
    if isinstance(settings, dict):
        settings = {k: _fill_new_defaults(v) for k, v in settings.items()}
        if isinstance(settings.get("train"), dict):
            defaults = json.loads(json.dumps(TrainConfig().to_dict()))
            settings["train"] = {**{k: v for k, v in defaults.items() if k not in settings["train"]},
                                 **settings["train"]}
    return settings


def _check_settings(run: _Run, stage: str, expected: dict[str, Any]) -> None:
    path = run.dir(stage) / (MARKER if stage_status(run.output, stage) == "done" else SETTINGS)
    if not path.is_file():
        return
    found = _fill_new_defaults(json.loads(path.read_text(encoding="utf-8"))["settings"])
    if found != expected:
        changed = sorted(k for k in set(found["own"]) | set(expected["own"])
                         if found["own"].get(k) != expected["own"].get(k)) or ["an earlier stage"]
        raise BootstrapError(
            f"{run.dir(stage)} was started with other settings ({', '.join(changed)} changed); use a new --output, "
            f"or delete that folder and the later stages' to redo them"
        )


def run_bootstrap(cfg: BootstrapConfig, output: str | Path | None = None, *, resume: bool = False,
                  until: str | None = None, progress: bool = True, info: dist.DistInfo | None = None) -> dict[str, Any]:
    """Run every stage that is not complete yet, then write ``OUTPUT/report.json``.

    Args:
        cfg: the loop's settings (`load_bootstrap_config`).
        output: the run folder (default: ``cfg.output``).
        resume: require `output` to hold an earlier run (guards against a mistyped folder
            silently starting over); without it an earlier run is continued all the same.
        until: stop after this stage (e.g. to run later stages as another job).
        progress: progress bars on stderr.
        info: the process group (``init_distributed()``) under torchrun.

    Returns:
        The report on rank 0 (which writes it), ``{}`` on the other ranks.
    """
    folder = output or cfg.output
    if not folder:
        raise BootstrapError("no output folder: pass --output or set \"output\" in the config")
    run = _Run(cfg, Path(folder), info or dist.DistInfo(), progress)
    stages = cfg.stages()
    if until is not None and until not in stages:
        raise BootstrapError(f"--until {until}: not a stage of this config ({', '.join(stages)})")
    if resume and all(stage_status(run.output, s) == "pending" for s in stages):
        raise BootstrapError(f"{run.output} holds no earlier bootstrap run to resume")
    for stage in stages:
        _check_settings(run, stage, fingerprint(stage, cfg))  # all before any work
    for stage in stages:
        _run_stage(run, stage)
        if stage == until:
            break
    report = _report(run) if run.info.is_main else {}
    dist.barrier()
    return report


def _run_stage(run: _Run, stage: str) -> None:
    if stage_status(run.output, stage) == "done":
        run.log(f"{stage}: complete, skipped")
        return
    settings = fingerprint(stage, run.cfg)
    if run.info.is_main:
        run.dir(stage).mkdir(parents=True, exist_ok=True)
        write_json(run.dir(stage) / SETTINGS, {"stage": stage, "settings": settings})
    dist.barrier()
    run.log(f"{stage}: running")
    start = time.time()
    result = _STAGE_FUNCTIONS[_kind(stage)](run, stage)
    seconds = round(time.time() - start, 1)
    if run.info.is_main:
        write_json(run.dir(stage) / MARKER, {"stage": stage, "settings": settings, "seconds": seconds,
                                             "result": result})
    dist.barrier()
    run.log(f"{stage}: done in {seconds:.0f} s")


def _kind(stage: str) -> str:
    if stage in ("pretrain", "pretrain-bootstrapped"):
        return "pretrain"
    return stage.removesuffix("-bootstrapped")


# -- stages ------------------------------------------------------------------------------------


def _noisy_split(run: _Run, stage: str) -> dict[str, Any]:
    result: dict[str, Any] = {}
    if run.info.is_main:  # a partial split from a killed run is replaced
        result = make_noisy_split(run.cfg.data["noisy_split"]["source"], run.dir(stage), run.cfg.noise_settings(),
                                  overwrite=True)
    dist.barrier()
    return result


def _pretrain(run: _Run, stage: str) -> dict[str, Any]:
    cfg = run.cfg.train_config(stage)
    sources = [run.web if stage == "pretrain" else str(run.dir("capfilt") / "*.tar"), run.human]
    weights = run.cfg.section(stage).get("weights", "auto")
    return _train(run, stage, cfg, sources, weights)


def _captioner(run: _Run, stage: str) -> dict[str, Any]:
    source = run.pretrained(stage.endswith("-bootstrapped"))
    init = source
    if run.info.is_main:
        init = str(_caption_init(source, run.dir(stage) / "init"))
    init = dist.broadcast_object(init)
    return _train(run, stage, run.cfg.train_config(stage).replace(model=init), [run.human], None)


def _filter(run: _Run, stage: str) -> dict[str, Any]:
    source = run.pretrained(stage.endswith("-bootstrapped"))
    return _train(run, stage, run.cfg.train_config(stage).replace(model=source), [run.human], None)


def _train(run: _Run, stage: str, cfg: TrainConfig, sources: list[str], weights: str | None) -> dict[str, Any]:
    from ..train.run import train
    from ..train.state import checkpoint_dirs

    if len(sources) > 1:
        counts = [_count_samples(s) for s in sources]
        for source, count in zip(sources, counts):
            if count == 0:
                run.log(f"{stage}: warning: {source} holds no usable sample (nothing kept?); it is never drawn")
        if weights in (None, "auto"):  # proportional to size: the plain union of the sources
            weights = "::".join(str(c) for c in counts)
        cfg = cfg.replace(train_data_weights=weights)
        if not cfg.samples_per_epoch:
            cfg = _epoch_over_union(cfg, sum(counts), run.info.world_size)
    folder = run.dir(stage)
    resume = bool(checkpoint_dirs(folder))
    if resume:
        run.log(f"{stage}: resuming from {checkpoint_dirs(folder)[-1][1].name}")
    train(cfg, "::".join(sources), folder, resume=resume, info=run.info, progress=run.progress)
    return {"model": str(folder), "train_data": "::".join(sources), "weights": weights,
            "samples_per_epoch": cfg.samples_per_epoch, "last": _last_logged(folder)}


def _epoch_over_union(cfg: TrainConfig, total: int, world_size: int) -> TrainConfig:
    """Several sources need a defined epoch: one pass over their union (the paper's epochs
    over D), in whole batches per process, with the schedule's epochs set to span the run."""
    batch = cfg.batch_size * cfg.grad_accum
    steps = max(1, total // (world_size * batch))
    epochs = max(1, -(-cfg.max_steps // steps))
    return cfg.replace(samples_per_epoch=steps * batch, **{"schedule.epochs": epochs})


def _capfilt(run: _Run, stage: str) -> dict[str, Any]:
    from ..api import Blip
    from .calibrate import load_or_calibrate
    from .run import run_capfilt

    device = str(run.info.device)
    captioner = Blip.from_pretrained(run.dir("captioner"), device=device)
    filter_blip = Blip.from_pretrained(run.dir("filter"), device=device)
    settings = {k: v for k, v in run.cfg.capfilt.items() if k != "calibrate" and v is not None}
    calibration = None
    if run.cfg.capfilt.get("calibrate") is not None:
        calibrate = {"keep": 0.9, "positive_key": run.cfg.filter.get("positive_key"), "limit": None,
                     **run.cfg.capfilt["calibrate"]}
        calibration = load_or_calibrate(filter_blip, run.calibration, run.dir(stage), rank=run.info.rank,
                                        batch_size=settings.get("batch_size", 32),
                                        first_token=settings.get("first_token", "enc"), **calibrate)
        settings["threshold"] = calibration["threshold"]
        run.log(f"capfilt: calibrated threshold {calibration['threshold']:.4f} (keeps {calibrate['keep']:.0%} "
                f"of {calibration['pairs']} held-out human pairs)")
    summary = run_capfilt(captioner, filter_blip, run.web, run.dir(stage), rank=run.info.rank,
                          world_size=run.info.world_size, manifest_format="jsonl", progress=run.progress,
                          **settings)
    if not run.info.is_main:
        return {}
    if summary["shards"]["missing"]:
        raise RuntimeError(f"capfilt left shards unfinished: {summary['shards']['missing'][:5]}")
    result = {"kept": summary["kept"], "throughput": summary["throughput"], "samples": summary["samples"]}
    if calibration is not None:
        result["calibration"] = {k: v for k, v in calibration.items() if k not in ("request", "shards")}
    flags = read_noise_flags(str(run.dir(stage) / "*.tar"))
    if any(flags.values()):  # a controlled-noise web set: score the filter against the truth
        result["noise"] = capfilt_precision_recall(read_capfilt_decisions(run.dir(stage)), flags)
    return result


def _evaluate(run: _Run, stage: str) -> dict[str, Any]:
    settings = run.cfg.evaluate or {}
    finetuned = settings.get("finetune", True)
    models = {}
    for name, boot in (("noisy", False), ("bootstrapped", True)):
        suffix = "-bootstrapped" if boot else ""
        if finetuned:
            models[name] = (str(run.dir("captioner" + suffix)), str(run.dir("filter" + suffix)))
        else:
            models[name] = (run.pretrained(boot), run.pretrained(boot))
    try:
        return evaluate_models(models, settings, run.dir(stage), run.info, run.progress)
    except EvaluateError as exc:
        raise BootstrapError(str(exc)) from exc


_STAGE_FUNCTIONS: dict[str, Callable[[_Run, str], dict[str, Any]]] = {
    "noisy-split": _noisy_split, "pretrain": _pretrain, "captioner": _captioner, "filter": _filter,
    "capfilt": _capfilt, "evaluate": _evaluate,
}


def _report(run: _Run) -> dict[str, Any]:
    """Gather every finished stage's result into ``OUTPUT/report.json``."""
    stages: dict[str, Any] = {}
    for stage in run.cfg.stages():
        marker = run.dir(stage) / MARKER
        entry: dict[str, Any] = {"status": stage_status(run.output, stage)}
        if marker.is_file():
            done = json.loads(marker.read_text(encoding="utf-8"))
            entry.update(seconds=done["seconds"], result=done["result"])
        stages[stage] = entry
    report = {"output": str(run.output), "config": run.cfg.to_dict(), "stages": stages,
              "complete": all(s["status"] == "done" for s in stages.values())}
    capfilt = stages.get("capfilt", {}).get("result", {})
    if "noise" in capfilt:
        report["noise"] = capfilt["noise"]
    if "result" in stages.get("evaluate", {}):
        report["comparison"] = compare(stages["evaluate"]["result"])
    write_json(run.output / "report.json", report)
    return report


# -- pieces of the training stages ---------------------------------------------------------------


def _caption_init(source: str, dest: Path) -> str:
    """`source`, or a caption-only copy of it in `dest` when it cannot be loaded for captioning
    directly (an openblip pre-training run stores the tied encoder/decoder tensors once, under
    the encoder's names, which a caption-only model does not have)."""
    from ..checkpoints import load_model, save_model
    from ..checkpoints.common import select_task
    from ..models.blip import BlipModel

    try:
        load_model(source, task="caption")
        return source
    except ValueError:
        pass
    if (dest / "openblip_config.json").is_file():
        return str(dest)
    model, tokenizer = load_model(source, task="pretrain")
    caption = BlipModel(select_task(model.cfg, "pretrain", "caption"))
    wanted = caption.state_dict()
    caption.load_state_dict({k: v for k, v in model.state_dict().items() if k in wanted})
    save_model(caption, tokenizer, dest, overwrite=True)
    return str(dest)


def _count_samples(urls: str) -> int:
    """Samples with an image and a caption (what the training stream uses), headers only."""
    count = 0
    for group in expand_urls(urls):
        for path in group:
            for sample in iter_samples(path, lazy=IMAGE_EXTENSIONS):
                count += any(e in sample for e in IMAGE_EXTENSIONS) and bool(split_captions(sample, 30))
    return count


def _last_logged(folder: Path) -> dict[str, Any]:
    path = folder / "log.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    records = [json.loads(line) for line in lines if line.strip()]
    return next((r for r in reversed(records) if "loss" in r), {})
