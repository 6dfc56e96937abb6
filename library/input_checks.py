"""Checks of user input that sd-scripts passes through unchecked: values that would silently
train something else than asked (a resolution the VAE floors), and `--config_file` values of
the wrong type or keys no flag reads."""
from __future__ import annotations

import argparse
import logging
from typing import Any, Iterable, Optional

from library.errors import UserError

logger = logging.getLogger(__name__)

LATENT_STEP = 8  # pixels per latent cell of every SD VAE
# the most asked question about DreamBooth-style folders: say what the layout must be
DREAMBOOTH_LAYOUT = (
    "the layout must be <train_data_dir>/<repeats>_<class tokens>/<images>, with optional captions "
    "beside the images, e.g. train/10_sks dog/001.png and train/10_sks dog/001.txt"
)


def round_resolution(resolution: tuple[int, int], step: Optional[int]) -> tuple[int, int]:
    """`resolution` rounded to a multiple of `step` (8 without buckets), warning when it changes.

    The VAE floors sizes to multiples of 8, so `--resolution 65` would otherwise train 64×64
    images cropped from 65×65 ones without a word.
    """
    step = int(step or LATENT_STEP)
    if step <= 0:
        raise UserError(f"bucket_reso_steps must be positive, got {step}")
    rounded = tuple(max(step, int(round(value / step)) * step) for value in resolution)
    if rounded != tuple(resolution):
        logger.warning(
            "resolution %s is not a multiple of %d: using %s instead",
            "x".join(map(str, resolution)), step, "x".join(map(str, rounded)),
        )
    return rounded  # type: ignore[return-value]


def _accepts(action: argparse.Action, value: Any) -> bool:
    """Whether `value` (from TOML, not converted by argparse) fits what the flag expects."""
    if value is None:
        return True
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return isinstance(value, bool)
    kind = action.type
    values = value if isinstance(value, list) and action.nargs not in (None, "?") else [value]
    for item in values:
        if kind in (int, float) and (isinstance(item, bool) or not isinstance(item, (int, float))):
            return False
        if kind is int and isinstance(item, float) and not item.is_integer():
            return False
        if action.choices is not None and item not in action.choices:
            return False
    return True


def check_config_values(flat: dict[str, Any], parser: argparse.ArgumentParser, source: str,
                        ignore: Iterable[str] = ()) -> None:
    """`--config_file` keys: a value of the wrong type is a `UserError` naming the key; a key
    that no flag of this script reads gets a one-line warning (sd-scripts keeps such keys)."""
    actions = {action.dest: action for action in parser._actions}
    skip = set(ignore)
    for key, value in flat.items():
        action = actions.get(key)
        if action is None:
            if key not in skip:
                logger.warning("%s: key %r is not a flag of this script and is ignored", source, key)
            continue
        if not _accepts(action, value):
            expected = "true/false" if action.type is None and action.nargs == 0 else (
                getattr(action.type, "__name__", "a value") if action.choices is None
                else "one of " + ", ".join(map(str, action.choices))
            )
            raise UserError(f"{source}: key {key!r} = {value!r}: wrong type or value, expected {expected}")
