"""Checkpoints of a distillation run: written atomically, resumed only with the settings they were written with.

:class:`DistillationCheckpointMixin` is mixed into :class:`hf_distill.trainer.DistillationTrainer`.

**A checkpoint is visible only when complete.** The Trainer writes ``checkpoint-N`` into a staging
folder ``output_dir/_saving-checkpoint-N/``; the objective's state and the run's settings are added,
every file is fsynced, and only then is the folder renamed to ``output_dir/checkpoint-N`` (one atomic
rename on the same file system). A process killed at any moment of a save leaves at most a staging
folder, which no resume and no rotation looks at and which the next run deletes. A ``checkpoint-*``
folder without a readable ``trainer_state.json`` (written by another tool, or by an older version
that saved in place) is skipped on resume with a warning and moved to ``output_dir/_incomplete-*``.

**A resume is refused when the settings differ.** Each checkpoint holds ``distillation_settings.json``:
the distillation arguments (temperature, loss weights, terms, layer map, teachers' weights and
dtype, ...), the objective's terms, the teacher source (``describe()``), the student's architecture,
each teacher's class, config and (a frozen teacher's) a fingerprint of its weights, the settings that change the training trajectory (learning rate, batch
size, accumulation, processes, seed, optimiser, schedule, precision) and whatever the caller added
with :meth:`~DistillationCheckpointMixin.add_resume_settings` (a recipe's data and student choices).
Run length, logging, evaluation, saving and output settings are not compared: extending
``max_steps`` is a legitimate resume. A difference raises ``ValueError`` before any training step,
naming each difference and the fix.

**Resuming is the trainer's job.** ``trainer.train(resume_from_checkpoint=True)`` resumes the last
complete checkpoint in ``output_dir`` and, unlike plain ``transformers.Trainer``, trains from scratch
when there is none, so a script can pass ``True`` on every run. ``start_fresh`` (``--start_fresh``)
trains from scratch whatever is there: the existing ``checkpoint-*`` folders are moved, not deleted,
into ``output_dir/_replaced-<UTC time>/`` so that they take no part in the new run's rotation or
resume; delete that folder when it is no longer needed.

**Safe loading.** The objective's state (learned projections) is stored as safetensors
(``distillation_objective.safetensors``), and so is the teacher source's (peers, EMA:
``teacher_source.safetensors``, written and read by the source). A ``distillation_objective.pt`` from an older version is
read with ``torch.load(..., weights_only=True)`` (tensors only, never code).
"""

from __future__ import annotations

import enum
import json
import logging
import math
import os
import pickle
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .modeling import unwrap

logger = logging.getLogger(__name__)

OBJECTIVE_STATE = "distillation_objective.safetensors"
LEGACY_OBJECTIVE_STATE = "distillation_objective.pt"
SETTINGS_NAME = "distillation_settings.json"
TRAINER_STATE = "trainer_state.json"
CHECKPOINT_PREFIX = "checkpoint"
STAGING_PREFIX = "_saving-"  # "_*" is also skipped by the Trainer's Hub uploads
INCOMPLETE_PREFIX = "_incomplete-"
REPLACED_PREFIX = "_replaced-"
SETTINGS_FORMAT = 1
_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}-(\d+)$")

# DistillationArguments fields that define the objective (compared on resume).
DISTILLATION_FIELDS = ("temperature", "kd_weight", "task_weight", "cos_weight", "mse_weight", "hidden_mse_weight",
                       "hidden_layer_map", "distillation", "teacher_weights", "multi_teacher", "teacher_dtype",
                       "restrict_kd_to_mask")
# TrainingArguments fields that change the training trajectory (compared on resume). Not compared:
# max_steps / num_train_epochs (extending a run is a resume), logging, evaluation, saving, output, Hub.
TRAJECTORY_FIELDS = ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "world_size",
                     "seed", "data_seed", "optim", "optim_args", "weight_decay", "adam_beta1", "adam_beta2",
                     "adam_epsilon", "max_grad_norm", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps",
                     "label_smoothing_factor", "bf16", "fp16")
# Config entries that say nothing about the architecture.
_VOLATILE_CONFIG_KEYS = {"transformers_version", "dtype", "torch_dtype", "use_cache", "output_hidden_states",
                         "output_attentions", "return_dict", "name_or_path", "architectures"}
_MAX_LISTED = 20


# ---------------------------------------------------------------------------------------------- folders
def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The step ``N`` of a ``checkpoint-N`` folder name, else None."""
    match = _CHECKPOINT_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """True when ``path`` holds a readable ``trainer_state.json`` (the Trainer writes it after the weights,
    optimizer and RNG states)."""
    state = Path(path) / TRAINER_STATE
    try:
        json.loads(state.read_text())
    except (OSError, ValueError):
        return False
    return True


def list_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """The ``checkpoint-N`` folders in ``folder``, newest step first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step, reverse=True)


def last_complete_checkpoint(folder: str | os.PathLike) -> str | None:
    """The newest complete ``checkpoint-N`` in ``folder`` (None if there is none); incomplete ones are
    skipped with a warning."""
    for path in list_checkpoints(folder):
        if is_complete_checkpoint(path):
            return str(path)
        logger.warning("skipping %s: it has no readable %s (its save was interrupted)", path, TRAINER_STATE)
    return None


def set_aside_incomplete_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """Move incomplete ``checkpoint-N`` folders to ``_incomplete-checkpoint-N`` (out of resumes and rotation) and
    delete leftover staging folders of interrupted saves. Returns the folders moved."""
    folder = Path(folder)
    moved = []
    if not folder.is_dir():
        return moved
    for path in folder.glob(f"{STAGING_PREFIX}{CHECKPOINT_PREFIX}-*"):
        logger.info("removing %s, left by an interrupted save", path)
        shutil.rmtree(path, ignore_errors=True)
    for path in list_checkpoints(folder):
        if not is_complete_checkpoint(path):
            target = _free_name(folder / f"{INCOMPLETE_PREFIX}{path.name}")
            logger.warning("skipping %s: it has no readable %s (its save was interrupted); moved it to %s",
                           path, TRAINER_STATE, target)
            path.rename(target)
            moved.append(target)
    return moved


def set_aside_checkpoints(folder: str | os.PathLike) -> Path | None:
    """Move every ``checkpoint-N`` folder of ``folder`` into ``folder/_replaced-<UTC time>/`` (nothing is deleted).
    Returns that folder, or None when there was nothing to move."""
    folder = Path(folder)
    found = [p for p in folder.glob(f"{CHECKPOINT_PREFIX}-*") if p.is_dir()] if folder.is_dir() else []
    for path in folder.glob(f"{STAGING_PREFIX}{CHECKPOINT_PREFIX}-*") if folder.is_dir() else []:
        shutil.rmtree(path, ignore_errors=True)
    if not found:
        return None
    target = _free_name(folder / f"{REPLACED_PREFIX}{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}")
    target.mkdir(parents=True)
    for path in found:
        path.rename(target / path.name)
    _fsync_dir(folder)
    logger.warning("start_fresh: moved %d earlier checkpoint(s) of %s into %s (delete it when no longer needed)",
                   len(found), folder, target)
    return target


def _free_name(path: Path) -> Path:
    candidate, i = path, 1
    while candidate.exists():
        candidate, i = path.with_name(f"{path.name}.{i}"), i + 1
    return candidate


def _fsync_dir(path: str | os.PathLike) -> None:
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: str | os.PathLike) -> None:
    """Flush every file and directory under ``folder`` to disk."""
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(root)


def publish_folder(staged: str | os.PathLike, final: str | os.PathLike) -> None:
    """Make the complete folder ``staged`` appear at ``final`` in one rename, after flushing it to disk. An older
    folder at ``final`` (a step trained again) is replaced."""
    staged, final = Path(staged), Path(final)
    fsync_tree(staged)
    old = None
    if final.exists():
        old = _free_name(final.with_name(f"{STAGING_PREFIX}old-{final.name}"))
        final.rename(old)
    staged.rename(final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- settings
def _jsonable(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, str):  # a term list given as JSON compares by content, not by spelling
        stripped = value.strip()
        if stripped[:1] in "[{":
            try:
                return _jsonable(json.loads(stripped))
            except ValueError:
                return value
        return value
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def config_summary(config) -> dict[str, Any]:
    """A model config as JSON values, without entries that do not describe the architecture."""
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {k: _jsonable(v) for k, v in sorted(data.items()) if not k.startswith("_") and k not in _VOLATILE_CONFIG_KEYS}


@torch.no_grad()
def weights_fingerprint(model) -> list[float]:
    """``[parameter count, sum, sum of squares]`` of a model's parameters, in float64: two different models
    (another fine-tune, another checkpoint) almost surely differ in it."""
    count, total, squares = 0, 0.0, 0.0
    for p in unwrap(model).parameters():
        values = p.detach().double()
        count += values.numel()
        total += float(values.sum())
        squares += float(values.square().sum())
    return [float(count), total, squares]


def settings_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"key: <saved> in the checkpoint, <current> now"`` for every compared setting that differs."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if key.endswith(".weights") and isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            if all(math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9) for x, y in zip(a, b)):
                continue
            out.append(f"{key}: other weights in the checkpoint than now")
        elif a != b:
            out.append(f"{key}: {_show(a)} in the checkpoint, {_show(b)} now")
    return out


def _show(value: Any) -> str:
    if isinstance(value, str) and value != "<absent>":
        return json.dumps(value)
    text = str(value) if isinstance(value, (int, float, bool)) or value is None or value == "<absent>" \
        else json.dumps(value, sort_keys=True)
    return text if len(text) <= 120 else text[:117] + "..."


# ---------------------------------------------------------------------------------------------- the mixin
class DistillationCheckpointMixin:
    """Atomic checkpoints, settings-checked resumes and ``start_fresh`` for a Trainer that owns ``self.objective``
    (and ``self.teachers``). See the module docstring."""

    # ------------------------------------------------------------------ settings
    def add_resume_settings(self, **settings: Any) -> None:
        """Add settings (a recipe's data and student choices, a cached teacher's identity, ...) that a resume must
        match; stored as ``recipe.<name>`` with every checkpoint."""
        extra = self.__dict__.setdefault("_extra_resume_settings", {})
        extra.update({f"recipe.{k}": _jsonable(v) for k, v in settings.items()})

    def distillation_settings(self) -> dict[str, Any]:
        """The settings a resume must match, as a flat ``{name: JSON value}`` mapping."""
        args = self.args
        flat: dict[str, Any] = {}
        for name in DISTILLATION_FIELDS:
            if name == "teacher_weights":  # compared as normalised (0.25,0.75 == 1,3)
                flat[name] = _jsonable(getattr(args, "teacher_weight_list", None))
            elif hasattr(args, name):
                flat[name] = _jsonable(getattr(args, name))
        for name in TRAJECTORY_FIELDS:
            if hasattr(args, name):
                flat[name] = _jsonable(getattr(args, name))
        for i, term in enumerate(getattr(getattr(self, "objective", None), "terms", None) or []):
            key = f"objective[{i}]"
            flat[f"{key}.loss"] = term.loss_name
            flat[f"{key}.weight"] = float(term.weight)
            flat[f"{key}.options"] = _jsonable(dict(getattr(term, "config", {}) or {}))
            flat[f"{key}.teacher"] = getattr(term, "teacher_index", None)
        student = unwrap(self.model)
        flat["student.class"] = type(student).__name__
        for k, v in config_summary(student.config).items():
            flat[f"student.{k}"] = v
        teachers = list(getattr(self, "teachers", None) or [])
        flat["teachers"] = len(teachers)
        source = getattr(self, "teacher_source", None)
        if source is not None:
            flat["teacher_source"] = _jsonable(source.describe())
        # Only a frozen teacher keeps its weights; peers, EMA and snapshot teachers change as the run goes.
        frozen = source is None or getattr(source, "kind", None) == "frozen"
        fingerprints = self.__dict__.setdefault("_teacher_fingerprints", {})
        for i, teacher in enumerate(teachers):
            base = unwrap(teacher)
            flat[f"teacher[{i}].class"] = type(base).__name__
            for k, v in config_summary(base.config).items():
                flat[f"teacher[{i}].{k}"] = v
            if frozen:
                if id(teacher) not in fingerprints:  # once per run
                    fingerprints[id(teacher)] = weights_fingerprint(teacher)
                flat[f"teacher[{i}].weights"] = fingerprints[id(teacher)]
        flat.update(self.__dict__.get("_extra_resume_settings", {}))
        return flat

    def _settings_record(self) -> dict[str, Any]:
        teachers = [getattr(unwrap(t), "name_or_path", None) for t in getattr(self, "teachers", None) or []]
        return {"format": SETTINGS_FORMAT, "step": self.state.global_step, "compared": self.distillation_settings(),
                "info": {"teachers": teachers}}

    def check_resume_settings(self, checkpoint: str | os.PathLike) -> None:
        """Raise ValueError listing every difference between ``checkpoint``'s settings and this run's."""
        path = Path(checkpoint) / SETTINGS_NAME
        if not path.is_file():
            logger.warning("%s has no %s (written by another tool or an older version): resuming without checking "
                           "that its settings are this run's", checkpoint, SETTINGS_NAME)
            return
        try:
            saved = json.loads(path.read_text())["compared"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path} cannot be read ({exc}); set --start_fresh to train from scratch") from None
        diffs = settings_differences(saved, self.distillation_settings())
        if diffs:
            listed = "; ".join(diffs[:_MAX_LISTED]) + (f"; and {len(diffs) - _MAX_LISTED} more"
                                                       if len(diffs) > _MAX_LISTED else "")
            raise ValueError(
                f"cannot resume from {checkpoint}: this run's settings differ from the checkpoint's ({listed}). "
                "Rerun with the checkpoint's settings to continue it, or set --start_fresh (start_fresh=True) to "
                f"train from scratch (the checkpoints in {self.args.output_dir} are then moved to a _replaced-* "
                "folder, not deleted), or choose another --output_dir")

    # ------------------------------------------------------------------ resuming
    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None,
              **kwargs):
        """``Trainer.train``; ``resume_from_checkpoint=True`` resumes the last complete checkpoint in ``output_dir``
        or trains from scratch when there is none. Every resume is checked against this run's settings first."""
        args = self.args
        output_dir = args.output_dir
        explicit = resume_from_checkpoint if isinstance(resume_from_checkpoint, (str, os.PathLike)) else None
        if args.start_fresh and explicit is not None:
            raise ValueError(f"start_fresh is set but resume_from_checkpoint={str(explicit)!r} names a checkpoint to "
                             "resume; drop one of the two")
        if args.should_save:
            if args.start_fresh:
                set_aside_checkpoints(output_dir)
            else:
                set_aside_incomplete_checkpoints(output_dir)
        self.accelerator.wait_for_everyone()
        if args.start_fresh:
            resume = None
        elif explicit is not None:
            resume = str(explicit)
            if not Path(resume).is_dir():
                raise FileNotFoundError(f"resume_from_checkpoint={resume!r} is not a folder; give a checkpoint-N "
                                        f"folder, or True for the last complete one in {output_dir}")
            if not is_complete_checkpoint(resume):
                raise ValueError(f"{resume} is not a complete checkpoint (no readable {TRAINER_STATE}); give another "
                                 f"one, or True for the last complete one in {output_dir}")
        elif resume_from_checkpoint is True:
            resume = last_complete_checkpoint(output_dir)
            if resume is None:
                logger.info("no complete checkpoint in %s: training from scratch", output_dir)
        else:
            resume = None
            if list_checkpoints(output_dir):
                logger.warning("%s holds checkpoints of an earlier run that this run neither resumes (pass "
                               "resume_from_checkpoint=True) nor sets aside (start_fresh); they share its rotation",
                               output_dir)
        if resume is not None:
            self.check_resume_settings(resume)
            logger.info("resuming from %s", resume)
            finished = self._finished_run(resume)
            if finished is not None:
                return finished
        return super().train(resume_from_checkpoint=resume, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval,
                             **kwargs)

    def _finished_run(self, checkpoint: str):
        """The run's result when ``checkpoint`` is already its last step (its weights loaded), else None.
        (``Trainer.train`` would train one step more than the run's length when resumed at its end.)"""
        from transformers.trainer_callback import TrainerState
        from transformers.trainer_utils import TrainOutput

        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return None
        state = TrainerState.load_from_json(os.path.join(checkpoint, TRAINER_STATE))
        args = self.args
        if args.max_steps > 0:
            done = state.global_step >= args.max_steps
        else:
            done = bool(state.max_steps) and state.global_step >= state.max_steps and \
                float(state.num_train_epochs or 0) == float(args.num_train_epochs)
        if not done:
            return None
        logger.info("%s is the last step of this run (step %d): nothing left to train", checkpoint, state.global_step)
        self._load_from_checkpoint(checkpoint)
        self.state = state
        loss = next((h["train_loss"] for h in reversed(state.log_history) if "train_loss" in h), float("nan"))
        return TrainOutput(state.global_step, loss, {"train_runtime": 0.0, "resumed_finished_run": True})

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model=model)
        folder = Path(resume_from_checkpoint)
        source = getattr(self, "teacher_source", None)
        if source is not None:
            source.load_checkpoint(folder)  # a source's own state (peers, EMA), safetensors
        for term in getattr(getattr(self, "objective", None), "terms", None) or []:
            if hasattr(term, "load_checkpoint"):  # a term's own model and optimiser (a discriminator)
                term.load_checkpoint(folder)
        if (folder / OBJECTIVE_STATE).is_file():
            state = load_file(str(folder / OBJECTIVE_STATE), device=str(self.args.device))
        elif (folder / LEGACY_OBJECTIVE_STATE).is_file():  # older versions: a pickle, read as tensors only
            try:
                state = torch.load(folder / LEGACY_OBJECTIVE_STATE, map_location=self.args.device, weights_only=True)
            except pickle.UnpicklingError as exc:
                raise ValueError(f"{folder / LEGACY_OBJECTIVE_STATE} holds more than tensors and is not unpickled "
                                 f"(weights_only): {str(exc).splitlines()[0]}. Delete it (the learned projections "
                                 "then restart) or set --start_fresh") from None
        else:
            return
        try:
            self.objective.load_state_dict(state)
        except RuntimeError as exc:
            raise ValueError(f"the objective's state in {folder} does not fit this run's terms ({exc}); resume with "
                             "the checkpoint's settings or set --start_fresh") from None

    # ------------------------------------------------------------------ saving
    def _get_output_dir(self, trial):
        staging = self.__dict__.get("_staging_run_dir")
        return staging if staging is not None else super()._get_output_dir(trial=trial)

    def _push_from_checkpoint(self, checkpoint_folder):
        if self.__dict__.get("_staging_run_dir") is not None:
            self._deferred_push = True  # pushed once the checkpoint is complete and in place
            return
        super()._push_from_checkpoint(checkpoint_folder)

    def _save_checkpoint(self, model, trial):
        run_dir = super()._get_output_dir(trial=trial)
        name = f"{CHECKPOINT_PREFIX}-{self.state.global_step}"
        staging_root = os.path.join(run_dir, f"{STAGING_PREFIX}{name}")
        staged, final = os.path.join(staging_root, name), os.path.join(run_dir, name)
        if self.args.should_save and os.path.exists(staging_root):
            shutil.rmtree(staging_root)
        self.accelerator.wait_for_everyone()
        self._deferred_push = False
        self._staging_run_dir = staging_root
        try:
            super()._save_checkpoint(model, trial)  # writes staging_root/checkpoint-N; rotating there is a no-op
        finally:
            self._staging_run_dir = None
        if self.args.should_save:
            self._finish_staged_checkpoint(staged, final, staging_root)
        self.accelerator.wait_for_everyone()  # every process's RNG state is in before the rename
        if self.args.should_save:
            publish_folder(staged, final)
            shutil.rmtree(staging_root, ignore_errors=True)
            self._rotate_after_save(run_dir)
        self.accelerator.wait_for_everyone()
        if self._deferred_push:
            self._deferred_push = False
            super()._push_from_checkpoint(final)

    def _finish_staged_checkpoint(self, staged: str, final: str, staging_root: str) -> None:
        """Add the objective's and the teacher source's state and the settings; point the Trainer state at the
        final folder names."""
        source = getattr(self, "teacher_source", None)
        if source is not None:
            source.save_checkpoint(staged)
        for term in self.objective.terms:
            if hasattr(term, "save_checkpoint"):  # a term's own model and optimiser (a discriminator)
                term.save_checkpoint(staged)
        state_dict = self.objective.state_dict()
        if state_dict:
            save_file({k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()},
                      os.path.join(staged, OBJECTIVE_STATE))
        Path(staged, SETTINGS_NAME).write_text(json.dumps(self._settings_record(), indent=1, sort_keys=True) + "\n")
        best = self.state.best_model_checkpoint
        if best and os.path.abspath(best).startswith(os.path.abspath(staging_root)):
            self.state.best_model_checkpoint = final
            self.state.save_to_json(os.path.join(staged, TRAINER_STATE))

    def _rotate_after_save(self, run_dir: str) -> None:
        if not self.args.save_total_limit:
            return
        try:
            from transformers.trainer_utils import rotate_checkpoints
        except ImportError:  # transformers releases where rotation is a Trainer method
            self._rotate_checkpoints(use_mtime=True, output_dir=run_dir)
            return
        rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                           best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
