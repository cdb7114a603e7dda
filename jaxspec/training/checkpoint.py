"""Orbax checkpoints of a training run: train state, data-stream position and config, checked on restore.

Layout of a workdir::

    workdir/config.json                      the run's ConfigDict (``to_json_best_effort``)
    workdir/checkpoints/<step>/train_state/  the train-state pytree (params, optimizer state, RNG data, ...)
    workdir/checkpoints/<step>/data_state/   the data stream position (a JSON dict, see ``data.Batches``)

The train state is any pytree with a top-level ``params`` entry (a dict key or a dataclass field);
``restore_params`` reads only that subtree. RNG keys are stored as their uint32 data
(``jax.random.key_data``); typed key arrays are not serialisable.

A save is published last: orbax writes the step into ``<step>.orbax-checkpoint-tmp`` and renames it into place
when complete, so a save killed midway leaves the previous step as the latest (and the next save of the step
replaces the leftover).

Restoring never guesses: a missing checkpoint, a step directory that was not completely written, or a
checkpoint whose tree or shapes differ from the target raises InputError naming the directory and, for
shapes, the first mismatching path with both shapes. Saving a step older than the newest one in the
workdir is refused too, so a run started by mistake in a used workdir cannot overwrite it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from jaxspec.errors import InputError

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
TRAIN_STATE = "train_state"
DATA_STATE = "data_state"
# Written last by orbax into a step directory and into each item directory when a save has finished.
COMMIT_MARKER = "commit_success.txt"
# The file each item's handler cannot restore without.
_ITEM_METADATA_FILE = {TRAIN_STATE: "_METADATA", DATA_STATE: "metadata"}


# ------------------------------------------------------------------------------------------ tree helpers


def _key_name(entry) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _path_name(path) -> str:
    """Dotted name of a tree path; dataclass fields, dict keys and sequence indices all read alike."""
    return ".".join(_key_name(e) for e in path) or "<root>"


def _leaf_shapes(tree) -> Shapes:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_path_name(path): tuple(np.shape(leaf)) for path, leaf in leaves}


Shapes = dict[str, tuple[int, ...]]  # dotted tree path -> array shape


def check_tree_shapes(saved: Shapes, target: Shapes, where: str) -> None:
    """Raise InputError at the first path that is missing, extra or of another shape.

    Paths under ``params`` are checked first (an optimizer-state mismatch follows from a params one, and the
    params path is the one that tells which layer differs), then the rest in tree order.
    """
    params_first = sorted(target, key=lambda name: name.split(".")[0] != "params")
    for name in params_first:
        shape = target[name]
        if name not in saved:
            raise InputError(f"checkpoint {where} has no entry {name!r} (target shape {shape}); "
                             "it was made for another model or optimizer")
        if tuple(saved[name]) != tuple(shape):
            raise InputError(f"checkpoint {where} was made for another model shape: {name!r} has shape "
                             f"{tuple(saved[name])} in the checkpoint but {shape} in the target")
    extra = [name for name in saved if name not in target]
    if extra:
        raise InputError(f"checkpoint {where} has entries the target lacks, first {extra[0]!r} "
                         f"(shape {tuple(saved[extra[0]])}); it was made for another model or optimizer")


def _abstract(tree):
    """Array-like leaves -> ShapeDtypeStruct (keeping their sharding); other leaves as they are."""
    def to_struct(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        if hasattr(x, "shape") and hasattr(x, "dtype"):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
        return x

    return jax.tree.map(to_struct, tree)


# ---------------------------------------------------------------------------------------- config files


def _write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    path = os.path.join(workdir, CONFIG_FILE)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        fh.write(config.to_json_best_effort(indent=2, sort_keys=True))
    os.replace(tmp, path)  # atomic: a reader never sees half a file


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The ConfigDict saved in ``workdir/config.json``."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise InputError(f"workdir {workdir!r} has no {CONFIG_FILE}; is it a training workdir?")
    try:
        with open(path) as fh:
            return ml_collections.ConfigDict(json.load(fh))
    except (json.JSONDecodeError, OSError) as err:
        raise InputError(f"config file {path!r} could not be read: {err}") from err


# ------------------------------------------------------------------------------------------ the manager


class _ReadOnlyCheckpointNotes(logging.Filter):
    """Orbax notes at WARNING level that a read-only checkpoint manager ignores its saving options: every
    model load opens one, and the notes would bury a command's own output."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("orbax" in record.pathname and ("read_only=True" in message or "is read only" in message))


def _quiet_read_only_notes() -> None:
    absl_logger = logging.getLogger("absl")
    if not any(isinstance(f, _ReadOnlyCheckpointNotes) for f in absl_logger.filters):
        absl_logger.addFilter(_ReadOnlyCheckpointNotes())


class CheckpointManager:
    """Saves at steps that are multiples of ``save_every`` and keeps the newest ``keep`` checkpoints.

    ``save(step, ...)`` is a no-op (returns False) off the interval unless ``force=True`` (use it for the
    final step) and for a step that is already saved. With ``async_save=True`` saves finish in the
    background; call ``wait()`` or ``close()`` (or use the manager as a context manager) before exiting.
    """

    def __init__(self, workdir: str, save_every: int = 1000, keep: int = 3, async_save: bool = False,
                 read_only: bool = False):
        if isinstance(save_every, bool) or not isinstance(save_every, int) or save_every < 1:
            raise InputError(f"save_every={save_every!r} is invalid; expected a positive integer")
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise InputError(f"keep={keep!r} is invalid; expected a positive integer")
        self.save_every = save_every
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.join(self.workdir, CHECKPOINT_DIR)
        if read_only and not os.path.isdir(self.directory):
            raise InputError(f"workdir {workdir!r} has no checkpoints (no {CHECKPOINT_DIR}/ directory)")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            read_only=read_only,
            create=not read_only,
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                TRAIN_STATE: ocp.StandardCheckpointHandler(),
                DATA_STATE: ocp.JsonCheckpointHandler(),
            },
        )

    # -- bookkeeping

    def all_steps(self) -> list[int]:
        """Steps with a step directory, oldest first (complete or not: restore checks completeness)."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- saving

    def save(self, step: int, train_state: Any, data_state: Mapping[str, Any],
             config: ml_collections.ConfigDict, force: bool = False) -> bool:
        """Save at ``step`` if it is on the interval (or ``force``); returns whether it wrote a checkpoint."""
        steps = self.all_steps()
        if step in steps:
            return False
        if steps and step < steps[-1]:
            raise InputError(
                f"workdir {self.workdir!r} already holds checkpoint step {steps[-1]}, newer than step "
                f"{step}; resume from it (restore_train_state) or use a fresh workdir"
            )
        try:
            json.dumps(dict(data_state))
        except (TypeError, ValueError) as err:
            raise InputError(
                f"data_state must be a JSON-serialisable dict, got {data_state!r}: {err}"
            ) from err
        if step % self.save_every and not force:
            return False
        if jax.process_index() == 0:
            _write_config(self.workdir, config)
        args = ocp.args.Composite(**{
            TRAIN_STATE: ocp.args.StandardSave(train_state),
            DATA_STATE: ocp.args.JsonSave(dict(data_state)),
        })
        # The interval is decided above (orbax's own policy would also save the first step it sees).
        return bool(self._manager.save(step, args=args, force=True))

    # -- restoring

    def _checked_step(self, step: int | None, items: tuple[str, ...]) -> int:
        """The step to restore (default: latest) after checking that its directory is complete."""
        steps = self.all_steps()
        if not steps:
            raise InputError(f"no checkpoint found in {self.directory!r}")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise InputError(f"no checkpoint for step {step} in {self.directory!r}; available steps: {steps}")
        step_dir = self.step_dir(step)
        required = [COMMIT_MARKER]
        for item in items:
            required += [f"{item}/{COMMIT_MARKER}", f"{item}/{_ITEM_METADATA_FILE[item]}"]
        for rel in required:
            if not os.path.exists(os.path.join(step_dir, rel)):
                raise InputError(
                    f"checkpoint {step_dir!r} is incomplete (missing {rel}): the save was interrupted or "
                    "files were removed; delete this step directory to fall back to an older step"
                )
        return step

    def _saved_tree(self, step: int):
        """The saved train state's tree of array metadata (each leaf has ``shape`` and ``dtype``)."""
        try:
            metadata = self._manager.item_metadata(step)[TRAIN_STATE]
        except (OSError, ValueError, KeyError) as err:
            raise InputError(f"checkpoint {self.step_dir(step)!r} metadata could not be read: {err}") from err
        if metadata is None:
            raise InputError(f"checkpoint {self.step_dir(step)!r} has no readable {TRAIN_STATE} metadata")
        return getattr(metadata, "tree", metadata)

    def saved_shapes(self, step: int) -> Shapes:
        """Dotted path -> shape of every array in the saved train state."""
        leaves = jax.tree_util.tree_flatten_with_path(self._saved_tree(step))[0]
        return {_path_name(path): tuple(leaf.shape) for path, leaf in leaves}

    def _restore(self, step: int, what: str, restore):
        try:
            return restore()
        except (OSError, ValueError, KeyError) as err:
            raise InputError(f"checkpoint {self.step_dir(step)!r}: {what} could not be restored "
                             f"(corrupt or partial checkpoint): {err}") from err

    def restore_train_state(self, abstract_train_state: Any,
                            step: int | None = None) -> tuple[Any, dict, int]:
        """(train_state, data_state, step) of the latest (or given) checkpoint, shaped like the target.

        ``abstract_train_state`` is a pytree of arrays or ``jax.ShapeDtypeStruct`` (e.g. from
        ``jax.eval_shape``); leaves with a sharding are restored with it.
        """
        step = self._checked_step(step, (TRAIN_STATE, DATA_STATE))
        target = _abstract(abstract_train_state)
        check_tree_shapes(self.saved_shapes(step), _leaf_shapes(target), self.step_dir(step))
        args = ocp.args.Composite(**{
            TRAIN_STATE: ocp.args.StandardRestore(target),
            DATA_STATE: ocp.args.JsonRestore(),
        })
        restored = self._restore(step, "the train state", lambda: self._manager.restore(step, args=args))
        return restored[TRAIN_STATE], dict(restored[DATA_STATE]), step

    def restore_params(self, step: int | None = None) -> Any:
        """Only the ``params`` subtree of the saved train state, as arrays on the default device."""
        step = self._checked_step(step, (TRAIN_STATE,))
        tree = self._saved_tree(step)
        if not isinstance(tree, Mapping) or "params" not in tree:
            tops = sorted(tree) if isinstance(tree, Mapping) else type(tree).__name__
            raise InputError(
                f"checkpoint {self.step_dir(step)!r} has no top-level 'params' entry; found {tops}")
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = {"params": jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device), tree["params"])}
        restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding), target)
        path = os.path.join(self.step_dir(step), TRAIN_STATE)
        args = ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
        with ocp.PyTreeCheckpointer() as checkpointer:
            restored = self._restore(step, "the params", lambda: checkpointer.restore(path, args=args))
        return restored["params"]


def restore_params(workdir: str, step: int | None = None) -> tuple[Any, ml_collections.ConfigDict]:
    """(params, config) of a training workdir, for decoding: latest step unless ``step`` is given."""
    if not os.path.isdir(workdir):
        raise InputError(f"workdir {workdir!r} does not exist")
    config = load_config(workdir)
    if "model" in config:  # model keys added since the run was saved take their defaults
        from jaxspec import config as config_lib

        config.model = config_lib.with_defaults(config.model, config_lib.model_defaults())
    _quiet_read_only_notes()
    with CheckpointManager(workdir, read_only=True) as manager:
        params = manager.restore_params(step)
    return params, config


def finished(workdir: str) -> bool:
    """Whether `workdir` holds a training run that saved its config's last step (False for none, a partial
    run, or a directory that is not a run)."""
    if not os.path.isfile(os.path.join(workdir, CONFIG_FILE)) or not os.path.isdir(os.path.join(workdir,
                                                                                             CHECKPOINT_DIR)):
        return False
    _quiet_read_only_notes()
    with CheckpointManager(workdir, read_only=True) as manager:
        return manager.latest_step() == load_config(workdir).train.steps
