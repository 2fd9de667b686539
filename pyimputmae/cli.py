"""The ``pyimputmae`` command line.

  pyimputmae info                      versions, build, the backend each op uses
  pyimputmae demo [--out DIR]          the whole method on the built-in synthetic cohort
  pyimputmae train --config FILE       pre-train + fine-tune from a YAML/JSON configuration
  pyimputmae predict --model M --data STORE --out preds.csv
  pyimputmae impute  --model M --data STORE --out imputed.npz
  pyimputmae preprocess MANIFEST --out STORE.zarr
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _info(args: argparse.Namespace) -> int:
    from .info import main

    main(as_json=args.json)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import render, run_demo

    extra = {}
    if args.pretrain_epochs is not None:
        extra["pretrain_epochs"] = args.pretrain_epochs
    if args.finetune_epochs is not None:
        extra["finetune_epochs"] = args.finetune_epochs
    result = run_demo(args.out, seeds=args.seeds, ablation=args.ablation, n_patients=args.patients,
                      device=args.device, progress=not args.quiet, **extra)
    print(render(result))
    imp = result["figures"]["imputation"]
    if "mri_corr" in imp:
        print(f"imputation of held-out modalities (patient {imp['patient']}): MRI r = {imp['mri_corr']:.2f}, "
              f"RNA r = {imp['rna_corr']:.2f}")
    print(f"wrote {Path(args.out) / 'metrics.json'}, km_risk_groups.png, imputation.png "
          f"({result['seconds']:.0f} s)")
    return 0


def _parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _train(args: argparse.Namespace) -> int:
    from .training import train

    overrides = _parse_set(args.set)
    if args.out:
        overrides["out_dir"] = args.out
    if args.resume:
        overrides["resume"] = True
    if args.overwrite:
        overrides["overwrite"] = True
    result = train(args.config, **overrides)
    for split, m in result.metrics.items():
        print(f"{split:5s} C-index {m['c_index']:.3f}  CS-score {m['cs_score']:.3f}  IBS {m['ibs']:.3f}  "
              f"Harrell C {m['harrell_c']:.3f}")
    print(f"model: {result.paths['model']}")
    return 0


def _load_for_inference(args: argparse.Namespace):
    from .data.store import load_cohort
    from .inference import load

    model = load(args.model, args.device)
    cohort = load_cohort(args.data)
    rows = cohort.indices(args.split) if args.split != "all" else None
    return model, cohort, rows


def _predict(args: argparse.Namespace) -> int:
    import numpy as np
    import pandas as pd

    from .inference import predict_survival
    from .model.survival import SurvivalModel

    model, cohort, rows = _load_for_inference(args)
    if not isinstance(model, SurvivalModel):
        raise SystemExit(f"{args.model} holds a pre-trained model without a survival head: fine-tune it first")
    rows = np.arange(len(cohort)) if rows is None else rows
    curves = predict_survival(model, cohort.to(args.device), rows)
    cuts = model.cuts.cpu().numpy()
    frame = pd.DataFrame(curves, columns=[f"S({c:.3f})" for c in cuts])
    frame.insert(0, "risk", -(curves[:, 1:] @ np.diff(cuts)))
    frame.insert(0, "patient_id", [cohort.ids[i] for i in rows])
    frame.to_csv(args.out, index=False)
    print(f"wrote survival curves and risk scores of {len(rows)} patients to {args.out}")
    return 0


def _impute(args: argparse.Namespace) -> int:
    import numpy as np

    model, cohort, rows = _load_for_inference(args)
    mae = getattr(model, "mae", model)
    rows = np.arange(len(cohort)) if rows is None else rows
    device = next(mae.parameters()).device
    out: dict[str, list] = {name: [] for name in cohort.modalities}
    for start in range(0, len(rows), 64):
        batch = cohort.batch(rows[start:start + 64]).to(device)
        for name, value in mae.impute(batch).items():
            out[name].append(value.cpu().numpy())
    arrays = {name: np.concatenate(v) for name, v in out.items()}
    np.savez_compressed(args.out, patient_id=np.array([cohort.ids[i] for i in rows]),
                        present=cohort.present[rows].cpu().numpy(), **arrays)
    print(f"wrote inputs with missing modalities imputed for {len(rows)} patients to {args.out} "
          f"(arrays {', '.join(arrays)}; 'present' says which were observed)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyimputmae", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="versions, build configuration, and the backend each op uses")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=_info)

    p = sub.add_parser("demo", help="pre-train, fine-tune and evaluate on the built-in synthetic cohort")
    p.add_argument("--out", default="pyimputmae-demo", help="output folder (default: %(default)s)")
    p.add_argument("--seeds", type=int, default=1, help="repeat over this many seeds (default: 1)")
    p.add_argument("--ablation", action="store_true", help="also fine-tune the same network without pre-training")
    p.add_argument("--patients", type=int, default=1104, help="cohort size (default: %(default)s)")
    p.add_argument("--device", default="auto")
    p.add_argument("--pretrain-epochs", type=int, default=None)
    p.add_argument("--finetune-epochs", type=int, default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_demo)

    p = sub.add_parser("train", help="pre-train and fine-tune from a YAML/JSON configuration")
    p.add_argument("--config", default=None, help="YAML or JSON file of TrainConfig settings")
    p.add_argument("--out", default=None, help="output folder (overrides out_dir)")
    p.add_argument("--resume", action="store_true", help="continue from out_dir/checkpoints/last.pt")
    p.add_argument("--overwrite", action="store_true", help="replace the run files of an earlier run in out_dir")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override settings (JSON values); model.FIELD=... changes one model setting")
    p.set_defaults(func=_train)

    for name, func, what in (("predict", _predict, "survival curves and risk scores (CSV)"),
                             ("impute", _impute, "inputs with missing modalities imputed (NPZ)")):
        p = sub.add_parser(name, help=what)
        p.add_argument("--model", required=True, help="model.pt written by training")
        p.add_argument("--data", required=True, help="zarr store written by `pyimputmae preprocess`")
        p.add_argument("--out", required=True)
        p.add_argument("--split", default="all", choices=("all", "train", "val", "test"))
        p.add_argument("--device", default="cpu")
        p.set_defaults(func=func)

    from .data.preprocess import add_parser

    add_parser(sub)  # `pyimputmae preprocess MANIFEST --out STORE.zarr`
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
