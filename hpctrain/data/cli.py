"""``hpctrain data``: convert, synth and inspect HDF5 shard datasets.

Heavy imports (numpy, h5py) happen inside the handlers so ``hpctrain --help`` stays quick.
"""
from __future__ import annotations

import argparse
import sys

from ..errors import DataError

TASKS = ("binary", "multiclass", "regression")


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION")
    sub.required = True

    p = sub.add_parser("convert", help="convert a CSV, NPY, NPZ or HDF5 file into shards",
                       description="Convert a CSV (with a header row), .npy (2-D; last column is the target "
                                   "unless --target), .npz or HDF5 file (arrays x and y) into a shard dataset. "
                                   "The input is read in chunks, twice; it need not fit in memory.")
    p.add_argument("input", metavar="INPUT")
    p.add_argument("out", metavar="OUT", help="new dataset folder")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--target", metavar="COL|INDEX",
                   help="CSV: target column name or index (default: the last column; several, comma separated, "
                        "for regression); NPY: column index; NPZ/HDF5: name of the target array (default y)")
    p.add_argument("--weights", metavar="COL|INDEX", help="sample-weight column (CSV/NPY) or array (NPZ/HDF5)")
    p.add_argument("--features", default="x", metavar="NAME", help="NPZ/HDF5: name of the feature array (default x)")
    p.add_argument("--shards", type=_positive, default=4, metavar="K", help="shards per split (default 4)")
    p.add_argument("--split", type=_fractions, default=(0.8, 0.1, 0.1), metavar="TRAIN,VAL,TEST",
                   help="split fractions (default 0.8,0.1,0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and shard assignment (default 0)")
    p.add_argument("--stratify", action="store_true", help="keep class proportions in every split")
    p.add_argument("--format", dest="fmt", choices=("csv", "npy", "npz", "h5"),
                   help="input format (default: from the file suffix)")
    p.add_argument("--feature-shape", type=_shape, default=None, metavar="D1,D2,...",
                   help="shape of one row's features for the model, e.g. 1,8,8 for 8x8 images (N-d arrays "
                        "give it themselves); rows are stored flat")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")

    p = sub.add_parser("synth", help="write a synthetic dataset with learnable structure",
                       description="Write a synthetic dataset (gaussian features, targets from a random teacher "
                                   "network plus noise) for demos, tests and benchmarks.")
    p.add_argument("out", metavar="OUT", help="new dataset folder")
    p.add_argument("--rows", type=_positive, required=True, metavar="N")
    p.add_argument("--features", type=_positive, required=True, metavar="F")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--shards", type=_positive, default=4, metavar="K")
    p.add_argument("--classes", type=_positive, default=3, metavar="C", help="multiclass: number of classes (default 3)")
    p.add_argument("--targets", type=_positive, default=1, metavar="K", help="regression: target columns (default 1)")
    p.add_argument("--noise", type=float, default=0.1)
    p.add_argument("--split", type=_fractions, default=(0.8, 0.1, 0.1), metavar="TRAIN,VAL,TEST")
    p.add_argument("--weights", action="store_true", help="add random sample weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")

    p = sub.add_parser("inspect", help="print a dataset's summary and check every shard",
                       description="Print the summary of a dataset and check every shard: format version, "
                                   "datasets, shapes, dtypes, label range and sha256 checksum. Exits 2 naming "
                                   "the file at the first problem.")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--no-checksums", action="store_true", help="skip the sha256 of each shard (faster)")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers like 1,8,8") from None
    if not dims or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers like 1,8,8")
    return dims


def _fractions(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected three numbers like 0.8,0.1,0.1") from None
    if len(parts) != 3 or any(p < 0 for p in parts) or abs(sum(parts) - 1.0) > 1e-6 or parts[0] <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected train,val,test fractions >= 0 summing to 1, "
                                         f"with train > 0")
    return parts  # type: ignore[return-value]


def main(args: argparse.Namespace) -> int:
    return {"convert": _convert, "synth": _synth, "inspect": _inspect}[args.data_command](args)


def _convert(args: argparse.Namespace) -> int:
    from .convert import convert

    convert(args.input, args.out, task=args.task, target=args.target, weights=args.weights,
            features=args.features, shards=args.shards, split=args.split, seed=args.seed,
            stratify=args.stratify, fmt=args.fmt, overwrite=args.overwrite, feature_shape=args.feature_shape,
            log=print)
    return 0


def _synth(args: argparse.Namespace) -> int:
    from .synthetic import make_synthetic

    if args.task == "multiclass" and args.classes < 3:
        raise DataError(f"--classes {args.classes}: multiclass needs at least 3 classes")
    path = make_synthetic(args.out, rows=args.rows, features=args.features, task=args.task,
                          classes=args.classes if args.task == "multiclass" else 2, targets=args.targets,
                          shards=args.shards, noise=args.noise, seed=args.seed, split=args.split,
                          weights=args.weights, overwrite=args.overwrite)
    print(f"{path}: synthetic {args.task} dataset, {args.rows} rows x {args.features} features")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from .shards import SPLITS, inspect_shard, open_dataset

    dataset = open_dataset(args.dir, check=False)
    meta = dataset.meta
    print(f"dataset   {dataset.path} (format {meta.format_version})")
    kind = {"binary": "binary", "multiclass": f"multiclass, {meta.n_classes} classes",
            "regression": f"regression, {meta.n_targets} target(s)"}[meta.task]
    print(f"task      {kind}")
    print(f"features  {meta.n_features}" + (f" ({_preview(meta.feature_names)})" if meta.feature_names else ""))
    print(f"weights   {'yes' if meta.has_weights else 'no'}")
    print(f"{'split':<8}  {'rows':>12}  {'shards':>6}")
    for split in SPLITS:
        print(f"{split:<8}  {meta.rows.get(split, 0):>12}  {len(dataset.shards(split)):>6}")
    checked = 0
    for split in SPLITS:
        for info in dataset.shards(split):
            inspect_shard(info, meta, checksum=not args.no_checksums)
            checked += 1
            print(f"ok        {info.file}  {info.rows} rows")
    print(f"checked   {checked} shards: all good" + ("" if not args.no_checksums else " (checksums skipped)"))
    sys.stdout.flush()
    return 0


def _preview(names: list, limit: int = 6) -> str:
    shown = ", ".join(str(n) for n in names[:limit])
    return shown + (f", ... {len(names) - limit} more" if len(names) > limit else "")
