"""Prompt templates: how class names and queries become text for the text encoders.

One home for every template list: the registry's default per-model template, the zero-shot
ensemble used by search, evaluation and training validation, and the caption templates that
turn class labels into training text.
"""
from __future__ import annotations

#: A model's own template when its registry entry names none.
DEFAULT_TEMPLATE = "a satellite image of {}."

#: Prompt ensemble for zero-shot classification (the model's own template comes first where used).
ZERO_SHOT_TEMPLATES = (
    "a satellite image of {}.",
    "an aerial photograph of {}.",
    "a remote sensing image of {}.",
    "an aerial view of {}.",
    "{} seen from above.",
)

#: Captions made from a class label for training (``--class-prompts``).
CLASS_CAPTION_TEMPLATES = (
    "an aerial image of {}.",
    "a satellite image of {}.",
    "a remote sensing image of {}.",
    "an aerial photograph showing {}.",
    "there is {} in this aerial image.",
    "a top-down view of {}.",
)


def apply_template(text: str, template: str) -> str:
    """Fill ``template`` with ``text`` (a template without ``{}`` leaves the text as it is)."""
    return template.format(text) if "{}" in template else text


def class_prompt_name(label: str) -> str:
    """A class label as words (``parking_lot`` -> ``parking lot``)."""
    return label.replace("_", " ").strip()
