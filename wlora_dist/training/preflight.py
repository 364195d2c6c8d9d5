"""Everything a run can be refused for that is known before anything is loaded: from the
run config, the model's config.json and tokenizer files, and the file system. The model
is built on the meta device (structure, no storage) and the adapters attached to it, so
``selection.k`` > n, targets that match nothing and a non-Llama architecture are found in
seconds, not after the weights are read. ``wlora-dist train`` runs this before any
process group exists; ``wlora-dist config --check`` runs exactly the same.
"""

from __future__ import annotations

import importlib.util
import netrc
import os
import urllib.parse
from dataclasses import dataclass

import torch

from wlora_dist.config import ConfigError, RunConfig
from wlora_dist.data.rows import DataError
from wlora_dist.data.tokens import require_chat_template
from wlora_dist.errors import UserError
from wlora_dist.model.int8 import check_checkpoint_quantization
from wlora_dist.model.loading import check_model_path, check_model_type, load_tokenizer
from wlora_dist.paths import looks_local
from wlora_dist.resolved import ResolvedRun
from wlora_dist.training.outputs import check_output_free


@dataclass(frozen=True)
class Preflight:
    """What the checks found: the architecture and the number of adapter sites n."""

    architecture: str
    n_adapters: int


def preflight(run: ResolvedRun) -> Preflight:
    """Raise a UserError (naming the field, the file and the fix) for the first problem.
    (The backend, its support of the settings and the checkpoint to resume from were
    decided, and refused where wrong, by resolve_run.)"""
    cfg = run.cfg
    problem = run.spec.world_problem(int(os.environ.get("WORLD_SIZE", "1")))  # under a launcher
    if problem:
        raise UserError(problem)
    check_trackers(cfg.log.trackers)
    _check_data_files(cfg)
    check_model_path(cfg.model.path)
    check_checkpoint_quantization(cfg.model)
    config = check_model_type(cfg.model)
    architecture = (config.get("architectures") or [config.get("model_type", "?")])[0]
    n = _check_adapters_fit(cfg)
    if cfg.data.format == "chat" or (cfg.data.format == "instruction" and cfg.data.template == "chat"):
        require_chat_template(load_tokenizer(cfg.model), cfg.model.path, cfg.data.format)
    # A fresh run over an earlier run's checkpoints is refused before anything loads.
    check_output_free(cfg, run.paths.adapter, run.paths.checkpoints, resumes=run.resume is not None)
    return Preflight(architecture, n)


_TRACKER_PACKAGES = {"wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow-skinny")}
_WANDB_QUIET_MODES = ("offline", "disabled", "dryrun")


def check_trackers(trackers: list[str]) -> None:
    """W&B / MLflow installed, and W&B able to log in (it would otherwise stop the run
    after the model load, asking for a key on a terminal no one watches)."""
    for name in trackers:
        if name in _TRACKER_PACKAGES:
            module, package = _TRACKER_PACKAGES[name]
            if importlib.util.find_spec(module) is None:
                raise ConfigError(
                    [
                        f"log.trackers: {name!r} needs the {package} package: pip install 'wlora-dist[trackers]' "
                        f"(or pip install {package}), or remove {name} from log.trackers"
                    ],
                    "log",
                )
    if "wandb" in trackers and os.environ.get("WANDB_MODE", "online") not in _WANDB_QUIET_MODES:
        host = urllib.parse.urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or ""
        if not (os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE") or _netrc_has(host)):
            raise ConfigError(
                [
                    f"log.trackers: wandb logs online but finds no login for {host} (no WANDB_API_KEY, no ~/.netrc "
                    "entry): run `wandb login` once, export WANDB_API_KEY, or set WANDB_MODE=offline (then "
                    "`wandb sync <output.dir>/logs/wandb/offline-run-*` later)"
                ],
                "log",
            )


def _netrc_has(host: str) -> bool:
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def _check_data_files(cfg: RunConfig) -> None:
    for field, sources in (("data.train", cfg.data.train), ("data.eval", cfg.data.eval)):
        for source in sources:
            if looks_local(source) and not os.path.exists(os.path.expanduser(source)):
                raise DataError(f"data file {source} does not exist; fix the path in {field}")


def _check_adapters_fit(cfg: RunConfig) -> int:
    """Attach the adapters to the model built on meta; the same checks the trainer makes
    after loading (targets, K against n, WeightLoRA+ rounds)."""
    from wlora_dist.method.selector import fit_problems
    from wlora_dist.method.weight_lora import WeightLoRA
    from wlora_dist.model.sharded_loading import build_on_meta

    model = build_on_meta(cfg.model, torch.device("cpu"))
    wl = WeightLoRA.attach(model, cfg.adapter)
    problems = fit_problems(wl, cfg.selection, cfg.adapter.lora_rank)
    if problems:
        raise ConfigError(problems, "selection")
    return wl.n
