"""The settings of :func:`pyimputmae.train`: :class:`TrainConfig`, read from keyword arguments, a
dict or a YAML/JSON file and checked when it is built (types, values, the model it names).

Which settings may change when a run is resumed: :data:`pyimputmae.checkpoint.RESUMABLE_SETTINGS`.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._fields import check_fields, check_types, reject_unknown
from .model.config import ModelConfig, resolve_config

#: the mixed-precision settings of ``TrainConfig.amp``
AMP_MODES = ("auto", "bf16", "fp16", "off")


def check_device(name: str) -> None:
    """``name`` must be ``"auto"`` or a device torch knows (``cpu``, ``cuda``, ``cuda:N``, ``mps``, ...);
    ValueError naming the choices otherwise."""
    import torch

    if name == "auto":
        return
    try:
        torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"device must be 'auto' (a CUDA GPU when one is visible, else the CPU), 'cpu', 'cuda' "
                         f"or 'cuda:N' (GPU number N), or another device type torch knows such as 'mps'; got "
                         f"{name!r}") from None


def device_for(name: str) -> Any:
    """``name`` as a ``torch.device``; a clear error for a name torch does not know and for a GPU
    that is not there."""
    import torch

    check_device(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
            raise ValueError(f"device={name!r} but no CUDA GPU is visible to PyTorch (torch {torch.__version__}, "
                               f"{build}; check CUDA_VISIBLE_DEVICES and nvidia-smi); use device='cpu' or 'auto'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device={name!r} but only {torch.cuda.device_count()} CUDA GPU(s) are visible "
                               f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return device


def check_single_process(out_dir: str) -> None:
    """ValueError when this is one of several processes of a distributed launch (``torchrun``,
    ``torch.distributed.launch`` and others that set ``WORLD_SIZE``): :func:`pyimputmae.train` trains
    in one process, and each of N processes would train on the whole cohort and write the same
    ``out_dir``, each one overwriting the others' checkpoints and model. A world of size 1 passes."""
    world = os.environ.get("WORLD_SIZE", "").strip()
    try:
        size = int(world) if world else 1
    except ValueError:
        raise ValueError(f"the environment variable WORLD_SIZE={world!r} is not a whole number; it is set by "
                         "distributed launchers such as torchrun, and pyimputmae.train() runs in one process: "
                         "unset it") from None
    if size > 1:
        rank = os.environ.get("RANK", "?")
        raise ValueError(f"pyimputmae.train() runs in one process, but this is process {rank} of {size} of a "
                         f"distributed launch (WORLD_SIZE={size}, as torchrun sets it). Each process would train "
                         f"on the whole cohort on its own and write the same out_dir {out_dir!r}, overwriting the "
                         "others' checkpoints and model; training across GPUs is not supported yet. Start it as "
                         "one process (python, or torchrun --nproc_per_node=1) and choose the GPU with "
                         "device='cuda:N'")


@dataclass
class TrainConfig:
    """Everything :func:`train` needs. Epoch counts are per stage; learning rates follow a linear
    warm-up then a cosine decay to ``*_min_lr``, per optimizer step.

    Every value is checked against its field's type when the configuration is built (the error
    names the setting): numbers written as strings (YAML reads ``1e-3`` as one) are accepted for
    float settings, integral floats (``2.0``) for integer ones. ``model_overrides`` changes
    ModelConfig fields of ``model`` (e.g. ``model="small", model_overrides={"dim": 128}``). The
    model's ``clinical_features`` are the cohort's clinical columns unless set explicitly (in
    ``model_overrides``, in a ``model`` dict, or by passing a ModelConfig). Without pre-trained
    encoders (``pretrain=False`` and no ``pretrain_from``) the model's ``freeze`` is ``"none"``
    unless set explicitly in the same way (:func:`resolve_model`).
    """

    model: Any = "small"  # a ModelConfig, its name ("small", "paper") or its to_dict()
    model_overrides: dict = field(default_factory=dict)  # ModelConfig fields changed on top of `model`
    data: str | None = None  # a zarr store from `pyimputmae preprocess`; None → synthetic cohort
    synthetic: dict = field(default_factory=dict)  # make_cohort() arguments for the synthetic cohort
    out_dir: str = "runs/pyimputmae"
    seed: int = 0
    device: str = "auto"  # "auto" (cuda when available), "cpu", "cuda", "cuda:N", or e.g. "mps"
    val_fold: int | None = None  # hold out this cross-validation fold of the training split
    # pre-training
    pretrain: bool = True
    pretrain_from: str | None = None  # a model file written by train() (model.pt) to take the pre-trained MAE from
    pretrain_epochs: int = 400
    pretrain_batch_size: int = 96
    pretrain_lr: float = 1e-3
    pretrain_min_lr: float = 5e-6
    pretrain_weight_decay: float = 1e-2
    pretrain_warmup_epochs: float = 5.0
    # fine-tuning
    finetune: bool = True
    finetune_epochs: int = 50
    finetune_batch_size: int = 24
    finetune_lr: float = 1e-4
    finetune_min_lr: float = 1e-6
    finetune_weight_decay: float = 1e-2
    finetune_warmup_epochs: float = 1.0
    # mechanics
    grad_accum: int = 1
    grad_clip: float | None = 1.0
    # "auto": bf16 on GPUs with native bf16 (compute capability 8.0+), fp16 with loss scaling on
    # older ones (V100, T4), off on CPU; or "bf16", "fp16" (with torch.amp.GradScaler), "off"
    amp: str = "auto"
    checkpoint_every: int = 100  # optimizer steps
    resume: bool = False
    overwrite: bool = False  # replace the run files of an earlier run in out_dir
    log_every: int = 10  # optimizer steps between log records
    tensorboard: bool = False
    progress: bool = True
    num_threads: int | None = None
    deterministic: bool = False
    data_on_device: str = "auto"  # "auto", "yes", "no": keep the whole cohort on the GPU
    # capture pre-training's whole step in one CUDA graph and replay it (GPU only; not with fp16 or
    # grad_accum > 1); not yet run on a GPU, hence off by default (docs/benchmarks.md)
    cuda_graph: bool = False

    def __post_init__(self) -> None:
        check_fields(self, "training setting ")
        self.validate()

    @classmethod
    def load(cls, source: TrainConfig | str | os.PathLike | Mapping[str, Any] | None = None,
             **overrides: Any) -> TrainConfig:
        """From a TrainConfig, a YAML/JSON path or a dict, with keyword overrides on top. A run's own
        ``config.json`` (``out_dir/config.json``) is read as the settings it ran with, less
        ``resume`` and ``overwrite``: ``pyimputmae train --config runs/a/config.json --out runs/b``
        repeats run ``a``.

        An override ``"a.b"`` sets key ``b`` of the dict setting ``a`` (``synthetic.n_patients``,
        ``model_overrides.dim``); ``"model.b"`` is ``"model_overrides.b"``, so that
        ``pyimputmae train --set model.clinical_features='["age"]'`` changes one model setting.
        """
        if source is None:
            base: dict[str, Any] = {}
        elif isinstance(source, TrainConfig):
            base = dataclasses.asdict(source)
        elif isinstance(source, Mapping):
            base = dict(source)
        else:
            path = Path(source)
            if not path.exists():
                raise FileNotFoundError(f"training configuration {path} does not exist")
            text = path.read_text()
            if path.suffix in (".yaml", ".yml"):
                import yaml

                base = yaml.safe_load(text) or {}
            else:
                base = json.loads(text)
            if not isinstance(base, dict):
                raise ValueError(f"{path}: expected a mapping of settings at the top level")
            if set(base) == {"train", "model"} and isinstance(base["train"], dict):
                # a run's own config.json ({"train": settings, "model": the model they resolved to}):
                # its settings again, but not resume/overwrite, which were about that run's out_dir
                base = {k: v for k, v in base["train"].items() if k not in ("resume", "overwrite")}
        for key, value in overrides.items():
            if "." not in key:
                base[key] = value
                continue
            head, sub = key.split(".", 1)
            head = "model_overrides" if head == "model" else head
            if head not in ("synthetic", "model_overrides") or "." in sub:
                raise ValueError(f"cannot set {key!r}: a dotted setting must be synthetic.<argument>, "
                                 f"model.<ModelConfig field> or model_overrides.<ModelConfig field>")
            if not isinstance(base.get(head, {}), Mapping):
                raise ValueError(f"cannot set {key!r}: {head} is {base[head]!r}, not a mapping")
            base[head] = {**base.get(head, {}), sub: value}
        reject_unknown(cls, base, "training setting(s)")
        return cls(**base)

    def validate(self) -> None:
        """Value checks beyond the types (which ``__post_init__`` checks first)."""
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {', '.join(repr(m) for m in AMP_MODES)}, got {self.amp!r}")
        if self.data_on_device not in ("auto", "yes", "no"):
            raise ValueError(f"data_on_device must be 'auto', 'yes' or 'no', got {self.data_on_device!r}")
        check_device(self.device)
        for name in ("pretrain_epochs", "finetune_epochs", "pretrain_batch_size", "finetune_batch_size",
                     "grad_accum", "checkpoint_every", "log_every"):
            if getattr(self, name) < (0 if name.endswith("epochs") else 1):
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("pretrain_lr", "finetune_lr"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("pretrain_min_lr", "finetune_min_lr", "pretrain_weight_decay", "finetune_weight_decay",
                     "pretrain_warmup_epochs", "finetune_warmup_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be ≥ 0, got {getattr(self, name)}")
        if self.grad_clip is not None and self.grad_clip < 0:
            raise ValueError(f"grad_clip must be ≥ 0 (0 or None: no clipping), got {self.grad_clip}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be ≥ 1 (None: torch's default), got {self.num_threads}")
        if not self.pretrain and not self.finetune:
            raise ValueError("nothing to do: pretrain and finetune are both off")
        if self.cuda_graph and self.amp == "fp16":
            raise ValueError("cuda_graph=True cannot capture fp16 training: its loss scaler checks every step's "
                             "gradients on the host. Use amp='bf16' (or 'auto' on a GPU with bf16), or "
                             "cuda_graph=False")
        if self.cuda_graph and self.grad_accum > 1:
            raise ValueError(f"cuda_graph=True captures one optimizer step per batch, so grad_accum must be 1, got "
                             f"{self.grad_accum}: raise pretrain_batch_size instead, or set cuda_graph=False")
        if self.resume and self.overwrite:
            raise ValueError("resume=True continues the run in out_dir and overwrite=True replaces it: choose one")
        from .data.synthetic import make_cohort

        unknown = sorted(set(self.synthetic) - set(inspect.signature(make_cohort).parameters))
        if unknown:
            raise ValueError(f"unknown synthetic setting(s) {unknown}; make_cohort() takes "
                             f"{sorted(inspect.signature(make_cohort).parameters)}")
        self.synthetic = check_types(make_cohort, self.synthetic, "synthetic.")
        resolve_model(self)  # a bad model setting fails here, not after the cohort is loaded

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if isinstance(self.model, ModelConfig):
            d["model"] = self.model.to_dict()
        return d


def set_explicitly(cfg: TrainConfig, field_name: str) -> bool:
    """Was the ModelConfig field ``field_name`` chosen by the user: a ModelConfig passed as ``model``,
    or a key of a ``model`` dict or of ``model_overrides`` (not a named model's default)?"""
    return (isinstance(cfg.model, ModelConfig) or field_name in cfg.model_overrides
            or (isinstance(cfg.model, Mapping) and field_name in cfg.model))


def pretrains(cfg: TrainConfig) -> bool:
    """Will the encoders be pre-trained: pre-training runs for at least one epoch, or ``pretrain_from``
    gives pre-trained weights?"""
    return bool(cfg.pretrain_from) or (cfg.pretrain and cfg.pretrain_epochs > 0)


def resolve_model(cfg: TrainConfig) -> tuple[ModelConfig, bool]:
    """The model configuration of ``cfg`` (``model`` with ``model_overrides`` applied) and whether its
    ``clinical_features`` were set explicitly (a ModelConfig, or a key of a ``model`` dict or of
    ``model_overrides``); when not, :func:`train` takes them from the cohort.

    Without pre-trained encoders (``pretrain=False`` or no pre-training epoch, and no
    ``pretrain_from``) a ``freeze`` policy the user did not set is ``"none"``: the freezing of the
    named models (the paper's: MRI and WSI encoders frozen, 5 of 6 omics blocks) is meant for
    pre-trained encoders and would leave randomly initialised ones untrained."""
    model_cfg = resolve_config(cfg.model)
    if cfg.model_overrides:
        model_cfg = model_cfg.replace(**cfg.model_overrides)
    if not pretrains(cfg) and not set_explicitly(cfg, "freeze") and model_cfg.freeze != "none":
        model_cfg = model_cfg.replace(freeze="none")
    return model_cfg, set_explicitly(cfg, "clinical_features")
