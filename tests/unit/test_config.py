from pathlib import Path

import pytest

from ncd.config import ConfigError, ExperimentConfig, apply_overrides, dump_config, from_dict, load_config, to_dict


def test_defaults_reproduce_the_paper():
    cfg = ExperimentConfig()
    assert (cfg.mebin.sample_rate, cfg.mebin.min_interval_len, cfg.mebin.erode) == (4, 4, True)
    assert cfg.model.backbone == "vit_base_patch8_224.dino"
    assert (cfg.model.mask_layers, cfg.model.grad_from_block, cfg.model.n_head) == (9, 11, 4)
    assert (cfg.train.lr, cfg.train.epochs, cfg.train.batch_size, cfg.train.seed) == (0.003, 50, 32, 3407)
    assert (cfg.loss.sup_weight, cfg.loss.memax_weight, cfg.loss.anomaly_thred) == (0.3, 4.0, 0.5)
    assert (cfg.loss.warmup_teacher_temp, cfg.loss.teacher_temp) == (0.07, 0.04)
    assert cfg.train.kmeans_init == "auto"  # k-means prototype start in ProtoAnomalyNCD mode only (ncd.methods)
    assert cfg.train.num_novel == "auto"  # K is never taken from labels unless asked (gt)


def test_overrides_are_typed():
    cfg = apply_overrides(ExperimentConfig(), ["mebin.min_interval_len=5", "train.lr=0.01", "mebin.erode=false",
                                               "mebin.lower_bound=0", "data.categories=a,b"])
    assert cfg.mebin.min_interval_len == 5 and isinstance(cfg.mebin.min_interval_len, int)
    assert cfg.train.lr == 0.01
    assert cfg.mebin.erode is False
    assert cfg.mebin.lower_bound == 0
    assert cfg.data.categories == ("a", "b")
    assert apply_overrides(cfg, ["mebin.lower_bound=none"]).mebin.lower_bound is None


def test_config_is_frozen():
    with pytest.raises(Exception):
        ExperimentConfig().train.lr = 1.0  # type: ignore[misc]


def test_unknown_override_lists_valid_keys():
    with pytest.raises(ConfigError) as err:
        apply_overrides(ExperimentConfig(), ["mebin.sample_rat=3"])
    assert "mebin.sample_rat" in str(err.value) and "sample_rate" in str(err.value)
    with pytest.raises(ConfigError, match="valid keys: .*mebin"):
        apply_overrides(ExperimentConfig(), ["mebinn.x=1"])


def test_bad_value_names_the_key():
    with pytest.raises(ConfigError, match="train.epochs"):
        apply_overrides(ExperimentConfig(), ["train.epochs=ten"])
    with pytest.raises(ConfigError, match="form"):
        apply_overrides(ExperimentConfig(), ["train.epochs"])


def test_yaml_unknown_key_names_file_and_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert "train.lrr" in str(err.value) and str(p) in str(err.value) and "lr" in str(err.value)


def test_yaml_round_trip(tmp_path):
    cfg = apply_overrides(ExperimentConfig(), ["data.categories=x", "train.epochs=3"])
    p = tmp_path / "c.yaml"
    p.write_text(dump_config(cfg))
    assert load_config(p) == cfg
    assert from_dict(ExperimentConfig, to_dict(cfg)) == cfg


def test_renamed_keys_fail_with_the_new_name(tmp_path):
    """proto.k_min/k_max became infer.k_min/k_max (one K range for both modes): the old key
    in a file or an override is a one-line error naming the new key; a config stored by an
    older ncd (model file, checkpoint) still loads."""
    from ncd.config import RENAMED, stored_config

    assert RENAMED["proto.k_min"] == "infer.k_min" and RENAMED["proto.k_max"] == "infer.k_max"
    for old, new in RENAMED.items():
        with pytest.raises(ConfigError, match=f"^{old} was renamed: use {new}$"):
            apply_overrides(ExperimentConfig(), [f"{old}=3"])
        section, _, name = old.rpartition(".")
        p = tmp_path / f"{name}.yaml"
        p.write_text(f"{section}:\n  {name}: 3\n")
        with pytest.raises(ConfigError) as err:
            load_config(p)
        assert str(err.value) == f"{p}: {old} was renamed: use {new}" and "\n" not in str(err.value)
    old_file = to_dict(apply_overrides(ExperimentConfig(), ["infer.k_max=7"]))
    old_file["proto"].update(k_min=3, k_max=9)  # written before the rename: both ranges stored
    assert stored_config(old_file) == apply_overrides(ExperimentConfig(), ["infer.k_max=7"])
    del old_file["infer"]["k_max"]
    assert stored_config(old_file).infer.k_max == 9  # only the old key: its value under the new name


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_num_novel_is_a_positive_k_auto_or_gt():
    from ncd.validation import validate

    read = {v: apply_overrides(ExperimentConfig(), [f"train.num_novel={v}"]).train.num_novel
            for v in ("7", "auto", "gt")}
    assert read == {"7": 7, "auto": "auto", "gt": "gt"}
    for bad in ("0", "-1", "seven", "2.5"):
        with pytest.raises(ConfigError, match="train.num_novel"):
            validate(apply_overrides(ExperimentConfig(), [f"train.num_novel={bad}"]))


def test_anomaly_thred_minus_one_turns_the_correction_off():
    from ncd.validation import validate

    validate(apply_overrides(ExperimentConfig(), ["loss.anomaly_thred=-1"]))  # upstream's off switch
    for bad in ("-0.5", "1.5"):
        with pytest.raises(ConfigError, match="loss.anomaly_thred"):
            validate(apply_overrides(ExperimentConfig(), [f"loss.anomaly_thred={bad}"]))


def test_validate_lists_every_bad_key_at_once():
    from ncd.validation import validate

    cfg = apply_overrides(ExperimentConfig(), ["train.batch_size=0", "train.epochs=0", "method=protoncd",
                                               "proto.guidance=sharp", "train.lr=nan", "infer.k_max=1",
                                               "train.kmeans_init=maybe"])
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    for key in ("train.batch_size=0", "train.epochs=0", "method='protoncd'", "proto.guidance='sharp'",
                "train.lr=nan", "infer.k_max=1", "train.kmeans_init='maybe'"):
        assert key in str(err.value), key
    assert "(7 keys)" in str(err.value)


def test_packaged_configs_are_valid_and_say_which_k_they_use():
    import yaml

    from ncd.validation import validate

    for path in sorted(Path("ncd/configs").glob("*.yaml")):
        validate(load_config(path))
        assert "num_novel" in yaml.safe_load(path.read_text()).get("train", {}), path.name
