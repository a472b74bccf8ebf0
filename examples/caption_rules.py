"""Class-to-caption rules for the hqrs-mini training set: the one place that turns a scene
class label into training sentences (RemoteCLIP-style "label to text" with varied templates,
class synonyms and several phrasings per image).

* :data:`CONCEPTS`: each concept (the unified training class) has ``names`` (synonyms as noun
  phrases, article included where English needs one) and ``details`` (short descriptive
  sentences of what such a scene usually shows, in the plain style of UCM-captions).
* :data:`DATASET_CLASSES`: the class folder names of each source data set -> concept. Classes
  of different sets that mean the same thing share a concept, so the class-aware contrastive
  loss (``--class-target``) treats them as one class.
* :data:`TEMPLATES`: sentence frames for a name (the zero-shot prompt ensemble's frames among
  them, as in RemoteCLIP's prompt training).
* :func:`rule_captions`: ``n`` distinct captions for one image, drawn with a seeded RNG.

The synonym lists were written from the training sets' own class names and the words analysts
type (buildings, roads, parking, port, fields...); the held-out evaluation set (SIRI-WHU,
``docs/training-data.md``) was not used to write or tune them.
"""
from __future__ import annotations

import random
from collections.abc import Sequence

# frames for one class name; "{}" is a noun phrase from CONCEPTS[...]["names"]
TEMPLATES = (
    "a satellite image of {}.",
    "an aerial photograph of {}.",
    "a remote sensing image of {}.",
    "an aerial view of {}.",
    "{} seen from above.",
    "an aerial image of {}.",
    "a top-down view of {}.",
    "an overhead image showing {}.",
    "a high-resolution aerial image of {}.",
    "a bird's-eye view of {}.",
    "this image shows {}.",
    "the picture shows {} from above.",
    "{} in a satellite image.",
    "{}.",
)

# frames of the captioner's training text (plain statements, like UCM-captions); the first
# set for names with an article ("a bridge"), the second for plural and mass nouns ("fields")
CAPTION_TEMPLATES = (
    "there is {}.",
    "this is {}.",
    "it is {}.",
    "here is {}.",
    "{} is shown in this image.",
    "{}.",
)
CAPTION_TEMPLATES_PLURAL = (
    "{}.",
    "{} seen from above.",
    "an image of {}.",
    "the image shows {}.",
    "there are {} in this image.",
)

# frames that join a name and a detail sentence into one caption
COMBINED = (
    "{name_cap} seen from above. {detail_cap}",
    "an aerial image of {name}. {detail_cap}",
    "{detail_cap} This is {name}.",
)

CONCEPTS: dict[str, dict[str, Sequence[str]]] = {
    "airplane": {
        "names": ("an airplane", "airplanes", "a plane", "planes", "aircraft", "an airliner",
                  "airplanes parked at an airport"),
        "details": ("an airplane is parked on the apron.", "several planes stand next to each other.",
                    "a white airplane is on the concrete ground.", "there are airplanes near the terminal."),
    },
    "airport": {
        "names": ("an airport", "an airfield", "an airport with runways", "an airport terminal", "airport buildings"),
        "details": ("planes are parked beside the terminal building.", "long runways and taxiways cross the airport.",
                    "several airplanes stand on the apron.", "the airport has a large terminal and wide paved areas."),
    },
    "runway": {
        "names": ("a runway", "an airport runway", "a landing strip", "an airstrip", "runways"),
        "details": ("a long straight runway with white markings.", "the runway is surrounded by grass.",
                    "there are white lines painted on the runway."),
    },
    "bare land": {
        "names": ("bare land", "bare soil", "barren land", "vacant land", "an empty lot", "wasteland",
                  "cleared land", "an area of bare ground"),
        "details": ("the ground is bare with almost no vegetation.", "brown soil covers most of the area.",
                    "some dirt tracks cross the empty land.", "a few scattered plants grow on the bare ground."),
    },
    "baseball field": {
        "names": ("a baseball field", "a baseball diamond", "baseball fields", "a ballpark", "a sports field"),
        "details": ("the diamond-shaped infield is surrounded by green grass.",
                    "a baseball field is next to some trees.", "there are several baseball fields side by side."),
    },
    "beach": {
        "names": ("a beach", "a sandy beach", "a coastline", "the seashore", "a beach by the sea", "a coast"),
        "details": ("white waves wash onto the sand.", "the blue sea meets a strip of yellow sand.",
                    "the beach lies between the ocean and the land.", "some people are on the sandy beach."),
    },
    "bridge": {
        "names": ("a bridge", "a bridge over a river", "a bridge across the water", "a road bridge", "bridges"),
        "details": ("a bridge crosses the river.", "cars drive on a bridge over the water.",
                    "the bridge connects the two banks of the river.", "a long bridge spans the wide water."),
    },
    "buildings": {
        "names": ("buildings", "large buildings", "a group of buildings", "office buildings", "rooftops",
                  "an urban area with buildings", "many buildings"),
        "details": ("many buildings are arranged densely.", "some buildings with grey roofs stand by the road.",
                    "large buildings are surrounded by roads and parking lots.",
                    "there are many buildings and some green trees."),
    },
    "city centre": {
        "names": ("a city center", "a city centre", "a downtown area", "an urban center", "the centre of a town",
                  "a civic center"),
        "details": ("a large public building stands in the middle of the city.",
                    "many buildings surround a central plaza.", "wide roads lead to the buildings in the center."),
    },
    "church": {
        "names": ("a church", "a cathedral", "a church building", "a church in a town"),
        "details": ("a church with a cross-shaped roof is surrounded by buildings.",
                    "the church stands next to a square.", "a large church is in the middle of the houses."),
    },
    "commercial area": {
        "names": ("a commercial area", "a commercial district", "shops and office buildings", "a business district",
                  "commercial buildings", "a shopping area"),
        "details": ("many commercial buildings line the roads.", "cars are parked in front of the shops.",
                    "large flat-roofed buildings are next to the streets."),
    },
    "dense residential": {
        "names": ("a dense residential area", "densely packed houses", "a crowded neighborhood", "dense housing",
                  "many closely spaced houses", "a residential area with many houses", "residential buildings"),
        "details": ("lots of houses are arranged closely.", "many houses with red roofs are packed together.",
                    "narrow streets run between the dense houses.", "there are many houses and a few trees."),
    },
    "medium residential": {
        "names": ("a medium residential area", "a residential area", "houses", "a neighborhood", "a suburb",
                  "houses with gardens", "a housing estate"),
        "details": ("houses are arranged neatly along the roads.", "some trees grow between the houses.",
                    "many houses with grey roofs line both sides of the street.",
                    "the neighborhood has houses, lawns and trees."),
    },
    "sparse residential": {
        "names": ("a sparse residential area", "scattered houses", "detached houses with large yards",
                  "a few houses among trees", "rural houses", "villas"),
        "details": ("several houses are scattered among green trees.", "a few houses stand next to large lawns.",
                    "a villa is surrounded by trees and grass.", "some houses are far from each other."),
    },
    "mobile home park": {
        "names": ("a mobile home park", "mobile homes", "a trailer park", "rows of trailers", "a caravan park"),
        "details": ("many mobile homes are arranged in rows.", "mobile homes are parked closely with some trees.",
                    "lots of trailers stand side by side."),
    },
    "desert": {
        "names": ("a desert", "sand dunes", "an arid desert", "a sandy desert", "dry desert land"),
        "details": ("yellow sand covers the whole area.", "wavy dunes stretch across the desert.",
                    "there is no vegetation in the desert."),
    },
    "farmland": {
        "names": ("farmland", "fields", "crop fields", "cropland", "agricultural land", "farm fields",
                  "an agricultural area", "cultivated fields", "a field"),
        "details": ("the fields are divided into neat rectangles.", "green and brown fields lie side by side.",
                    "crops grow in long straight rows.", "several pieces of farmland are next to each other."),
    },
    "chaparral": {
        "names": ("chaparral", "shrubland", "scrubland", "bushes on dry land", "sparse shrubs", "scrub"),
        "details": ("small bushes are scattered on the dry ground.", "the land is covered with shrubs and bare soil.",
                    "green shrubs grow on brown land."),
    },
    "forest": {
        "names": ("a forest", "dense trees", "woodland", "a dense forest", "many trees", "a wooded area", "trees"),
        "details": ("many green trees grow densely together.", "the forest is dense and dark green.",
                    "lots of trees cover the whole area.", "a few paths cross the dense forest."),
    },
    "freeway": {
        "names": ("a freeway", "a highway", "a motorway", "a road with cars", "a multi-lane road", "roads",
                  "a highway with cars"),
        "details": ("cars drive on the multi-lane road.", "a highway runs through the green land.",
                    "some cars are on the freeway.", "the road is lined with trees on both sides."),
    },
    "golf course": {
        "names": ("a golf course", "golf courses", "a golf club", "fairways and greens"),
        "details": ("green turf and sand bunkers make up the golf course.",
                    "trees line the fairways of the golf course.",
                    "a golf course with a pond and some trees."),
    },
    "harbor": {
        "names": ("a harbor", "a harbour", "a port", "a marina with boats", "docks", "ships at a port",
                  "a seaport", "a marina"),
        "details": ("many boats are docked at the piers.", "ships are moored along the wharf.",
                    "lots of boats are parked in lines in the harbor.", "containers are stacked next to the docks."),
    },
    "industrial area": {
        "names": ("an industrial area", "factories", "an industrial zone", "industry", "factory buildings",
                  "warehouses and factories", "an industrial park"),
        "details": ("large factory buildings with flat roofs.", "several warehouses are next to the roads.",
                    "trucks are parked beside the factories.", "big industrial buildings and storage yards."),
    },
    "intersection": {
        "names": ("an intersection", "a crossroads", "a road junction", "roads crossing", "a street intersection"),
        "details": ("two roads cross each other.", "cars wait at the crossroads.",
                    "the intersection is surrounded by buildings and trees."),
    },
    "meadow": {
        "names": ("a meadow", "grassland", "grass", "a green meadow", "a grassy field", "a pasture", "lawn"),
        "details": ("the land is covered with green grass.", "a large meadow with a few trees.",
                    "grass grows over the whole area.", "there is a piece of green grassland."),
    },
    "orchard": {
        "names": ("an orchard", "orchards", "a vineyard", "vineyards", "a plantation", "fruit trees in rows",
                  "permanent crops", "an olive grove"),
        "details": ("trees are planted in regular rows.", "rows of vines cover the slopes.",
                    "small trees stand in a regular grid.", "the plantation is divided into plots."),
    },
    "lake": {
        "names": ("a lake", "a large lake", "the sea", "open water", "a body of water", "a reservoir", "water",
                  "the coast of a lake"),
        "details": ("dark blue water covers the whole image.", "the water surface is calm and smooth.",
                    "a large area of water with no buildings.", "the shore runs along one side of the water."),
    },
    "mountain": {
        "names": ("mountains", "a mountain", "mountain ridges", "hills", "rugged mountain terrain", "a mountain range"),
        "details": ("the ridges of the mountains cast shadows.", "green mountains with valleys between them.",
                    "rocky slopes cover the area."),
    },
    "overpass": {
        "names": ("an overpass", "a flyover", "roads crossing over each other", "a highway overpass",
                  "an interchange"),
        "details": ("one road goes over another.", "an overpass crosses the highway.",
                    "cars drive on the roads under the overpass."),
    },
    "viaduct": {
        "names": ("a viaduct", "an elevated highway", "a highway interchange", "elevated roads",
                  "an elevated road"),
        "details": ("curved elevated roads cross each other.", "a viaduct carries the road above the ground.",
                    "several ramps connect the elevated roads."),
    },
    "park": {
        "names": ("a park", "a city park", "a public park", "a green park", "a garden", "parkland"),
        "details": ("the park has lawns, trees and footpaths.", "a pond lies in the middle of the park.",
                    "green trees and grass fill the park."),
    },
    "parking lot": {
        "names": ("a parking lot", "parking lots", "a car park", "a parking lot with many cars", "parked cars",
                  "a parking area", "parking"),
        "details": ("many cars are parked in neat rows.", "cars of different colours fill the parking lot.",
                    "the parking lot is next to a large building.", "a few trees grow around the parking lot."),
    },
    "sports ground": {
        "names": ("a playground", "a sports ground", "a running track", "a ground track field", "a sports field",
                  "a football field with a running track"),
        "details": ("a red running track surrounds a green football field.",
                    "the sports ground is next to some buildings.", "an oval track with a lawn in the middle."),
    },
    "pond": {
        "names": ("a pond", "ponds", "fish ponds", "a small lake", "a body of water", "a lake"),
        "details": ("the pond is surrounded by green land.", "several ponds are next to each other.",
                    "calm water fills the pond."),
    },
    "railway station": {
        "names": ("a railway station", "a train station", "railway tracks", "a railway with trains",
                  "rail tracks and platforms", "a railway"),
        "details": ("many parallel tracks lead into the station.", "trains stand next to the platforms.",
                    "a long station roof covers the platforms."),
    },
    "resort": {
        "names": ("a resort", "a holiday resort", "a resort with swimming pools", "hotels with pools", "a hotel"),
        "details": ("swimming pools are surrounded by villas and trees.", "the resort lies near green trees.",
                    "several buildings with pools and lawns."),
    },
    "river": {
        "names": ("a river", "a river with green banks", "a winding river", "a waterway", "a stream", "water",
                  "a river through the land"),
        "details": ("a river flows through the green land.", "trees grow on both banks of the river.",
                    "the winding river is dark green.", "a river runs across the image."),
    },
    "school": {
        "names": ("a school", "a school campus", "school buildings", "a campus", "a university campus"),
        "details": ("school buildings stand next to a sports ground.",
                    "the campus has several buildings and a playground.",
                    "a school with a running track and some trees."),
    },
    "square": {
        "names": ("a square", "a city square", "a public square", "a plaza", "an open square"),
        "details": ("a large open plaza is surrounded by buildings.", "people walk across the paved square.",
                    "the square has patterned paving and some trees."),
    },
    "stadium": {
        "names": ("a stadium", "a sports stadium", "a football stadium", "an arena"),
        "details": ("a large stadium with stands around the field.", "the stadium is surrounded by parking lots.",
                    "an oval stadium with a green pitch."),
    },
    "storage tanks": {
        "names": ("storage tanks", "oil tanks", "round storage tanks", "an oil depot", "fuel tanks", "tanks"),
        "details": ("several round white tanks stand close together.", "storage tanks are arranged in rows.",
                    "some large tanks are next to the roads."),
    },
    "tennis court": {
        "names": ("a tennis court", "tennis courts", "a sports court"),
        "details": ("a tennis court is surrounded by trees.", "several tennis courts are side by side.",
                    "the tennis court is next to some houses."),
    },
}

# class folder / label of each source data set -> concept
DATASET_CLASSES: dict[str, dict[str, str]] = {
    "ucm": {  # UC Merced (labels as in dataset_ucm.json)
        "agricultural": "farmland", "airplane": "airplane", "baseballdiamond": "baseball field", "beach": "beach",
        "buildings": "buildings", "chaparral": "chaparral", "denseresidential": "dense residential",
        "forest": "forest", "freeway": "freeway", "golfcourse": "golf course", "harbor": "harbor",
        "intersection": "intersection", "mediumresidential": "medium residential",
        "mobilehomepark": "mobile home park", "overpass": "overpass", "parkinglot": "parking lot", "river": "river",
        "runway": "runway", "sparseresidential": "sparse residential", "storagetanks": "storage tanks",
        "tenniscourt": "tennis court",
    },
    "aid": {  # AID (folder names)
        "Airport": "airport", "BareLand": "bare land", "BaseballField": "baseball field", "Beach": "beach",
        "Bridge": "bridge", "Center": "city centre", "Church": "church", "Commercial": "commercial area",
        "DenseResidential": "dense residential", "Desert": "desert", "Farmland": "farmland", "Forest": "forest",
        "Industrial": "industrial area", "Meadow": "meadow", "MediumResidential": "medium residential",
        "Mountain": "mountain", "Park": "park", "Parking": "parking lot", "Playground": "sports ground",
        "Pond": "pond", "Port": "harbor", "RailwayStation": "railway station", "Resort": "resort", "River": "river",
        "School": "school", "SparseResidential": "sparse residential", "Square": "square", "Stadium": "stadium",
        "StorageTanks": "storage tanks", "Viaduct": "viaduct",
    },
    "eurosat": {  # EuroSAT RGB (Sentinel-2, 10 m, 64 px; folder names)
        "AnnualCrop": "farmland", "Forest": "forest", "HerbaceousVegetation": "meadow", "Highway": "freeway",
        "Industrial": "industrial area", "Pasture": "meadow", "PermanentCrop": "orchard",
        "Residential": "medium residential", "River": "river", "SeaLake": "lake",
    },
}


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def rule_captions(concept: str, rng: random.Random, n: int = 5, extra_names: Sequence[str] = (),
                  style: str = "clip") -> list[str]:
    """``n`` distinct captions for one image of ``concept``: a mix of template + synonym
    sentences, descriptive sentences and both joined. ``extra_names`` (e.g. the source data
    set's own label) join the synonyms. ``style="clip"`` frames names with :data:`TEMPLATES`
    (image-description prompts, for the contrastive model); ``style="caption"`` with
    :data:`CAPTION_TEMPLATES` (plain statements, for the captioner)."""
    def frames(name: str) -> Sequence[str]:
        if style == "clip":
            return TEMPLATES
        return CAPTION_TEMPLATES if name.split()[0] in ("a", "an", "the") else CAPTION_TEMPLATES_PLURAL
    rule = CONCEPTS[concept]
    names = list(rule["names"]) + [x for x in extra_names if x not in rule["names"]]
    details = list(rule["details"])
    out: list[str] = []
    kinds = ["template", "template", "detail", "combined", "template", "detail", "combined", "template"]
    for attempt in range(20 * n):
        if len(out) >= n:
            break
        kind = kinds[attempt % len(kinds)] if attempt < len(kinds) else rng.choice(kinds)
        name = rng.choice(names)
        if kind == "template":
            text = rng.choice(frames(name)).format(name)
        elif kind == "detail":
            text = rng.choice(details)
        else:
            detail = rng.choice(details)
            text = rng.choice(COMBINED).format(name=name, name_cap=_cap(name), detail=detail, detail_cap=_cap(detail))
        text = _cap(text)
        if text not in out:
            out.append(text)
    return out
