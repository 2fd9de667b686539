"""The ``pyimputmae`` command line.

  pyimputmae info                      versions, build, the backend each op uses
  pyimputmae demo [--out DIR]          the whole method on the built-in synthetic cohort
  pyimputmae train --config FILE       pre-train + fine-tune from a YAML/JSON configuration
  pyimputmae predict --model M --data STORE --out preds.csv
  pyimputmae impute  --model M --data STORE --out imputed.npz
  pyimputmae plot RUN_DIR              loss curves from RUN_DIR/metrics.jsonl (also while it trains)
  pyimputmae preprocess MANIFEST --out STORE.zarr

predict and impute check that the store fits the model: the same clinical columns in the same
order and the same preprocessing (make stores of new patients with `preprocess --fitted
TRAINING_STORE`). Exit status: 0 done; 1 failed (one line `pyimputmae COMMAND: error: ...` for bad
input or settings; the traceback too for an unexpected error); 2 bad command line; 130
interrupted; 143 SIGTERM (train stops at a batch and writes a checkpoint first). --traceback
(or PYIMPUTMAE_TRACEBACK=1) shows the traceback of every error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path


def _info(args: argparse.Namespace) -> int:
    from .info import main

    main(as_json=args.json)
    return 0


def _at_least(low: int):
    """argparse type: an integer ≥ ``low`` (a bad value is a usage error, status 2)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


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


def _key_value(item: str) -> tuple[str, object]:
    """argparse type of a ``--set`` item: ``KEY=VALUE``, the value read as JSON when it is JSON (a
    malformed item is a usage error, status 2)."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {item!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _train(args: argparse.Namespace) -> int:
    from .training import train

    overrides = dict(args.set)
    if args.data:
        overrides["data"] = args.data
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
    for name in ("training_curves", "risk_groups"):
        if name in result.paths:
            print(f"figure: {result.paths[name]}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from .plots import plot_history, read_history

    run = Path(args.run)
    history = read_history(run)
    out = Path(args.out) if args.out else (run if run.is_dir() else run.parent) / "training_curves.png"
    plot_history(history, out)
    stages = {r["stage"]: r["step"] for r in history}
    print(f"{out}: {len(history)} records, " + ", ".join(f"{s} up to step {n}" for s, n in stages.items()))
    return 0


def _load_for_inference(args: argparse.Namespace, *, clinical: bool):
    """The model, the store as a cohort and the chosen rows, after checking that the store fits
    the model (clinical columns with ``clinical``, the preprocessing); notes go to stderr."""
    import numpy as np

    from .data.store import load_cohort
    from .inference import check_compatible, load
    from .training import device_for

    args.device = device_for(args.device)  # "auto" resolved; a GPU that is not there is a clear error
    model = load(args.model, args.device)
    cohort = load_cohort(args.data)
    for note in check_compatible(model, cohort, clinical=clinical, model_name=f"model {args.model}",
                                 data_name=f"store {args.data}"):
        print(f"pyimputmae {args.command}: warning: {note}", file=sys.stderr)
    rows = cohort.indices(args.split) if args.split != "all" else np.arange(len(cohort))
    if not len(rows):
        raise ValueError(f"store {args.data} has no patient in split {args.split!r}")
    return model, cohort, rows


def _predict(args: argparse.Namespace) -> int:
    import pandas as pd

    from ._atomic import atomic_write_text
    from .inference import predict_survival
    from .model.survival import SurvivalModel
    from .plots import risk_scores

    model, cohort, rows = _load_for_inference(args, clinical=True)
    if not isinstance(model, SurvivalModel):
        raise ValueError(f"{args.model} holds a pre-trained model without a survival head: fine-tune it first "
                         f"(pyimputmae train --config RUN.yaml --set pretrain=false pretrain_from={args.model})")
    curves = predict_survival(model, cohort.to(args.device), rows, check=False)
    cuts = model.cuts.cpu().numpy()
    frame = pd.DataFrame(curves, columns=[f"S({c:.3f})" for c in cuts])
    frame.insert(0, "risk", risk_scores(curves, cuts))
    frame.insert(0, "patient_id", [cohort.ids[i] for i in rows])
    atomic_write_text(args.out, frame.to_csv(index=False))  # a killed run leaves no CSV cut short
    print(f"wrote survival curves and risk scores of {len(rows)} patients to {args.out}")
    if args.plot:
        _plot_outcomes(args, model, cohort, rows)
    return 0


def _plot_outcomes(args: argparse.Namespace, model, cohort, rows) -> None:
    """``predict --plot``: Kaplan–Meier curves of the patients' halves by predicted risk, for those
    whose survival the store records (an external validation cohort)."""
    import numpy as np
    import torch

    from .plots import plot_risk_groups

    picked = torch.as_tensor(rows)
    time, event = cohort.time[picked].cpu().numpy(), cohort.event[picked].cpu().numpy()
    recorded = np.isfinite(time) & np.isin(event, (0.0, 1.0))
    known, deaths = rows[recorded], int(event[recorded].sum())
    if len(known) < 4 or deaths == 0:
        raise ValueError(f"--plot needs patients whose survival the store records: {len(known)} of {len(rows)} "
                         f"have a time and event, with {deaths} deaths (at least 4 patients and 1 death)")
    result = plot_risk_groups(model, cohort, known, args.plot, split=args.split if args.split != "all" else "")
    if "skipped" in result:
        raise ValueError(f"--plot: {result['skipped']}")
    print(f"wrote {args.plot}: {len(known)} patients with known survival, log-rank p = {result['logrank_p']:.3g}")


def _impute(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from ._atomic import atomic_write
    from .inference import impute

    model, cohort, rows = _load_for_inference(args, clinical=False)
    arrays = impute(model, cohort.to(args.device), rows, check=False)
    present = cohort.present[torch.as_tensor(rows)].cpu().numpy()
    ids = np.array([cohort.ids[i] for i in rows])
    no_data = ~present.any(1)
    out = args.out if args.out.endswith(".npz") else args.out + ".npz"  # (numpy would add it, unsaid)
    atomic_write(out, lambda f: np.savez_compressed(f, patient_id=ids, present=present, **arrays))
    print(f"wrote inputs with missing modalities imputed for {int((~no_data).sum())} of {len(rows)} patients "
          f"to {out} (arrays {', '.join(arrays)}; 'present' says which were observed)")
    if getattr(model, "mae", model).config.norm_pix:
        print("the model was pre-trained with norm_pix: every value written, observed ones included, is normalised "
              "per patch (mean 0, variance 1), not in the store's units")
    if no_data.any():
        shown = ", ".join(ids[no_data][:5]) + (", ..." if no_data.sum() > 5 else "")
        print(f"{int(no_data.sum())} patients have clinical data only ({shown}): nothing to impute from, so their "
              "rows are NaN (their 'present' row is all False)")
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
    p.add_argument("--seeds", type=_at_least(1), default=1, help="repeat over this many seeds (default: 1)")
    p.add_argument("--ablation", action="store_true", help="also fine-tune the same network without pre-training")
    p.add_argument("--patients", type=_at_least(30), default=1104,  # demo.MIN_PATIENTS (not imported: heavy)
                   help="cohort size, at least 30 (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    # the defaults are demo.DEMO_SETTINGS' (not imported: heavy)
    p.add_argument("--pretrain-epochs", type=_at_least(0), default=None, help="pre-training epochs (default: 15)")
    p.add_argument("--finetune-epochs", type=_at_least(0), default=None, help="fine-tuning epochs (default: 12)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_demo)

    p = sub.add_parser("train", help="pre-train and fine-tune from a YAML/JSON configuration")
    p.add_argument("--config", default=None, help="YAML or JSON file of TrainConfig settings")
    p.add_argument("--data", default=None, metavar="STORE",
                   help="a zarr store written by `pyimputmae preprocess` (overrides data; default: the synthetic "
                        "cohort)")
    p.add_argument("--out", default=None, help="output folder (overrides out_dir)")
    p.add_argument("--resume", action="store_true", help="continue from out_dir/checkpoints/last.pt")
    p.add_argument("--overwrite", action="store_true", help="replace the run files of an earlier run in out_dir")
    p.add_argument("--set", nargs="+", type=_key_value, default=[], metavar="KEY=VALUE",
                   help="override settings (JSON values); model.FIELD=... changes one model setting")
    p.set_defaults(func=_train)

    p = sub.add_parser("plot", help="loss curves of a training run from its metrics.jsonl (also while it runs)")
    p.add_argument("run", help="the run's out_dir, or its metrics.jsonl")
    p.add_argument("--out", default=None, help="PNG file (default: training_curves.png in the run's folder)")
    p.set_defaults(func=_plot)

    for name, func, what in (("predict", _predict, "survival curves and risk scores (CSV)"),
                             ("impute", _impute, "inputs with missing modalities imputed (NPZ)")):
        p = sub.add_parser(name, help=what)
        p.add_argument("--model", required=True, help="model.pt written by training")
        p.add_argument("--data", required=True, help="zarr store written by `pyimputmae preprocess` (new patients: "
                       "with --fitted TRAINING_STORE)")
        p.add_argument("--out", required=True)
        p.add_argument("--split", default="all", choices=("all", "train", "val", "test"))
        p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
        if name == "predict":
            p.add_argument("--plot", default=None, metavar="PNG",
                           help="also draw Kaplan–Meier curves of the patients' halves by predicted risk (for "
                                "patients whose survival the store records, e.g. an external validation cohort)")
        p.set_defaults(func=func)

    from .data.preprocess import add_parser

    add_parser(sub)  # `pyimputmae preprocess MANIFEST --out STORE.zarr`
    for command in sub.choices.values():
        command.add_argument("--traceback", action="store_true",
                             help="show the full traceback of an error (also: PYIMPUTMAE_TRACEBACK=1)")
    return parser


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input, a missing file or a bad setting — not a bug: one line, no traceback."""
    from ._backends import BackendError
    from ._runlock import InUseError
    from .data.store import StoreError
    from .data.wsi import SlideError
    from .training import MissingPackageError

    # OSError: a missing folder, a full disk, no permission — the machine's state, not our code
    kinds: list[type[BaseException]] = [ValueError, StoreError, SlideError, BackendError, MissingPackageError,
                                        InUseError, OSError]
    try:
        import yaml

        kinds.append(yaml.YAMLError)
    except ImportError:
        pass
    return tuple(kinds)


def _message(err: BaseException) -> str:
    if isinstance(err, OSError) and err.filename and err.strerror:  # "[Errno 2] ..." as open() words it
        return f"{err.filename}: {err.strerror}"
    return str(err) or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    """Run one command. Exit status: 0 done; 1 the command failed — one line ``pyimputmae COMMAND:
    error: MESSAGE`` on stderr for bad input, a missing file or a bad setting, the traceback too for
    anything unexpected (a bug); 2 the command line itself is wrong (argparse); 130 interrupted
    (Ctrl-C), 143 stopped by SIGTERM (``train`` first writes a checkpoint at the batch it reached).
    ``--traceback`` or ``PYIMPUTMAE_TRACEBACK=1`` shows the traceback of every error."""
    args = build_parser().parse_args(argv)
    verbose = args.traceback or os.environ.get("PYIMPUTMAE_TRACEBACK", "") not in ("", "0")
    try:
        return args.func(args)
    except KeyboardInterrupt as err:
        from .training import TrainingInterrupted

        if isinstance(err, TrainingInterrupted):  # stopped at a batch boundary, checkpoint written
            print(f"pyimputmae {args.command}: {err}", file=sys.stderr)
            return 143 if err.signal == "SIGTERM" else 130
        resume = "; `pyimputmae train --resume` continues from the last checkpoint" if args.command == "train" else ""
        print(f"pyimputmae {args.command}: interrupted{resume}", file=sys.stderr)
        return 130
    except Exception as err:
        expected = isinstance(err, _expected_errors())
        if verbose or not expected:
            traceback.print_exc()
        if expected:
            print(f"pyimputmae {args.command}: error: {_message(err)}", file=sys.stderr)
        else:
            print(f"pyimputmae {args.command}: internal error ({type(err).__name__}: {_message(err)}); this is a bug "
                  "in pyimputmae: please report it with the traceback above", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
