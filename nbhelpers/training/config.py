"""What a training run is configured with, and the names of the files it writes.

:class:`TrainConfig` holds every setting of one run besides the model and the data; protocol
presets (``presets.toml``) fill it through :func:`config_from_preset`.  Settings given as text
(``KEY=VALUE`` on a command line, a grid file) are typed by the field they set
(:func:`parse_set`, :func:`parse_preprocess`, :func:`parse_options`) before any work, so
``pretrained=false`` is False and ``epochs=1.5`` stops with the field's name.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Mapping, Sequence

from data_prep.errors import WorkbookError
from nbhelpers.settings.keyvalue import (
    AssignmentError,
    check_fields,
    check_value,
    expected_type,
    parse_assignments,
    type_name,
    unknown_key_message,
)
from nbhelpers.settings.presets import load_preset
from nbhelpers.training.losses import LOSSES

#: The files of a run folder: the per-epoch log, the best-validation and the newest checkpoint.
LOG_NAME = "log.csv"
BEST_NAME = "best.pt"
LAST_NAME = "last.pt"
#: The ``last.pt`` before the newest, kept so a damaged ``last.pt`` is not the end of a run.
PREV_NAME = "last.prev.pt"
#: The lock file a training run holds in its folder.
LOCK_NAME = ".lock"
#: What a finished run writes besides its checkpoints: the training summary, the test metrics,
#: the test predictions and the learning curves.
CONFIG_NAME = "train_config.json"
METRICS_NAME = "metrics.json"
PREDICTIONS_NAME = "test_predictions.csv"
CURVES_NAME = "curves.png"
OPTIMIZERS = ("adam", "adamw")
SCHEDULERS = ("none", "step", "cosine")
AMP_MODES = ("auto", "bf16", "fp16", "off")
#: Preset settings that are not TrainConfig fields: they choose the model and the preprocessing.
PRESET_EXTRAS = ("description", "image_size", "pretrained")
#: What each preset extra must hold (a string here would make ``bool("false")`` True).
PRESET_EXTRA_TYPES: dict[str, type] = {"description": str, "image_size": int, "pretrained": bool}


class TrainConfigError(WorkbookError, ValueError):
    """A training setting out of range or unknown (an optimizer, scheduler, loss or mixed
    precision this trainer does not have, a count below its minimum), or one the device cannot run."""


@dataclass
class TrainConfig:
    """What one training run needs besides the model and the data (presets fill it; see presets.toml).

    ``scheduler``: ``none``, ``step`` (lr x ``gamma`` every ``step_size`` epochs) or ``cosine``
    (to zero over ``epochs``).  ``patience``: stop after that many epochs without a better
    validation accuracy (0 = never).  ``loss`` / ``loss_options``: see :func:`nbhelpers.training.losses.make_loss`.
    ``amp``: ``auto`` (bf16 on CUDA where supported, else fp16; off on the CPU), ``bf16``,
    ``fp16`` (CUDA only) or ``off``.  ``channels_last`` applies on CUDA only; ``compile`` wraps
    the model in ``torch.compile``; ``deterministic`` asks CUDA for deterministic kernels.
    Every field is first checked against the type of its default (``epochs=1.5`` or
    ``epochs="abc"`` stop with :class:`~nbhelpers.settings.keyvalue.AssignmentError`, a ValueError naming
    the field and the expected type; an integer is accepted where a number is expected), then
    against its range.  Raises ValueError naming the field for an invalid value.
    """

    epochs: int = 50
    batch_size: int = 32
    lr: float = 2e-4
    optimizer: str = "adam"  # seed 001: Adam, betas (0.9, 0.999)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    scheduler: str = "none"
    step_size: int = 8
    gamma: float = 0.8
    patience: int = 0
    loss: str = "ce"
    loss_options: dict[str, float] = field(default_factory=dict)
    augment: str = "off"
    seed: int = 0
    in_chans: int = 3
    amp: str = "auto"
    channels_last: bool = True
    compile: bool = False
    deterministic: bool = False

    def __post_init__(self) -> None:
        schema = train_schema()
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in values.items():
            if value is None:  # check_value lets None through (it means "the default" on a command line)
                raise AssignmentError(f"TrainConfig.{name} must be {type_name(expected_type(schema[name]))}, got None")
        for name, value in check_fields(values, schema, "TrainConfig").items():
            setattr(self, name, value)
        self.betas = tuple(self.betas)  # TOML and the command line give a list
        checks = [
            ("optimizer", self.optimizer in OPTIMIZERS, f"unknown optimizer {self.optimizer!r}; use one of {OPTIMIZERS}"),
            ("scheduler", self.scheduler in SCHEDULERS, f"one of {SCHEDULERS}"),
            ("amp", self.amp in AMP_MODES, f"one of {AMP_MODES}"),
            ("loss", self.loss in LOSSES, f"one of {LOSSES}"),
            ("epochs", int(self.epochs) >= 1, "an integer >= 1"),
            ("batch_size", int(self.batch_size) >= 1, "an integer >= 1"),
            ("patience", int(self.patience) >= 0, "an integer >= 0 (0 turns early stopping off)"),
            ("step_size", int(self.step_size) >= 1, "an integer >= 1"),
            ("lr", float(self.lr) > 0, "> 0"),
            ("betas", len(self.betas) == 2, "two numbers"),
        ]
        for name, ok, need in checks:
            if not ok:
                message = need if need.startswith("unknown") else f"TrainConfig.{name} must be {need}, got {getattr(self, name)!r}"
                raise TrainConfigError(message)


def _defaults(cls: type) -> dict[str, Any]:
    """A dataclass's field defaults, tuples as lists (the schema form of a fixed-length list)."""
    out = {}
    for f in fields(cls):
        value = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def train_schema() -> dict[str, Any]:
    """Every :class:`TrainConfig` field with its default, the schema of its types."""
    return _defaults(TrainConfig)


def set_schema() -> dict[str, Any]:
    """What ``--set`` accepts: every TrainConfig field plus the preset's ``image_size`` and ``pretrained``."""
    return {**train_schema(), "image_size": int, "pretrained": bool}


def preprocess_schema() -> dict[str, Any]:
    """What ``--preprocess`` accepts: every :class:`~nbhelpers.pipeline.preprocess.PreprocessConfig` field and its default."""
    from nbhelpers.pipeline.preprocess import PreprocessConfig

    return _defaults(PreprocessConfig)


def _none_as_text(items: Sequence[str], values: dict[str, Any], hints: Mapping[str, Any]) -> dict[str, Any]:
    """Put back the word ``none`` where the setting holds text (``scheduler=none``,
    ``attention=none``): the reader takes ``none`` for "no value", which a preset would then
    ignore and a model would refuse."""
    for item in items:
        key, _, raw = item.partition("=")
        key = key.strip()
        if values.get(key, ...) is None and raw.strip().lower() == "none" and isinstance(hints.get(key), str):
            values[key] = raw.strip()
    return values


def parse_set(items: Sequence[str], flag: str = "--set") -> dict[str, Any]:
    """Typed preset overrides from ``KEY=VALUE`` items (``pretrained=false`` is False); raises
    :class:`~nbhelpers.settings.keyvalue.AssignmentError` naming an unknown key or a value of the wrong type."""
    schema = set_schema()
    values = parse_assignments(items, schema, "a preset setting (a TrainConfig field, image_size or pretrained)", flag)
    return _none_as_text(items, values, schema)


def parse_preprocess(items: Sequence[str], flag: str = "--preprocess") -> dict[str, Any]:
    """Typed PreprocessConfig overrides from ``KEY=VALUE`` items; raises AssignmentError as :func:`parse_set`."""
    schema = preprocess_schema()
    return _none_as_text(items, parse_assignments(items, schema, "a PreprocessConfig field", flag), schema)


def parse_options(items: Sequence[str], model: str | None = None, flag: str = "--option") -> dict[str, Any]:
    """Model options from ``KEY=VALUE`` items, parsed only (:func:`nbhelpers.models.create`
    checks them); with ``model`` named, ``none`` stays the word where its default is text."""
    values = parse_assignments(items, None, flag=flag)
    if model is None:
        return values
    from nbhelpers import models

    try:
        hints = dict(models.model_spec(model).options)
    except models.UnknownModelError:
        return values  # train_run names the unknown model
    return _none_as_text(items, values, hints)


def check_preprocess(preprocess: Mapping[str, Any] | None) -> dict[str, Any]:
    """``preprocess`` overrides checked against PreprocessConfig's fields and types (from Python or
    a grid file); raises AssignmentError naming an unknown field (with close matches) or a wrong type."""
    schema = preprocess_schema()
    values = dict(preprocess or {})
    for key in values:
        if key not in schema:
            raise AssignmentError(f"preprocess {unknown_key_message(key, schema, 'a PreprocessConfig field')}")
    return check_fields(values, schema, "PreprocessConfig")


def config_from_preset(preset: str = "seed001", **overrides: Any) -> tuple[TrainConfig, dict[str, Any]]:
    """Return the :class:`TrainConfig` of ``preset`` with ``overrides`` applied, plus the preset's
    other settings (``description``, ``image_size``, ``pretrained``).

    Any TrainConfig field may be overridden; ``None`` values are ignored.  Raises
    :class:`nbhelpers.settings.presets.PresetError` for an unknown preset or setting, and
    :class:`~nbhelpers.settings.keyvalue.AssignmentError` (a ValueError) naming the setting when a value
    has the wrong type (``image_size`` must be an integer, ``pretrained`` true or false, the
    rest as :class:`TrainConfig` says).
    """
    values = load_preset(preset, allowed=[f.name for f in fields(TrainConfig)], **overrides)
    extras = {key: values.pop(key) for key in PRESET_EXTRAS if key in values}
    for key, value in extras.items():
        extras[key] = check_value(f"preset {preset!r} setting {key}", value, PRESET_EXTRA_TYPES[key])
    extras.setdefault("pretrained", False)
    return TrainConfig(**values), extras

