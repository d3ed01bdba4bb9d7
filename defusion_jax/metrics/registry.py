"""Metric registry: names, directions, colour handling, variants and the named metric sets."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from . import gradient, information, perceptual, statistics, structural


@dataclass(frozen=True)
class Metric:
    name: str
    fn: Callable
    higher_is_better: bool | None  # None: no preferred direction
    kind: str = "fusion"  # fusion: fn(a, b, f) per colour plane; gray: always on grey; gt: fn(f, gt) on RGB [0,1]; noref: F only
    variants: tuple[str, ...] = ("default",)
    per_channel_stack: Callable | None = None  # VIFB quirk: metric of the stacked channels instead of their mean
    aliases: tuple[str, ...] = field(default=())

    @property
    def convention(self) -> str:
        """The one-line source convention (first docstring line of the implementing function)."""
        return (self.fn.__doc__ or "").strip().splitlines()[0]

    @property
    def arrow(self) -> str:
        return {True: "↑", False: "↓", None: ""}[self.higher_is_better]


def _ssim_gt(f, gt):
    """SSIM vs ground truth: scikit-image-style 7x7 uniform SSIM on RGB [0,1], mean over channels (DeFusion++ `calculate_ssim`)."""
    import numpy as np

    if f.ndim == 2:
        f = np.repeat(f[..., None], 3, axis=2)
    if gt.ndim == 2:
        gt = np.repeat(gt[..., None], 3, axis=2)
    return float(np.mean([structural.ssim_uniform7(f[..., c], gt[..., c], 1.0) for c in range(3)]))


def _clipiqa(f):
    """CLIPIQA: CLIP-IQA (pyiqa convention: OpenAI CLIP RN50, three antonym prompt pairs, no resize); needs user-supplied weights."""
    from .clipiqa import ABSENT

    raise RuntimeError(ABSENT)


def _sf_vifb(a, b, f):
    """VIFB `metricsSpatial_frequency`: sqrt(RF+CF), squared differences summed over H*W; RGB as channels side by side."""
    return gradient.spatial_frequency_vifb(f)


def _sf_vifb_stack(planes):
    import numpy as np

    # MATLAB `[m,n]=size(F)` on an RGB array folds the channels into columns: R|G|B side by side.
    return gradient.spatial_frequency_vifb(np.concatenate([p[2] for p in planes], axis=1))


def _variance_vifb(a, b, f):
    """VIFB `metricsVariance`: population standard deviation of F (named 'Variance' by VIFB)."""
    return statistics.standard_deviation(a, b, f)


METRICS: dict[str, Metric] = {}


def _add(m: Metric):
    METRICS[m.name] = m


# Paper (DeFusion++) metrics.
_add(Metric("Nabf", gradient.nabf, False, variants=("default", "petrovic")))
_add(Metric("SSIM", structural.ssim_sources, True, variants=("default", "mean", "skimage")))
_add(Metric("CC", statistics.correlation_coefficient, True))
_add(Metric("NCIE", information.ncie, True))
_add(Metric("MEF_SSIM", structural.mef_ssim_metric, True, kind="gray", variants=("default", "single")))
_add(Metric("PSNR", statistics.psnr_sources, True, variants=("default", "mean", "tang", "cddfuse")))
_add(Metric("PSNR_gt", statistics.psnr_gt, True, kind="gt"))
_add(Metric("SSIM_gt", _ssim_gt, True, kind="gt"))
_add(Metric("CLIPIQA", _clipiqa, True, kind="noref"))
# Common IVF set (Tang's toolbox / CDDFuse).
_add(Metric("EN", information.entropy, True))
_add(Metric("SD", statistics.standard_deviation, True, variants=("default", "tang2022")))
_add(Metric("SF", gradient.spatial_frequency, True, variants=("default", "tang2022")))
_add(Metric("AG", gradient.average_gradient, True))
_add(Metric("MI", information.mutual_information, True, variants=("default", "tang")))
_add(Metric("SCD", statistics.scd, True))
_add(Metric("VIF", structural.vif, True, variants=("default", "tang2022")))
_add(Metric("Qabf", gradient.qabf, True, variants=("default", "tang2022")))
_add(Metric("MSE", statistics.mse, False))
# VIFB's 13, under VIFB's own names (Qabf is shared: VIFB's code is Hong's Qabf on [0,255]).
_add(Metric("Avg_gradient", gradient.average_gradient, True))
_add(Metric("Cross_entropy", information.cross_entropy, False))
_add(Metric("Edge_intensity", gradient.edge_intensity, True))
_add(Metric("Entropy", information.entropy, True))
_add(Metric("Mutinf", information.mutinf_vifb, True))
_add(Metric("Psnr", statistics.psnr_vifb, True))
_add(Metric("Qcb", perceptual.qcb, True))
_add(Metric("Qcv", perceptual.qcv, False))
_add(Metric("Rmse", statistics.rmse_vifb, False))
_add(Metric("Spatial_frequency", _sf_vifb, True, per_channel_stack=_sf_vifb_stack))
_add(Metric("Ssim", structural.ssim_sources, True))
_add(Metric("Variance", _variance_vifb, True))

VIFB_SET = ["Avg_gradient", "Cross_entropy", "Edge_intensity", "Entropy", "Mutinf", "Psnr", "Qabf", "Qcb",
            "Qcv", "Rmse", "Spatial_frequency", "Ssim", "Variance"]
IVF_SET = ["EN", "SD", "SF", "AG", "MI", "SCD", "VIF", "Qabf", "CC", "PSNR", "MSE"]
# The metrics of the paper's tables, per task (Tables 1-3). MFF no-reference SSIM is a mean (values <= 1).
PAPER_SETS = {
    "ivf": ["Nabf", "SSIM", "CC", "CLIPIQA"],
    "mef": ["NCIE", "Nabf", "SSIM", "CC", "MEF_SSIM"],
    "mff": ["PSNR", "SSIM:mean", "PSNR_gt", "SSIM_gt"],
}
# Tang's Metric_TNO.xlsx was produced by the 2022 toolbox; these variants reproduce it exactly.
TANG2022_SET = ["EN", "SD:tang2022", "SF:tang2022", "AG", "MI:tang", "SCD", "VIF:tang2022", "Qabf:tang2022",
                "CC", "PSNR:tang", "MSE"]
SETS = {"vifb": VIFB_SET, "ivf": IVF_SET, "tang2022": TANG2022_SET}
SET_NAMES = ("paper", *SETS, "all")  # what `resolve` expands


def parse_metric(spec: str) -> tuple[Metric, str]:
    """'NAME' or 'NAME:variant' -> (Metric, variant); raises ValueError with the valid choices."""
    name, _, variant = spec.partition(":")
    variant = variant or "default"
    if name not in METRICS:
        if name in SET_NAMES:
            raise ValueError(f"{name!r} is a set of metrics: expand it first with resolve([{name!r}], task)")
        raise ValueError(f"unknown metric {name!r}; known: {', '.join(METRICS)}, and the sets "
                         f"{', '.join(SET_NAMES)} (evaluate --metrics)")
    m = METRICS[name]
    if variant not in m.variants:
        raise ValueError(f"metric {name} has no variant {variant!r}; variants: {', '.join(m.variants)}")
    return m, variant


def resolve(specs: list[str], task: str) -> list[str]:
    """Expand set names (paper, vifb, ivf, tang2022, all) into metric specs, keeping order and dropping repeats."""
    out: list[str] = []
    for spec in specs:
        spec = spec.strip()
        if not spec:
            continue
        if spec == "paper":
            items = PAPER_SETS[task]
        elif spec == "all":
            items = [n for n in METRICS]
        elif spec in SETS:
            items = SETS[spec]
        else:
            parse_metric(spec)
            items = [spec]
        for it in items:
            if it not in out:
                out.append(it)
    return out
