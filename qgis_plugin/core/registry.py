"""The engine's model registry as data (GENERATED from ``hqrs_geo.models.registry``; do not
edit: regenerate with ``python -m qgis_plugin.tools.generate_registry``; the tests check it is current).

The shipped demo models come first in each list: they are the defaults and need no download.
"""

from __future__ import annotations

# name -> (kind, open_clip architecture, description, shipped with the engine)
MODELS: dict[str, tuple[str, str, str, bool]] = {
    'hqrs-mini-clip': (
        'clip', 'hqrs-mini-clip',
        'hqrs-mini CLIP (ResNet 128 px): small DEMO model trained by hqrs_geo on UC Merced captions and '
        'AID and EuroSAT scene classes (42 classes, 0.3-10 m aerial/satellite RGB); ships with the '
        'package, no download; not HQRS-CLIP/RS-CoCa',
        True,
    ),
    'hqrs-clip': (
        'clip', 'ViT-B-32',
        'HQRS-CLIP (MpGI): OpenAI-initialised CLIP fine-tuned on HQRS-IT-2.1M high-quality captions',
        False,
    ),
    'openai-vit-b-32': (
        'clip', 'ViT-B-32',
        'OpenAI CLIP ViT-B/32 (baseline)',
        False,
    ),
    'openai-vit-l-14': (
        'clip', 'ViT-L-14',
        'OpenAI CLIP ViT-L/14 (baseline)',
        False,
    ),
    'remoteclip-rn50': (
        'clip', 'RN50',
        'RemoteCLIP RN50 (Liu et al., 2024)',
        False,
    ),
    'remoteclip-vit-b-32': (
        'clip', 'ViT-B-32',
        'RemoteCLIP ViT-B-32 (Liu et al., 2024)',
        False,
    ),
    'remoteclip-vit-l-14': (
        'clip', 'ViT-L-14',
        'RemoteCLIP ViT-L-14 (Liu et al., 2024)',
        False,
    ),
    'georsclip-vit-b-32': (
        'clip', 'ViT-B-32',
        'GeoRSCLIP ViT-B-32 trained on RS5M (Zhang et al., 2024)',
        False,
    ),
    'georsclip-vit-l-14': (
        'clip', 'ViT-L-14',
        'GeoRSCLIP ViT-L-14 trained on RS5M (Zhang et al., 2024)',
        False,
    ),
    'georsclip-vit-h-14': (
        'clip', 'ViT-H-14',
        'GeoRSCLIP ViT-H-14 trained on RS5M (Zhang et al., 2024)',
        False,
    ),
    'skyclip-vit-b-32': (
        'clip', 'ViT-B-32',
        'SkyCLIP ViT-B-32 trained on SkyScript (Wang et al., 2024)',
        False,
    ),
    'skyclip-vit-l-14': (
        'clip', 'ViT-L-14',
        'SkyCLIP ViT-L-14 trained on SkyScript (Wang et al., 2024)',
        False,
    ),
    'hqrs-mini-coca': (
        'coca', 'hqrs-mini-coca',
        'hqrs-mini CoCa (ViT 96 px): small DEMO model trained by hqrs_geo on UC Merced captions and AID '
        'scene classes (40 classes, 0.3-8 m aerial/satellite RGB); ships with the package, no download; '
        'not HQRS-CLIP/RS-CoCa',
        True,
    ),
    'rs-coca': (
        'coca', 'coca_ViT-L-14',
        'RS-CoCa (MpGI): CoCa fine-tuned on HQRS-IT-2.1M for remote-sensing captioning',
        False,
    ),
}

CLIP_MODELS: tuple[str, ...] = (
    'hqrs-mini-clip',
    'hqrs-clip',
    'openai-vit-b-32',
    'openai-vit-l-14',
    'remoteclip-rn50',
    'remoteclip-vit-b-32',
    'remoteclip-vit-l-14',
    'georsclip-vit-b-32',
    'georsclip-vit-l-14',
    'georsclip-vit-h-14',
    'skyclip-vit-b-32',
    'skyclip-vit-l-14',
)
COCA_MODELS: tuple[str, ...] = (
    'hqrs-mini-coca',
    'rs-coca',
)
DEFAULT_CLIP = CLIP_MODELS[0]
DEFAULT_COCA = COCA_MODELS[0]
