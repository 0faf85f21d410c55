"""bf16 against fp32 for a trained model, through the real evaluate and predict code (issue 9).

For the MoNuSeg validation tiles (``val_ids.txt``) it runs the native evaluation
(``cellseg.evaluation.evaluate_samples``: predict's own path) once per precision and compares per
tile: nucleus count, Dice, AJI and the largest difference of the network's tile probabilities
(kept on the way by ``cellseg.evaluation.TileCache``). For a slide (default
``tests/data/CMU-1-Small-Region.svs``) it runs ``cellseg.predict.predict_slide`` once per
precision and compares the nucleus counts, the Zarr probability maps (uint8 steps of 1/255) and
the label maps (Dice and AJI of bf16 against fp32).

Goals (issue 9): counts within 1 %, Dice and AJI within 0.005 of fp32. On a CPU without native
bf16 (AVX2, most AMD EPYCs) bf16 is emulated and several times slower than fp32; the figures
are the same as on an AMX machine up to kernel-specific rounding.

    python benchmarks/precision_agreement.py                 # default model, 6 tiles + CMU
    python benchmarks/precision_agreement.py --tiles 2 --no-slide   # a quick part
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cellseg.checkpoint import default_model_path, load_bundle  # noqa: E402
from cellseg.data import find_samples, load_sample, read_ids  # noqa: E402
from cellseg.evaluation import TileCache, evaluate_samples  # noqa: E402
from cellseg.inference import Predictor  # noqa: E402
from cellseg.metrics import aji, dice  # noqa: E402
from cellseg.precision import cpu_bf16_flags, resolve_precision  # noqa: E402
from cellseg.predict import PredictOptions, SlideOutputs, predict_slide  # noqa: E402

PRECISIONS = ("fp32", "bf16")
COUNT_GOAL = 0.01  # relative
SCORE_GOAL = 0.005  # absolute, Dice and AJI


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="default: the shipped model")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/monuseg")
    parser.add_argument("--tiles", type=int, default=None, help="only the first N val tiles")
    parser.add_argument("--slide", type=Path, default=ROOT / "tests/data/CMU-1-Small-Region.svs")
    parser.add_argument("--no-slide", action="store_true")
    parser.add_argument("--no-tiles", action="store_true")
    parser.add_argument(
        "--roi", default=None, help="x,y,w,h: only this level-0 rectangle of the slide"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    return parser.parse_args(argv)


def relative(a: float, b: float) -> float:
    return (b - a) / a if a else float("inf") if b else 0.0


def tiles_agreement(bundle, samples, device: str) -> dict:
    """Per-tile figures of both precisions from the real evaluation code (predict's path)."""
    results, caches, seconds = {}, {}, {}
    for name in PRECISIONS:
        predictor = Predictor(bundle, device=device, precision=name)
        assert predictor.precision == name
        # One cache per image keeps the network tiles of each image (no second pass).
        caches[name] = [TileCache(predictor) for _ in samples]
        start = time.perf_counter()
        results[name] = [
            evaluate_samples(cache, [sample], "native")["per_image"][0]
            for cache, sample in zip(caches[name], samples, strict=True)
        ]
        seconds[name] = time.perf_counter() - start
    rows = []
    for i, sample in enumerate(samples):
        a, b = results["fp32"][i], results["bf16"][i]
        p32 = caches["fp32"][i].tile_probabilities
        p16 = caches["bf16"][i].tile_probabilities
        rows.append(
            {
                "image_id": sample.image_id,
                "max_abs_dp": max(float(np.abs(p32[k] - p16[k]).max()) for k in p32),
                "nuclei": (a["nuclei_pred"], b["nuclei_pred"]),
                "dice": (a["dice"], b["dice"]),
                "aji": (a["aji"], b["aji"]),
            }
        )
    return {"rows": rows, "seconds": seconds}


def slide_agreement(bundle, slide: Path, device: str, work: Path, roi=None) -> dict:
    """Both precisions through ``predict_slide``; compares counts, probabilities and labels."""
    import zarr

    maps, nuclei, seconds = {}, {}, {}
    for name in PRECISIONS:
        predictor = Predictor(bundle, device=device, precision=name)
        outputs = SlideOutputs(zarr=work / f"{name}.zarr", summary=work / f"{name}.json")
        start = time.perf_counter()
        options = PredictOptions(workers=0, roi_xywh=roi)
        summary = predict_slide(slide, predictor, outputs, options)
        seconds[name] = time.perf_counter() - start
        assert summary["model"]["precision"] == name
        group = zarr.open_group(str(outputs.zarr), mode="r")
        assert group.attrs["model"]["precision"] == name
        maps[name] = group["probability"][:], group["labels"][:]
        nuclei[name] = summary["nuclei"]
    (p32, l32), (p16, l16) = maps["fp32"], maps["bf16"]
    dp = np.abs(p32.astype(np.int16) - p16.astype(np.int16))
    return {
        "nuclei": (nuclei["fp32"], nuclei["bf16"]),
        "max_abs_dp": float(dp.max()) / 255,
        "share_dp_over_2_255": float((dp > 2).mean()),
        "dice_fp32_vs_bf16": dice(l32 > 0, l16 > 0),
        "aji_bf16_against_fp32": aji(l32.astype(np.int64), l16.astype(np.int64)),
        "seconds": seconds,
    }


def verdict(ok: bool) -> str:
    return "ok" if ok else "BEYOND GOAL"


def print_tiles(result: dict) -> bool:
    rows = result["rows"]
    print(
        f"{'tile':<26}{'max|dp|':>9}{'n fp32':>8}{'n bf16':>8}{'dn %':>7}"
        f"{'Dice32':>8}{'Dice16':>8}{'AJI32':>8}{'AJI16':>8}"
    )
    for r in rows:
        (n32, n16), (d32, d16), (a32, a16) = r["nuclei"], r["dice"], r["aji"]
        print(
            f"{r['image_id']:<26}{r['max_abs_dp']:9.4f}{n32:8d}{n16:8d}"
            f"{100 * relative(n32, n16):7.2f}{d32:8.4f}{d16:8.4f}{a32:8.4f}{a16:8.4f}"
        )
    n32 = sum(r["nuclei"][0] for r in rows)
    n16 = sum(r["nuclei"][1] for r in rows)
    d32, d16 = (float(np.mean([r["dice"][k] for r in rows])) for k in (0, 1))
    a32, a16 = (float(np.mean([r["aji"][k] for r in rows])) for k in (0, 1))
    dp = max(r["max_abs_dp"] for r in rows)
    print(
        f"{'all / mean':<26}{dp:9.4f}{n32:8d}{n16:8d}{100 * relative(n32, n16):7.2f}"
        f"{d32:8.4f}{d16:8.4f}{a32:8.4f}{a16:8.4f}"
    )
    count_ok = abs(relative(n32, n16)) <= COUNT_GOAL
    dice_ok, aji_ok = abs(d16 - d32) <= SCORE_GOAL, abs(a16 - a32) <= SCORE_GOAL
    print(
        f"tiles: count {100 * relative(n32, n16):+.2f} % ({verdict(count_ok)}), "
        f"Dice {d16 - d32:+.4f} ({verdict(dice_ok)}), AJI {a16 - a32:+.4f} ({verdict(aji_ok)}); "
        f"time fp32 {result['seconds']['fp32']:.1f} s, bf16 {result['seconds']['bf16']:.1f} s"
    )
    return count_ok and dice_ok and aji_ok


def print_slide(name: str, result: dict) -> bool:
    n32, n16 = result["nuclei"]
    count_ok = abs(relative(n32, n16)) <= COUNT_GOAL
    dice_ok = result["dice_fp32_vs_bf16"] >= 1 - SCORE_GOAL
    print(
        f"{name}: nuclei fp32 {n32}, bf16 {n16} ({100 * relative(n32, n16):+.2f} %, "
        f"{verdict(count_ok)}); max |dp| {result['max_abs_dp']:.4f} (Zarr uint8; "
        f"{100 * result['share_dp_over_2_255']:.3f} % of pixels differ by > 2/255); "
        f"foreground Dice bf16 vs fp32 {result['dice_fp32_vs_bf16']:.4f} ({verdict(dice_ok)}), "
        f"AJI bf16 vs fp32 {result['aji_bf16_against_fp32']:.4f}; "
        f"time fp32 {result['seconds']['fp32']:.1f} s, bf16 {result['seconds']['bf16']:.1f} s"
    )
    return count_ok and dice_ok


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model_path = args.model or default_model_path()
    bundle = load_bundle(model_path)
    device = torch.device(args.device)
    print(
        f"model {model_path.name}; {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, native bf16 flags: "
        f"{', '.join(cpu_bf16_flags()) or 'none'} (auto picks "
        f"{resolve_precision('auto', device)} here)"
    )
    ok = True
    if not args.no_tiles:
        ids = read_ids(args.data / "val_ids.txt")[: args.tiles]
        files = [f for f in find_samples(args.data / "train") if f.image_id in set(ids)]
        samples = [load_sample(f) for f in files]
        print(f"MoNuSeg validation tiles ({len(samples)}), native protocol (cellseg.evaluation):")
        ok &= print_tiles(tiles_agreement(bundle, samples, args.device))
    if not args.no_slide:
        with tempfile.TemporaryDirectory() as work:
            roi = tuple(int(v) for v in args.roi.split(",")) if args.roi else None
            result = slide_agreement(bundle, args.slide, args.device, Path(work), roi)
        ok &= print_slide(args.slide.name + (f" (roi {args.roi})" if roi else ""), result)
    print("all within the goals" if ok else "SOME FIGURES BEYOND THE GOALS")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
