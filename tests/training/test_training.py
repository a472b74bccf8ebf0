"""hqrs-geo finetune: real open_clip training of tiny configs on a small image-caption set."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hqrs_geo.errors import Cancelled, InputError, OptionError
from hqrs_geo.training import FinetuneConfig, finetune
from hqrs_geo.training.data import CaptionSampler, read_csv, read_records
from hqrs_geo.training.trainer import latest_checkpoint, lr_factor
from conftest import run_cli
from tiny_models import TINY_CLIP, TINY_COCA

CLASSES = {"water": "a lake of calm blue water", "forest": "a dense green forest", "sand": "a bright sandy beach"}
COLOURS = {"water": (30, 60, 160), "forest": (20, 120, 30), "sand": (220, 200, 140)}


def _write_dataset(folder: Path, per_class: int = 8) -> Path:
    """Three visually distinct classes (colour + texture), Karpathy JSON with train/val splits."""
    rng = np.random.default_rng(0)
    images = []
    for name, colour in COLOURS.items():
        for i in range(per_class):
            pixels = np.clip(np.array(colour) + rng.normal(0, 25, (80, 80, 3)), 0, 255).astype(np.uint8)
            path = folder / "images" / f"{name}{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path)
            images.append({"filename": f"images/{name}{i}.png", "class": name,
                           "split": "val" if i >= per_class - 2 else "train",
                           "sentences": [{"raw": CLASSES[name] + "."}, {"raw": f"there is {CLASSES[name]}."}]})
    dataset = folder / "dataset.json"
    dataset.write_text(json.dumps({"images": images}))
    return dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return _write_dataset(tmp_path_factory.mktemp("captions"))


def _fixed_batch_loss(model, tokenizer, dataset: Path) -> float:
    """Contrastive loss of a fixed, un-augmented batch (train split, first caption)."""
    import torch
    from open_clip.loss import ClipLoss

    from hqrs_geo.models.preprocess import preprocess_config as _preprocess_cfg
    from hqrs_geo.models.preprocess import BatchPreprocess

    records = read_records(str(dataset), ["train"])
    prep = BatchPreprocess(_preprocess_cfg(model), "cpu")
    pixels = torch.stack([torch.from_numpy(np.array(Image.open(r.image).convert("RGB"))).permute(2, 0, 1)
                          for r in records])
    with torch.no_grad():
        image = model.encode_image(prep(pixels), normalize=True)
        text = model.encode_text(tokenizer([r.captions[0] for r in records]), normalize=True)
        return float(ClipLoss()(image, text, model.logit_scale.exp()))


def _config(dataset: Path, output: Path, **kw) -> FinetuneConfig:
    values = dict(dataset=str(dataset), output=str(output), arch=TINY_CLIP, batch_size=8, lr=2e-3,
                  warmup_steps=2, epochs=6, save_every=4, seed=3, device="cpu", precision="fp32")
    values.update(kw)
    return FinetuneConfig(**values)


def test_clip_training_lowers_loss_and_writes_a_loadable_checkpoint(dataset, tmp_path, model_environment):
    import torch

    from hqrs_geo.models.loader import load_model
    from hqrs_geo.training.trainer import build_model

    config = _config(dataset, tmp_path / "run")
    torch.manual_seed(config.seed)
    initial, tokenizer, *_ = build_model(config, torch.device("cpu"))
    before = _fixed_batch_loss(initial.eval(), tokenizer, dataset)

    record = finetune(config)
    assert record["steps"] == 6 * (18 // 8) and record["kind"] == "clip"
    loaded = load_model(TINY_CLIP, checkpoint=str(tmp_path / "run" / "model.safetensors"), device="cpu")
    after = _fixed_batch_loss(loaded.model, loaded.tokenizer, dataset)
    assert after < 0.8 * before, (before, after)
    # validation ran every epoch and model selection kept the best weights
    vals = [h for h in record["history"] if "val" in h]
    assert len(vals) == 6 and {"mR", "zs_top1"} <= set(vals[-1]["val"])
    assert (tmp_path / "run" / "best.safetensors").is_file()
    assert record["weights"]["sha256"] == loaded.sha256


def test_resume_after_cancel_continues_from_the_saved_step_and_matches(dataset, tmp_path, model_environment):
    from safetensors.torch import load_file

    straight = finetune(_config(dataset, tmp_path / "straight", max_steps=8, val_split=None))
    assert straight["steps"] == 8

    calls = {"n": 0}

    def cancel_after_five() -> bool:
        calls["n"] += 1
        return calls["n"] > 5

    with pytest.raises(Cancelled, match="step 5.*resume"):
        finetune(_config(dataset, tmp_path / "cut", max_steps=8, val_split=None), cancel=cancel_after_five)
    assert latest_checkpoint(tmp_path / "cut").name == "step-0000005.pt"
    assert not (tmp_path / "cut" / "model.safetensors").exists()

    with pytest.raises(OptionError, match="resume"):
        finetune(_config(dataset, tmp_path / "cut", max_steps=8, val_split=None))
    resumed = finetune(_config(dataset, tmp_path / "cut", max_steps=8, val_split=None), resume=True)
    assert resumed["steps"] == 8
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst < 1e-5, worst  # same batches, same augmentations, same optimiser state


def test_coca_training_has_both_losses_and_captions_after_loading(dataset, tmp_path, model_environment):
    from hqrs_geo.models.decoding import DecodingConfig, generate_captions
    from hqrs_geo.models.loader import load_model

    record = finetune(_config(dataset, tmp_path / "coca", arch=TINY_COCA, epochs=2, save_dtype="fp16"))
    assert record["kind"] == "coca"
    loaded = load_model(TINY_COCA, checkpoint=str(tmp_path / "coca" / "model.safetensors"), device="cpu")
    import torch

    captions = generate_captions(loaded.model, loaded.tokenizer, torch.zeros(2, 3, 64, 64),
                                 DecodingConfig(method="greedy", max_length=8))
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)

    # a CoCa is selected on its validation captioning loss: the best step has the lowest one
    checks = [h for h in record["history"] if "val" in h]
    assert all("caption_loss" in h["val"] for h in checks)
    assert record["best"]["step"] == min(checks, key=lambda h: h["val"]["caption_loss"])["step"]
    # ... which is open_clip's CoCaLoss caption term on the val pairs (one batch: a plain token mean)
    from open_clip.loss import CoCaLoss

    from hqrs_geo.models.preprocess import BatchPreprocess
    from hqrs_geo.training.data import load_caption_set
    from hqrs_geo.training.trainer import validate

    val = load_caption_set(str(dataset), ["val"], 64)
    owners = [i for i, r in enumerate(val.records) for _ in r.captions]
    texts = [c for r in val.records for c in r.captions]
    model = loaded.model
    model.output_dict = True
    with torch.no_grad():
        out = model(BatchPreprocess(loaded.preprocess, "cpu")(torch.stack([val.pixels[i] for i in owners])),
                    loaded.tokenizer(texts))
        _, expected = CoCaLoss(caption_loss_weight=1.0, clip_loss_weight=0)(
            out["image_features"], out["text_features"], out["logits"], out["labels"], out["logit_scale"])
    got = validate(model, loaded.tokenizer, val, loaded.preprocess, "cpu")["caption_loss"]
    assert got == pytest.approx(float(expected), rel=1e-4)


def test_warm_start_copies_matching_tensors(dataset, tmp_path, model_environment, tiny_clip_checkpoint):
    from safetensors.torch import load_file

    from hqrs_geo.models.checkpoints import read_state_dict

    record = finetune(_config(dataset, tmp_path / "warm", init_from=str(tiny_clip_checkpoint), max_steps=1,
                              lr=1e-12, warmup_steps=1, val_split=None))
    assert record["source"]["init_from"]["tensors"].split("/")[0] == record["source"]["init_from"]["tensors"].split("/")[1]
    start = read_state_dict(Path(tiny_clip_checkpoint))
    after = load_file(str(tmp_path / "warm" / "model.safetensors"))
    key = "visual.conv1.weight"
    assert np.allclose(start[key].numpy(), after[key].numpy(), atol=1e-6)


def test_csv_datasets_and_caption_sampling(tmp_path):
    import random

    (tmp_path / "a.png").write_bytes(b"")
    tsv = tmp_path / "train.tsv"
    tsv.write_text("filepath\tcaption\tclass\na.png\tfirst caption\tfarm\na.png\tsecond caption\tfarm\n")
    records = read_csv(str(tsv))
    assert len(records) == 1 and records[0].captions == ["first caption", "second caption"]
    assert records[0].image == str(tmp_path / "a.png") and records[0].label == "farm"
    comma = tmp_path / "train.csv"
    comma.write_text("path,text\nb.png,a caption\n")
    assert read_csv(str(comma), image_key="path", caption_key="text")[0].captions == ["a caption"]
    with pytest.raises(InputError, match="no column 'filepath'.*csv_img_key"):
        read_csv(str(comma))
    with pytest.raises(InputError, match="unknown dataset format"):
        read_records(str(tmp_path / "a.png"))

    from hqrs_geo.training.data import CaptionSet

    data = CaptionSet(records, "x")
    rng = random.Random(0)
    always = CaptionSampler(data, class_prompt_prob=1.0)
    assert all("farm" in always.caption(0, rng) for _ in range(20))
    never = CaptionSampler(data, class_prompt_prob=0.0)
    assert {never.caption(0, rng) for _ in range(50)} == {"first caption", "second caption"}


def test_class_aware_loss_is_clip_loss_without_classes_and_matches_a_hand_computation():
    import torch
    from open_clip.loss import ClipLoss

    from hqrs_geo.training.losses import class_aware_clip_loss, contrastive_targets

    generator = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(6, 16, generator=generator), dim=1)
    texts = torch.nn.functional.normalize(torch.randn(6, 16, generator=generator), dim=1)
    scale = torch.tensor(20.0)
    labels = torch.tensor([0, 1, 2, 0, -1, 0])  # three images of class 0, one unlabelled
    reference = float(ClipLoss()(images, texts, scale))
    assert float(class_aware_clip_loss(images, texts, scale, labels, 0.0)) == pytest.approx(reference, rel=1e-6)
    assert float(class_aware_clip_loss(images, texts, scale, torch.full((6,), -1), 0.5)) == \
        pytest.approx(reference, rel=1e-6)

    targets = contrastive_targets(labels, 0.6)
    assert torch.allclose(targets.sum(1), torch.ones(6))
    assert targets[0, 0] == pytest.approx(0.4 + 0.2) and targets[0, 3] == pytest.approx(0.2)
    assert targets[1, 1] == pytest.approx(1.0) and targets[4, 4] == 1.0 and targets[4, 0] == 0.0
    logits = (scale * images @ texts.T).double()
    t = targets.double()
    by_hand = 0.5 * (-(t * logits.log_softmax(1)).sum(1).mean() - (t * logits.T.log_softmax(1)).sum(1).mean())
    value = float(class_aware_clip_loss(images, texts, scale, labels, 0.6))
    assert value == pytest.approx(float(by_hand), rel=1e-5)
    # with the similarities themselves as inputs (text features = identity), the gradient shows
    # what each loss does to a same-class pair at a uniform start: ClipLoss pushes it apart
    # (+1/36), this loss pulls it together (-1/180: target 0.2 > probability 1/6)
    def push_apart(loss_fn) -> float:
        similarities = torch.zeros(6, 6, requires_grad=True)
        loss_fn(similarities).backward()
        return float(similarities.grad[0, 3])

    plain = push_apart(lambda sim: ClipLoss()(sim, torch.eye(6), torch.tensor(1.0)))
    aware = push_apart(lambda sim: class_aware_clip_loss(sim, torch.eye(6), torch.tensor(1.0), labels, 0.6))
    assert plain == pytest.approx(1 / 36) and aware == pytest.approx(-1 / 180)


def test_lr_schedule_warms_up_then_decays_to_zero():
    assert lr_factor(0, 10, 100) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100) == pytest.approx(0.5)
    assert lr_factor(100, 10, 100) == pytest.approx(0.0)


def test_finetune_cli_trains_and_refuses_bad_input(dataset, tmp_path, model_environment):
    out = tmp_path / "cli"
    done = run_cli("finetune", str(dataset), "-o", str(out), "--arch", TINY_CLIP, "--max-steps", "2",
                   "--batch-size", "8", "--device", "cpu", "--progress", "json", "--class-target", "0.5")
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert events[-1]["stage"] == "done" and any(e["stage"] == "train" for e in events)
    record = json.loads((out / "train.json").read_text())
    assert (out / "model.safetensors").is_file() and record["steps"] == 2
    losses = [h["train_loss"] for h in record["history"] if "train_loss" in h]
    assert record["config"]["class_target"] == 0.5 and np.isfinite(losses[-1])

    missing = run_cli("finetune", str(dataset), "-o", str(tmp_path / "x"))
    assert missing.returncode == 2 and "--arch" in missing.stderr and "Traceback" not in missing.stderr
    again = run_cli("finetune", str(dataset), "-o", str(out), "--arch", TINY_CLIP, "--max-steps", "2")
    assert again.returncode == 2 and "--resume" in again.stderr
    bad = run_cli("finetune", str(dataset), "-o", str(tmp_path / "z"), "--arch", TINY_CLIP, "--class-target", "1")
    assert bad.returncode == 2 and "--class-target" in bad.stderr and "Traceback" not in bad.stderr
    absent = run_cli("finetune", str(tmp_path / "nope.json"), "-o", str(tmp_path / "y"), "--arch", TINY_CLIP)
    assert absent.returncode == 2 and "nope.json" in absent.stderr and len(absent.stderr.strip().splitlines()) == 1


def test_colour_cast_and_coarsening_are_off_by_default_and_do_what_they_say():
    import torch

    from hqrs_geo.training.augment import AugmentConfig, augment_batch

    rng = np.random.default_rng(0)
    images = [torch.from_numpy(rng.integers(0, 256, (3, 80, 80), dtype=np.uint8)) for _ in range(16)]
    plain = AugmentConfig(dihedral=False, jitter=0.0, min_scale=1.0)

    def batch(config, seed=7):
        return augment_batch(images, 64, torch.Generator().manual_seed(seed), config)

    # off: the same draws as before the options existed (earlier training runs reproduce)
    generator = torch.Generator().manual_seed(3)
    augment_batch(images, 64, generator, AugmentConfig())
    reference = torch.Generator().manual_seed(3)
    torch.rand((16, 7), generator=reference)
    assert torch.equal(generator.get_state(), reference.get_state())
    # coarsening: some images lose their finest detail (neighbour differences shrink), none gains any
    base, coarse = batch(plain), batch(AugmentConfig(dihedral=False, jitter=0.0, min_scale=1.0, coarsen=4.0))
    detail = [float((x[..., 1:] - x[..., :-1]).abs().mean()) for x in base]
    detail_coarse = [float((x[..., 1:] - x[..., :-1]).abs().mean()) for x in coarse]
    assert sum(c < 0.8 * d for c, d in zip(detail_coarse, detail)) >= 3
    assert all(c <= d * 1.01 for c, d in zip(detail_coarse, detail))
    # colour cast: band gains differ per image, within [1 - C, 1 + C]
    cast = batch(AugmentConfig(dihedral=False, jitter=0.0, min_scale=1.0, colour=0.2))
    unclamped = (base > 0) & (base < 200)
    gains = [(c[u] / b[u]).view(-1) for c, b, u in zip(cast, base, unclamped)]
    band_gains = torch.stack([torch.stack([(cast[i][k][unclamped[i][k]] / base[i][k][unclamped[i][k]]).median()
                                           for k in range(3)]) for i in range(16)])
    assert gains and float(band_gains.min()) >= 0.79 and float(band_gains.max()) <= 1.21
    assert float((band_gains[:, 0] - band_gains[:, 1]).abs().max()) > 0.05  # not one gain for all bands
