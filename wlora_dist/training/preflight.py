"""Everything a run can be refused for that is known before anything is loaded: from the
run config, the model's config.json and tokenizer files, and the file system. The model
is built on the meta device (structure, no storage) and the adapters attached to it, so
``selection.k`` > n, targets that match nothing and a non-Llama architecture are found in
seconds, not after the weights are read. ``wlora-dist train`` runs this before any
process group exists; ``wlora-dist config --check`` runs exactly the same.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import netrc
import os
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from wlora_dist.checkpoint.folders import list_checkpoints
from wlora_dist.config import ConfigError, RunConfig
from wlora_dist.data.rows import DataError
from wlora_dist.data.tokens import require_chat_template
from wlora_dist.distributed.spec import check_heads
from wlora_dist.errors import UserError
from wlora_dist.method.selector import fit_problems
from wlora_dist.method.weight_lora import WeightLoRA
from wlora_dist.model.loading import check_model_path, check_model_type, load_tokenizer
from wlora_dist.model.saved_formats import check_checkpoint_quantization
from wlora_dist.paths import looks_local, missing_data_file
from wlora_dist.resolved import ResolvedRun
from wlora_dist.training.results import TrainingError


@dataclass(frozen=True)
class Preflight:
    """What the checks found: the architecture and the number of adapter sites n."""

    architecture: str
    n_adapters: int


class PreflightError(UserError):
    """Every problem the preflight found, one per line (a single one: its own message)."""

    same_on_every_rank = True

    def __init__(self, problems: list[str], exit_code: int = 2) -> None:
        self.problems = problems
        self.exit_code = exit_code  # the first problem's own (a config error 2, a missing file 1)
        head = "" if len(problems) == 1 else f"{len(problems)} problems:\n"
        super().__init__(head + "\n".join(f"  - {p}" if len(problems) > 1 else p for p in problems))


def problems_of(e: UserError) -> list[str]:
    """A refusal's problems, one per line (a ConfigError holds several)."""
    return list(getattr(e, "problems", None) or [str(e)])


def preflight_problems(run: ResolvedRun) -> tuple[Preflight | None, list[str], int]:
    """Every check, each on its own: (what was found, every problem, the first problem's
    exit code). A check that needs an earlier one (the model's files for the adapters) is
    skipped when that one failed."""
    cfg = run.cfg
    problems: list[str] = []
    codes: list[int] = []

    def check(fn, *args):  # type: ignore[no-untyped-def]
        try:
            return fn(*args), True
        except UserError as e:
            problems.extend(p for p in problems_of(e) if p not in problems)
            codes.append(e.exit_code)
            return None, False

    problem = run.spec.world_problem(int(os.environ.get("WORLD_SIZE", "1")))  # under a launcher
    if problem:
        problems.append(problem)
        codes.append(UserError.exit_code)  # what it was refused with before the checks were pooled
    check(check_trackers, cfg.log.trackers)
    check(check_attention, cfg.model.attn_implementation)
    _, data_ok = check(_check_data_files, cfg)
    _, model_ok = check(check_model_path, cfg.model.path)
    found = None
    if model_ok:
        check(check_checkpoint_quantization, cfg.model)
        config, type_ok = check(check_model_type, cfg.model)
        if type_ok:
            architecture = (config.get("architectures") or [config.get("model_type", "?")])[0]
            # A checkpoint is compared with the run once its step counts are final (a run
            # sized from its data compares after loading them, in the trainer).
            n, fit_ok = check(_check_adapters_fit, cfg, run.resume if run.sized else None)
            _, weights_ok = check(_check_weights, cfg)
            found = Preflight(architecture, n) if fit_ok and weights_ok else None
        tokenizer, tok_ok = check(load_tokenizer, cfg.model)
        if tok_ok:
            if cfg.data.format == "chat" or (cfg.data.format == "instruction" and cfg.data.template == "chat"):
                check(require_chat_template, tokenizer, cfg.model.path, cfg.data.format)
            if data_ok:
                check(check_data_rows, cfg, tokenizer)
    # A fresh run over an earlier run's checkpoints is refused before anything loads.
    check(check_output_free, cfg, run.paths.adapter, run.paths.checkpoints, run.resume is not None)
    return found, problems, codes[0] if codes else 2


def preflight(run: ResolvedRun) -> Preflight:
    """Raise a UserError naming every problem (the field, the file and the fix) found
    before anything is loaded. (The backend, its support of the settings and the
    checkpoint to resume from were decided, and refused where wrong, by resolve_run.)"""
    found, problems, code = preflight_problems(run)
    if problems:
        raise PreflightError(problems, code)
    assert found is not None
    return found


_PREVIEW_ROWS = 4  # rows of each data file read by the preflight (columns, then through the template)


def check_data_rows(cfg: RunConfig, tokenizer: object) -> None:
    """The first rows of each local data file (and data.eval's) have the columns data.format
    reads, and go through the tokenizer and template: found in seconds, not after the
    model has loaded. Hub datasets are checked when they load."""
    import datasets

    from wlora_dist.data.formats import shape_rows
    from wlora_dist.data.rows import ROW, SOURCE, first_rows
    from wlora_dist.data.tokens import tokenize

    for field, sources in (("data.train", cfg.data.train), ("data.eval", cfg.data.eval)):
        for source in sources:
            if not looks_local(source):
                continue
            rows = first_rows(source, _PREVIEW_ROWS)
            if rows is None:
                continue
            if not rows:
                raise DataError(f"{source} ({field}): no rows; check the file is not empty")
            tagged = [{**row, SOURCE: 0, ROW: i} for i, row in enumerate(rows)]  # errors name the file's row
            ds, rows_cfg, _ = shape_rows(datasets.Dataset.from_list(tagged), cfg.data)  # as training reads them
            if rows_cfg.format == "text":  # packed: a few rows need not fill one sequence
                bad = [i for i, t in enumerate(ds["text"]) if not isinstance(t, str)]
                if bad:
                    raise DataError(f"{source} row {bad[0]}: data.text_field {cfg.data.text_field!r} is not text")
                continue
            tokenize(ds, tokenizer, rows_cfg, [source], whole=False)


def check_all_data(run: ResolvedRun, tokenizer: object, world_size: int) -> str:
    """``config --check``: every row of every data file through what training runs (read,
    told apart, tokenised, rows with nothing to train counted; the copy cached where the run
    will look for it, so it starts from it), the micro-batches at ``world_size`` ranks and
    the run sized from the data. Raises what training would raise; returns what was found."""
    from wlora_dist.data.pipeline import eval_micro_batch, fill_problem, prepare, steps_per_epoch

    cfg = run.cfg
    micro, accum = cfg.train.micro_batch_size, cfg.train.grad_accum_steps
    data_ranks = run.spec.data_ranks(world_size)  # the ranks sharing a sequence read the same rows
    with _warnings() as said:  # rows dropped: told as train tells them
        train, eval_ds, path = prepare(cfg.data, cfg.train.seed, tokenizer, run.paths.data_cache)
    problem = fill_problem(len(train), micro, data_ranks)
    if problem:
        raise DataError(problem)
    words = f"{len(train)} train rows"
    if eval_ds is not None:
        eval_batch = eval_micro_batch(len(eval_ds), micro, data_ranks, bool(cfg.data.eval))
        words += f", {len(eval_ds)} eval rows" + (f" (eval micro-batch {eval_batch})" if eval_batch < micro else "")
    per_epoch = steps_per_epoch(len(train), micro, data_ranks, accum)
    if not run.sized:
        run.sized_by(per_epoch)  # train.epochs / *_fraction / *_ratio: the same sizing, the same refusals
    summary = f"{words}; {per_epoch} optimizer steps per epoch at {world_size} rank(s); tokenised copy in {path}"
    return "; ".join([summary, *said])


@contextlib.contextmanager
def _warnings() -> Iterator[list[str]]:
    """The wlora_dist logger's warnings while the block runs, collected."""
    said: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            said.append(record.getMessage())

    handler = Collect(logging.WARNING)
    logger = logging.getLogger("wlora_dist")
    logger.addHandler(handler)
    try:
        yield said
    finally:
        logger.removeHandler(handler)


def check_attention(name: str) -> None:
    """flash_attention_2 needs the flash-attn package (and a GPU: transformers says so at load)."""
    if name == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ConfigError(
            [
                "model.attn_implementation: flash_attention_2 needs the flash-attn package (pip install flash-attn "
                "--no-build-isolation, on a machine with CUDA); or use sdpa, PyTorch's own fused attention"
            ],
            "model",
        )


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
    problem = missing_data_file(cfg.data.train, cfg.data.eval)
    if problem:
        raise DataError(problem)


def _check_weights(cfg: RunConfig) -> None:
    """A local model folder's weights files whole and of this model's shapes (the model
    built on meta from its config.json; a folder saved quantised: whole only)."""
    from wlora_dist.model.saved_formats import checkpoint_quantization
    from wlora_dist.model.sharded_loading import build_on_meta
    from wlora_dist.model.weights_files import check_weights_files

    if not looks_local(cfg.model.path):
        return
    shapes = None
    if checkpoint_quantization(cfg.model.path) == "none":
        model = build_on_meta(cfg.model.model_copy(update={"quantization": "none"}), torch.device("cpu"))
        tied = model.config.tie_word_embeddings
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    check_weights_files(cfg.model.path, shapes)


def _check_adapters_fit(cfg: RunConfig, resume: Path | None = None) -> int:
    """Attach the adapters to the model built on meta; the same checks the trainer makes
    after loading (check_adapters), and (``resume``) that the checkpoint to resume was
    written by a run like this one."""
    from wlora_dist.method.weight_lora import WeightLoRA
    from wlora_dist.model.sharded_loading import build_on_meta

    model = build_on_meta(cfg.model, torch.device("cpu"))
    wl = WeightLoRA.attach(model, cfg.adapter)
    check_adapters(wl, cfg)
    if resume is not None:
        from wlora_dist.checkpoint.meta import check_compatible, read_meta, run_identity

        check_compatible(read_meta(resume), run_identity(cfg, wl), resume)
    return wl.n


def check_adapters(wl: WeightLoRA, cfg: RunConfig) -> None:
    """The model and its adapters against the settings: targets that match, K against n,
    WeightLoRA+ rounds, attention heads the sequence-parallel ranks can share (on the model
    built on meta here, on the loaded one by the trainer: a model passed to it was never
    built on meta)."""
    problems = fit_problems(wl, cfg.selection, cfg.adapter.lora_rank)
    n, mc = cfg.distributed.sequence_parallel, wl.base_model.config
    if n > 1:
        heads = mc.num_attention_heads
        problem = check_heads(heads, getattr(mc, "num_key_value_heads", None) or heads, n)
        problems += [f"distributed.sequence_parallel: {problem}"] if problem else []
    if problems:
        raise ConfigError(problems, "selection")


def check_output_free(cfg: RunConfig, adapter_dir: Path, ckpt_root: Path, resumes: bool) -> None:
    """Refuse, before anything is loaded or written, a run whose folders cannot be made
    (a file where a folder must go, no permission to write), or that would replace an
    earlier run's adapter or (starting fresh) its checkpoints, unless output.overwrite says so."""
    check_folder(adapter_dir.parent, "output.dir")
    check_folder(ckpt_root, "checkpoint.dir" if cfg.checkpoint.dir else "output.dir")
    if cfg.output.overwrite:
        return
    if adapter_dir.exists():
        raise TrainingError(
            f"{adapter_dir} already holds an adapter; choose another output.dir or set "
            "output.overwrite=true (the old one is replaced only after the new one is complete)"
        )
    earlier = [] if resumes else list_checkpoints(ckpt_root)
    if earlier:
        raise TrainingError(
            f"{ckpt_root} holds checkpoints of an earlier run ({earlier[-1].name} the newest); resume it with "
            "checkpoint.resume_from=auto, start over with output.overwrite=true (they are replaced as new ones "
            "are written), or choose another output.dir / checkpoint.dir"
        )


def check_folder(folder: Path, field: str) -> None:
    """``folder`` can be made (or is one) and written to: every existing part of its path is
    a folder, and the deepest existing one is writable."""
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise TrainingError(f"{field}: {existing} is a file, not a folder; choose another {field}")
    if not os.access(existing, os.W_OK):
        raise TrainingError(f"{field}: {existing} is not writable; choose another {field} or fix its permissions")
