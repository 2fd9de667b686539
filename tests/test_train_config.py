"""Configuration values are checked against the dataclass field types where the configuration is
built (TrainConfig, ModelConfig, PreprocessConfig and its wsi/rna/dnam/mri parts), naming the setting."""

from __future__ import annotations

import pytest
import yaml

from pyimputmae.data.mri import MriConfig
from pyimputmae.data.omics import OmicsConfig
from pyimputmae.data.preprocess_config import PreprocessConfig
from pyimputmae.data.wsi import WsiConfig
from pyimputmae.model.config import ModalityConfig, ModelConfig
from pyimputmae.train_config import TrainConfig, resolve_model


def test_yaml_float_written_without_a_dot_is_read_as_a_number(tmp_path):
    # PyYAML follows YAML 1.1: `1e-3` (no dot) is the string "1e-3"; the config must still take it
    assert yaml.safe_load("pretrain_lr: 1e-3") == {"pretrain_lr": "1e-3"}
    (tmp_path / "run.yaml").write_text("model: small\npretrain_lr: 1e-3\nfinetune_min_lr: 5E-7\ngrad_clip: '1.5'\n")
    cfg = TrainConfig.load(tmp_path / "run.yaml")
    assert cfg.pretrain_lr == 1e-3 and isinstance(cfg.pretrain_lr, float)
    assert cfg.finetune_min_lr == 5e-7 and cfg.grad_clip == 1.5


@pytest.mark.parametrize(("setting", "value", "message"), [
    ("pretrain_epochs", "5", r"training setting pretrain_epochs must be an integer, got '5' \(str\); write a whole "
                             r"number without quotes"),
    ("pretrain_epochs", 2.5, r"training setting pretrain_epochs must be an integer, got 2.5 \(float\)"),
    ("pretrain_lr", "fast", r"training setting pretrain_lr must be a number, got 'fast' \(str\)"),
    ("pretrain_lr", "nan", r"training setting pretrain_lr must be a number, got 'nan'"),
    ("seed", True, r"training setting seed must be an integer, got True \(bool\)"),
    ("progress", "no", r"training setting progress must be true or false, got 'no' \(str\)"),
    ("val_fold", 1.5, r"training setting val_fold must be an integer or null \(None\), got 1.5"),
    ("device", 0, r"training setting device must be a string, got 0 \(int\)"),
    ("synthetic", 200, r"training setting synthetic must be a mapping, got 200 \(int\)"),
    ("device", "gpu", r"device must be 'auto' .*'cpu', 'cuda' or 'cuda:N' .*got 'gpu'"),
    ("pretrain_lr", 0, r"pretrain_lr must be > 0, got 0"),
    ("synthetic", {"n_patient": 100}, r"unknown synthetic setting\(s\) \['n_patient'\]; make_cohort\(\) takes .*"
                                      r"'n_patients'"),
])
def test_wrong_values_are_refused_naming_the_setting(setting, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig.load(**{setting: value})


def test_integral_floats_are_integers_and_ints_are_floats():
    cfg = TrainConfig.load(pretrain_epochs=2.0, finetune_lr=1, val_fold=3.0, num_threads=None)
    assert cfg.pretrain_epochs == 2 and type(cfg.pretrain_epochs) is int
    assert cfg.finetune_lr == 1.0 and type(cfg.finetune_lr) is float
    assert cfg.val_fold == 3 and type(cfg.val_fold) is int
    with pytest.raises(ValueError, match="resume=True .* overwrite=True .* choose one"):
        TrainConfig.load(resume=True, overwrite=True)


def test_one_model_setting_changed_on_top_of_a_named_model(tmp_path):
    (tmp_path / "run.yaml").write_text("model: small\nmodel_overrides: {dim: 128, clinical_features: [age_years]}\n")
    model_cfg, explicit = resolve_model(TrainConfig.load(tmp_path / "run.yaml"))
    assert model_cfg.dim == 128 and model_cfg.clinical_features == ("age_years",) and explicit
    assert model_cfg.modalities == ModelConfig.small().modalities
    # `pyimputmae train --set model.dim=96 synthetic.n_patients=50` arrives as dotted keys
    cfg = TrainConfig.load(tmp_path / "run.yaml", **{"model.dim": 96, "synthetic.n_patients": 50})
    assert cfg.model_overrides == {"dim": 96, "clinical_features": ["age_years"]}
    assert cfg.synthetic == {"n_patients": 50}
    model_cfg, explicit = resolve_model(TrainConfig.load(model="paper"))
    assert model_cfg == ModelConfig.paper() and not explicit  # the clinical columns will come from the data
    with pytest.raises(ValueError, match=r"cannot set 'seed.x'.*model.<ModelConfig field>"):
        TrainConfig.load(**{"seed.x": 1})
    with pytest.raises(ValueError, match=r"ModelConfig.dim must be an integer, got 96.5"):
        TrainConfig.load(**{"model.dim": 96.5})
    with pytest.raises(ValueError, match=r"unknown ModelConfig keys \['dimm'\]"):
        TrainConfig.load(model_overrides={"dimm": 3})
    with pytest.raises(ValueError, match=r"needs 'modalities'.*model='small', model_overrides=\{'dim': 32\}"):
        TrainConfig.load(model={"dim": 32})


def test_without_pre_training_a_named_model_fine_tunes_every_encoder():
    # the paper's freezing (MRI and WSI encoders frozen, 5 of 6 omics blocks) is for pre-trained encoders:
    # applied to randomly initialised ones it left them untrained
    assert resolve_model(TrainConfig.load(model="paper"))[0].freeze == "paper"
    for settings in ({"pretrain": False}, {"pretrain_epochs": 0}):
        assert resolve_model(TrainConfig.load(model="paper", **settings))[0].freeze == "none"
    from_file = TrainConfig.load(model="paper", pretrain=False, pretrain_from="runs/pre/model.pt")
    assert resolve_model(from_file)[0].freeze == "paper"
    # a policy the user chose is kept (train() warns that it freezes untrained encoders)
    chosen = TrainConfig.load(model="paper", pretrain=False, model_overrides={"freeze": "authors_code"})
    assert resolve_model(chosen)[0].freeze == "authors_code"
    assert resolve_model(TrainConfig.load(model=ModelConfig.paper(), pretrain=False))[0].freeze == "paper"


@pytest.mark.parametrize(("changes", "message"), [
    ({"dim": 32.5}, r"ModelConfig.dim must be an integer, got 32.5 \(float\)"),
    ({"dim": "64"}, r"ModelConfig.dim must be an integer, got '64' \(str\)"),
    ({"clinical_features": "age"}, r"ModelConfig.clinical_features must be a list of strings, got 'age' \(str\); "
                                   r"write one value as a one-element list"),
    ({"mask_ratio": {"rna": "x"}}, r"ModelConfig.mask_ratio\['rna'\] must be a number, got 'x'"),
    ({"freeze": {"rna": 1.5}}, r"ModelConfig.freeze\['rna'\] must be an integer, got 1.5"),
    ({"freeze": 3}, r"ModelConfig.freeze must be a string or a mapping, got 3 \(int\)"),
    ({"norm_pix": 1}, r"ModelConfig.norm_pix must be true or false, got 1 \(int\)"),
    ({"modalities": [{"name": "rna", "channels": 1, "spatial": [1024.5], "patch": 64, "depth": 2}]},
     r"ModelConfig.modalities\[0\].spatial\[0\] must be an integer, got 1024.5"),
    ({"modalities": [{"name": "rna", "channels": 1, "spatial": [1024], "patch": 64}]},
     r"ModelConfig.modalities\[0\] needs depth"),
    ({"modalities": [{"name": "rna", "channels": 1, "spatial": [1024], "patch": 64, "depth": 2, "deep": 1}]},
     r"unknown key\(s\) in ModelConfig.modalities\[0\] \['deep'\]"),
])
def test_model_config_values_are_checked(changes, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.small(**changes)


def test_model_config_converts_what_is_unambiguous():
    cfg = ModelConfig.small(dim=64.0, dropout="0.1", mask_ratio={"rna": 0.75}, clinical_features=["age"])
    assert cfg.dim == 64 and cfg.dropout == 0.1 and cfg.clinical_features == ("age",)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"ModalityConfig.spatial\[0\] must be an integer, got 64.5"):
        ModalityConfig("mri", 1, (64.5, 64, 64), 8, 1)


@pytest.mark.parametrize(("settings", "message"), [
    ({"wsi": {"tile_px": 64.5}}, r"preprocessing setting wsi.tile_px must be an integer, got 64.5 \(float\)"),
    ({"rna": {"width": "1024"}}, r"preprocessing setting rna.width must be an integer, got '1024' \(str\)"),
    ({"rna": {"widht": 1024}}, r"unknown key\(s\) in preprocessing setting rna \['widht'\]; known: .*'width'"),
    ({"dnam": {"gene_types": "protein_coding"}}, r"preprocessing setting dnam.gene_types must be a list of strings"),
    ({"mri": {"crop": [32, 32]}}, r"preprocessing setting mri.crop must be a list of 3 integers such as \[64, 64, "
                                  r"64\], got \[32, 32\]"),
    ({"mri": {"spacing": "one"}}, r"preprocessing setting mri.spacing must be a number, got 'one'"),
    ({"wsi": "big"}, r"preprocessing setting wsi must be a mapping of WsiConfig settings, got 'big'"),
    ({"modalities": "rna"}, r"preprocessing setting modalities must be a list of strings, got 'rna'"),
    ({"clinical_columns": ["age", 3.5]}, r"preprocessing setting clinical_columns\[1\] must be a string, got 3.5"),
])
def test_preprocessing_values_are_checked(settings, message):
    with pytest.raises(ValueError, match=message):
        PreprocessConfig.from_dict(settings)


def test_preprocessing_values_are_converted_and_a_single_crop_is_a_cube():
    cfg = PreprocessConfig.from_dict({"wsi": {"tile_px": 64.0, "mpp": "5e-1"}, "mri": {"crop": 32},
                                      "dnam": {"width": 2048}})
    assert cfg.wsi.tile_px == 64 and type(cfg.wsi.tile_px) is int and cfg.wsi.mpp == 0.5
    assert cfg.shapes()["mri"] == (1, 32, 32, 32)  # as `pyimputmae preprocess --mri-crop 32`
    assert cfg.dnam.values == "beta" and cfg.dnam.width == 2048  # the dnam defaults under the change
    with pytest.raises(ValueError, match=r"WsiConfig.tile_px must be an integer, got 64.5"):
        PreprocessConfig(wsi=WsiConfig(tile_px=64.5))


def test_a_bad_preprocessing_value_fails_before_any_file_is_read(tmp_path):
    from pyimputmae.data import preprocess as pp

    with pytest.raises(ValueError, match="wsi.tile_px must be an integer"):
        pp.preprocess(tmp_path / "no_manifest.csv", tmp_path / "store.zarr", config={"wsi": {"tile_px": 64.5}},
                      progress=False, verbose=False)
    assert not (tmp_path / "store.zarr").exists()


@pytest.mark.parametrize("build, message", [
    (lambda: MriConfig(crop=32), r"MriConfig\.crop must be a list of 3 integers"),
    (lambda: OmicsConfig(width="1024"), r"OmicsConfig\.width must be an integer, got '1024'"),
    (lambda: OmicsConfig.dnam(min_std="a lot"), r"OmicsConfig\.min_std"),
    (lambda: WsiConfig(tile_px=64.5), r"WsiConfig\.tile_px must be an integer, got 64\.5"),
])
def test_the_modality_settings_built_in_python_are_checked(build, message):
    """The rna/dnam/wsi/mri settings built directly (not through PreprocessConfig) are checked too."""
    with pytest.raises(ValueError, match=message):
        build()


def test_collections_numbers_as_names_paths_and_other_devices_are_taken():
    """What the settings took before they were type-checked stays accepted: any ordered collection
    (a pandas Index) for a list, numbers as names (Entrez ids from YAML), a pathlib.Path for a path,
    a device type torch knows besides cuda (mps)."""
    from pathlib import Path

    import pandas as pd

    assert ModelConfig.small(clinical_features=pd.Index(["age", "chemo"])).clinical_features == ("age", "chemo")
    assert OmicsConfig(gene_list=[7157, "TP53"]).gene_list == ["7157", "TP53"]
    cfg = TrainConfig(out_dir=Path("runs") / "a", device="mps")
    assert cfg.out_dir == str(Path("runs") / "a") and cfg.device == "mps"
    with pytest.raises(ValueError, match=r"pretrain_lr must be a number, got nan .*NaN and infinity are not settings"):
        TrainConfig(pretrain_lr=float("nan"))
    with pytest.raises(ValueError, match=r"device must be 'auto' .*such as 'mps'; got 'gpu'"):
        TrainConfig(device="gpu")


def test_set_items_are_key_value_pairs_on_the_command_line(capsys):
    from pyimputmae.cli import main

    for argv in (["train", "--set"], ["train", "--set", "pretrain_epochs"], ["train", "--set", "=3"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2  # a usage error: nothing runs
    assert "expected KEY=VALUE, got '=3'" in capsys.readouterr().err


def test_a_part_of_the_preprocessing_given_as_a_dict_is_built_with_its_own_defaults():
    cfg = PreprocessConfig(rna={"width": 10}, dnam={"width": 20}, mri={"crop": [8, 8, 8]})
    assert isinstance(cfg.dnam, OmicsConfig) and cfg.dnam.values == "beta" and cfg.rna.values == "raw"
    assert cfg.shapes()["mri"] == (1, 8, 8, 8) and cfg.shapes()["rna"] == (1, 10)
