"""Prompts: how class names and queries become text for the text encoders.

The one home of every prompt list: the registry's default per-model template, the zero-shot
template ensemble, the class-name synonyms, the default scene vocabulary and the caption
templates that turn class labels into training text. Zero-shot classification (``classify``,
``eval zeroshot``, MpGI's class perspective) and text search read them through
:func:`class_phrases` and :func:`query_phrases`, so a class is worded the same way everywhere.

How a class becomes one text vector (:func:`hqrs_geo.models.encode.class_vectors`): every
phrase of the class (its name, then its synonyms) is put into every template of the ensemble,
each prompt is embedded and normalised, and the mean of all of them is normalised again, as
the CLIP paper's prompt ensembling does. Synonyms that another class of the same label set
also claims are dropped for both, so two classes never share a phrase.
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

#: A model's own template when its registry entry names none.
DEFAULT_TEMPLATE = "a satellite image of {}."

#: Prompt ensemble for zero-shot classification and text search (the model's own template
#: comes first where used). Frames of remote-sensing wording: imagery type, viewpoint, scale.
ZERO_SHOT_TEMPLATES = (
    "a satellite image of {}.",
    "an aerial photograph of {}.",
    "a remote sensing image of {}.",
    "an aerial view of {}.",
    "{} seen from above.",
    "an aerial image of {}.",
    "a top-down view of {}.",
    "a high-resolution aerial image of {}.",
    "an overhead image showing {}.",
    "a bird's-eye view of {}.",
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

#: Class-name synonyms: a class name (lower case, words separated by spaces) -> other phrases for
#: the same scene. Written from the class names of the public scene sets (UC Merced, AID,
#: EuroSAT, NWPU-RESISC45, PatternNet, WHU-RS19, SIRI-WHU, RSSCN7's naming style) and the words
#: analysts type; no entry was chosen by measuring on a held-out set.
CLASS_SYNONYMS: dict[str, tuple[str, ...]] = {
    "agricultural": ("farmland", "crop fields", "cultivated fields"),
    "agriculture": ("farmland", "crop fields", "cultivated fields"),
    "farmland": ("agricultural land", "crop fields", "cultivated fields"),
    "field": ("farmland", "crop fields", "agricultural fields"),
    "annual crop": ("cropland", "crop fields", "arable land"),
    "permanent crop": ("orchards", "vineyards", "plantations"),
    "pasture": ("grazing land", "pasture land"),
    "meadow": ("grassland", "a meadow", "grass"),
    "grass": ("grassland", "lawn", "a meadow"),
    "herbaceous vegetation": ("shrubland", "low vegetation", "natural grassland"),
    "chaparral": ("shrubland", "dry scrub", "bushes on dry land"),
    "forest": ("dense trees", "woodland", "a forest of trees"),
    "airplane": ("airplanes", "aircraft", "planes parked at an airport"),
    "airport": ("an airfield", "airport runways and terminals"),
    "runway": ("an airport runway", "an airstrip"),
    "baseball diamond": ("a baseball field", "a baseball diamond"),
    "baseball field": ("a baseball diamond", "a ballpark"),
    "tennis court": ("tennis courts", "a tennis court"),
    "golf course": ("a golf course", "fairways and greens"),
    "playground": ("a sports ground", "a running track", "a ground track field"),
    "ground track field": ("a running track", "a sports ground"),
    "stadium": ("a sports stadium", "an arena"),
    "beach": ("a sandy beach", "a coastline", "the seashore"),
    "bridge": ("a bridge over water", "a road bridge"),
    "overpass": ("a viaduct", "a highway overpass", "an interchange"),
    "viaduct": ("an overpass", "an elevated road"),
    "freeway": ("a highway", "a motorway"),
    "highway": ("a freeway", "a motorway", "a major road"),
    "intersection": ("a road intersection", "a crossroads"),
    "railway station": ("a train station", "railway tracks and platforms"),
    "railway": ("railway tracks", "a railroad"),
    "parking lot": ("a parking lot with cars", "a car park"),
    "parking": ("a parking lot", "a car park"),
    "buildings": ("many buildings", "an urban area"),
    "dense residential": ("densely packed houses", "a dense residential area"),
    "medium residential": ("a residential area with houses", "a medium-density residential area"),
    "sparse residential": ("scattered houses", "a sparse residential area"),
    "residential": ("a residential area", "houses", "a neighbourhood"),
    "resident": ("a residential area", "houses", "a neighbourhood"),
    "mobile home park": ("a mobile home park", "a trailer park"),
    "commercial": ("a commercial area", "a business district", "shops and office buildings"),
    "commercial area": ("a business district", "shops and office buildings"),
    "center": ("a city centre", "a downtown area"),
    "square": ("a public square", "a plaza"),
    "school": ("a school", "a school campus"),
    "church": ("a church", "a cathedral"),
    "industrial": ("an industrial area", "factories", "industrial buildings"),
    "industry": ("an industrial area", "factories", "industrial buildings"),
    "storage tanks": ("oil storage tanks", "round tanks"),
    "harbor": ("a port", "a harbour with boats", "docks"),
    "harbour": ("a port", "a harbor with boats", "docks"),
    "port": ("a harbor", "docks", "ships at a port"),
    "park": ("a park", "a green park in a city"),
    "resort": ("a resort", "hotels with pools"),
    "river": ("a river", "a stream"),
    "lake": ("a lake", "a body of water"),
    "pond": ("ponds", "fish ponds", "small water bodies"),
    "water": ("open water", "a lake", "a body of water"),
    "sea lake": ("the sea", "a lake", "open water"),
    "river lake": ("a river or lake", "open water"),
    "sea": ("the sea", "the ocean"),
    "idle land": ("bare land", "vacant land", "unused land"),
    "bare land": ("bare soil", "vacant land", "barren land"),
    "desert": ("sand dunes", "a sandy desert"),
    "mountain": ("mountains", "a mountainous area"),
    "island": ("an island", "an island in the sea"),
    "wetland": ("a marsh", "a swamp"),
    "snow": ("snow cover", "snowfield"),
    "cloud": ("clouds", "cloud cover"),
}

#: Default scene vocabulary: the classes :func:`hqrs_geo.models.zeroshot.zero_shot` chooses from
#: when none are given (MpGI's class perspective). One name per scene kind; near-duplicates
#: ("harbor" and "port") are left out so their probability is not split.
SCENE_CLASSES = (
    "farmland", "annual crop", "permanent crop", "pasture", "meadow", "forest", "chaparral",
    "bare land", "desert", "mountain", "beach", "river", "lake", "pond", "sea", "wetland",
    "airport", "runway", "bridge", "overpass", "highway", "intersection", "railway station",
    "parking lot", "dense residential", "medium residential", "sparse residential",
    "mobile home park", "commercial area", "industrial", "storage tanks", "harbor", "park",
    "golf course", "baseball field", "tennis court", "playground", "stadium", "school", "church",
    "square", "resort",
)


def apply_template(text: str, template: str) -> str:
    """Fill ``template`` with ``text`` (a template without ``{}`` leaves the text as it is)."""
    return template.format(text) if "{}" in template else text


def class_prompt_name(label: str) -> str:
    """A class label as words: ``parking_lot`` and ``ParkingLot`` -> ``parking lot``;
    ``river-lake`` -> ``river lake``."""
    words = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", label.strip())
    return " ".join(re.sub(r"[_\-]+", " ", words).split()).lower()


_COMPACT = {key.replace(" ", ""): key for key in CLASS_SYNONYMS}


def synonym_key(label: str) -> str | None:
    """The :data:`CLASS_SYNONYMS` entry of a label (any spelling: ``BareLand``, ``idle_land``,
    ``denseresidential``), or ``None``."""
    name = class_prompt_name(label)
    if name in CLASS_SYNONYMS:
        return name
    return _COMPACT.get(name.replace(" ", ""))


def class_phrases(labels: Sequence[str], synonyms: bool = True) -> list[list[str]]:
    """The phrases of each label: its name as words, then its synonyms (when ``synonyms``),
    without a phrase that another label of ``labels`` names or claims too."""
    names = [class_prompt_name(label) for label in labels]
    lists = []
    for label, name in zip(labels, names):
        key = synonym_key(label) if synonyms else None
        extra = [p for p in CLASS_SYNONYMS.get(key, ()) if p != name] if key else []
        lists.append(list(dict.fromkeys([name, *extra])))
    claims = Counter(p for phrases in lists for p in phrases[1:])
    taken = set(names)
    return [[phrases[0], *(p for p in phrases[1:] if claims[p] == 1 and p not in taken)] for phrases in lists]


def query_phrases(query: str) -> list[str]:
    """The phrases of a search text: the text itself, plus its synonyms when the whole text is a
    class name of :data:`CLASS_SYNONYMS` (``"idle land"`` also searches ``"bare land"``)."""
    return class_phrases([query])[0] if synonym_key(query) else [query.strip()]
