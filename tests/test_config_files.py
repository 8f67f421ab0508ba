"""Experiment configs that extend another config (``extends: BASE.yaml``), and codes and terms merged by name across configs."""

import pytest
import yaml

from aae_lightning.cli import cli_main
from aae_lightning.config_files import expand_extends
from conftest import CONFIGS
from test_bad_inputs import run_cli
from test_cli import resolved_config


def write(path, config: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_an_experiment_is_its_base_chain_with_its_own_keys_on_top(tmp_path, capsys):
    write(tmp_path / "base.yaml", {"extends": str(CONFIGS / "basic.yaml"),
                                   "model": {"init_args": {"lr": 0.001, "input_noise": 0.2}}})
    experiment = write(tmp_path / "experiments" / "k.yaml", {"extends": "../base.yaml", "model": {"init_args": {"lr": 0.003}},
                                                             "trainer": {"max_epochs": 7}})
    printed = resolved_config(experiment, capsys)
    basic = resolved_config(CONFIGS / "basic.yaml", capsys)
    assert printed["model"]["init_args"]["lr"] == 0.003  # the experiment over its base
    assert printed["model"]["init_args"]["input_noise"] == 0.2  # the base over basic.yaml
    assert printed["trainer"]["max_epochs"] == 7
    # and the rest is basic.yaml's, with nothing of the key itself left
    assert printed["model"]["init_args"]["codes"] == basic["model"]["init_args"]["codes"] and "extends" not in printed
    # the form --config=FILE, and a config given as a YAML string passes through as it is
    assert expand_extends(["fit", f"--config={experiment}", "--config", "{trainer: {max_epochs: 3}}"]) == [
        "fit", "--config", str(CONFIGS / "basic.yaml"), "--config", "model:\n  init_args:\n    lr: 0.001\n    input_noise: 0.2\n",
        "--config", "model:\n  init_args:\n    lr: 0.003\ntrainer:\n  max_epochs: 7\n", "--config", "{trainer: {max_epochs: 3}}"]


def test_the_shipped_variants_differ_from_their_base_only_where_they_say(capsys):
    k16 = resolved_config(CONFIGS / "clustering.yaml", capsys)
    k30 = resolved_config(CONFIGS / "clustering_30.yaml", capsys)
    k10 = resolved_config(CONFIGS / "clustering_10.yaml", capsys)
    merge = k10["trainer"]["callbacks"].pop()
    assert merge["class_path"] == "aae_lightning.MergedClusters" and merge["init_args"]["num_clusters"] == 10
    # one cluster per digit: thirty clusters merged into ten
    assert k10 == k30
    # two self-labelled copies a step, one term with two distinct maps
    self_labelling = k16["model"]["init_args"]["terms"]["self_labelling"]["init_args"]
    assert [m["class_path"] for m in self_labelling["perturbation"]] == ["aae_lightning.RandomAffine", "aae_lightning.RandomElastic"]

    # thirty clusters and nothing else
    assert k30["model"]["init_args"]["codes"]["y"]["init_args"]["prior"]["init_args"]["num_classes"] == 30
    k30["model"]["init_args"]["codes"]["y"]["init_args"]["prior"]["init_args"]["num_classes"] = 16
    assert k30 == k16
    # the three invariance terms under one map (so one shared copy), stronger than the reconstruction phase's
    model = k16["model"]["init_args"]
    maps = [model["terms"][name]["init_args"]["perturbation"] for name in ("consistency", "paired", "contrast")]
    assert all(m == maps[0] for m in maps)
    strong, mild = maps[0]["init_args"], model["reconstruction_perturbation"]["init_args"]
    assert (strong["degrees"], strong["scale"], strong["shear"], strong["max_shift"]) == (25, [0.8, 1.2], 10, 3)
    assert (mild["degrees"], mild["scale"], mild["max_shift"]) == (5, [0.95, 1.05], 1)

    labels100 = resolved_config(CONFIGS / "semi_supervised_mnist_100.yaml", capsys)
    labels1000 = resolved_config(CONFIGS / "semi_supervised_mnist_1000.yaml", capsys)
    assert labels1000["data"]["init_args"].pop("num_labeled") == 1000 and labels100["data"]["init_args"].pop("num_labeled") == 100
    assert labels1000["trainer"].pop("precision") == "32-true" and labels100["trainer"].pop("precision") is None
    # 100 labels self-label a second copy, under the affine map alone
    self_labelling = labels100["model"]["init_args"]["terms"]["self_labelling"]["init_args"]
    elastic, affine = self_labelling["perturbation"]
    assert affine["class_path"] == "aae_lightning.RandomAffine"
    self_labelling["perturbation"] = elastic
    maps = [labels1000["model"]["init_args"]["supervised_perturbation"],
            labels1000["model"]["init_args"]["terms"]["self_labelling"]["init_args"]["perturbation"]]
    assert [m["class_path"] for m in maps] == ["aae_lightning.RandomAffine"] * 2
    assert [m["init_args"]["stroke"] for m in maps] == [0.0, 0.0]
    for m in maps:  # the elastic field's own settings on top of the affine map's, and the 100 labels' pen width
        m["class_path"] = "aae_lightning.RandomElastic"
        m["init_args"].update({"alpha": 34.0, "sigma": 5.0, "stroke": 0.5})
    assert labels1000 == labels100


def test_configs_merge_the_codes_and_terms_by_name(tmp_path, capsys):
    k16 = resolved_config(CONFIGS / "clustering.yaml", capsys)["model"]["init_args"]
    experiment = write(tmp_path / "k.yaml", {"extends": str(CONFIGS / "clustering.yaml"), "model": {"init_args": {
        "codes": {"y": {"prior": {"init_args": {"num_classes": 12}}},
                  "w": {"prior": {"class_path": "aae_lightning.GaussianPrior", "init_args": {"dim": 2}}}},
        "terms": {"contrast": None, "consistency": {"init_args": {"weight": 2.0}}}}}})
    printed = resolved_config(experiment, capsys)["model"]["init_args"]
    codes, terms = printed["codes"], printed["terms"]
    # a code or term not named keeps its place and settings (the codes' order is the decoder's
    # input); a new one comes last; one set to null leaves
    assert list(codes) == ["y", "z", "w"] and codes["z"] == k16["codes"]["z"]
    assert codes["y"]["init_args"]["prior"] == {"class_path": "aae_lightning.CategoricalPrior", "init_args": {"num_classes": 12}}
    assert list(terms) == [name for name in k16["terms"] if name != "contrast"]
    assert terms["consistency"]["init_args"] == k16["terms"]["consistency"]["init_args"] | {"weight": 2.0}
    assert all(terms[name] == k16["terms"][name] for name in terms if name != "consistency")

    # several --config flags merge the same way, and an empty mapping empties the collection
    write(tmp_path / "no_terms.yaml", {"model": {"init_args": {"terms": {}}}})
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(CONFIGS / "clustering.yaml"), "--config", str(experiment), "--print_config"])
    assert list(yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["terms"]) == list(terms)
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(experiment), "--config", str(tmp_path / "no_terms.yaml"), "--print_config"])
    assert not yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["terms"]


def test_a_null_flag_drops_a_code_or_term_and_keeps_the_other_flags(capsys):
    k30 = resolved_config(CONFIGS / "clustering_30.yaml", capsys)["model"]["init_args"]
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(CONFIGS / "clustering_30.yaml"), "--model.terms.paired.init_args.weight=3",
                  "--model.terms.contrast=null", "--model.init_args.codes.z", "null",
                  "--model.terms.neighbours.init_args.weight=5", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    assert list(printed["terms"]) == [name for name in k30["terms"] if name != "contrast"] and list(printed["codes"]) == ["y"]
    # the flags on either side of the drop still apply, and the rest is the config's
    assert printed["terms"]["paired"]["init_args"]["weight"] == 3 and printed["terms"]["neighbours"]["init_args"]["weight"] == 5
    assert printed["codes"]["y"] == k30["codes"]["y"] and printed["terms"]["consistency"] == k30["terms"]["consistency"]

    code, err = run_cli(["fit", "--config", str(CONFIGS / "clustering.yaml"), "--model.terms.contrst=null"], capsys)
    assert code == 2 and err.strip().splitlines()[-1] == (
        "error: --model.terms.contrst=null drops a term the configs do not have (their terms: mutual_information, "
        "consistency, paired, self_labelling, contrast, neighbours)")


def test_a_loop_or_a_missing_base_ends_in_one_line(tmp_path, capsys):
    write(tmp_path / "a.yaml", {"extends": "b.yaml"})
    write(tmp_path / "b.yaml", {"extends": ["a.yaml"]})
    code, err = run_cli(["fit", "--config", str(tmp_path / "a.yaml")], capsys)
    assert code == 2 and err.strip().splitlines()[-1].endswith("extend each other in a loop (a.yaml -> b.yaml -> a.yaml)")

    write(tmp_path / "c.yaml", {"extends": "gone.yaml"})
    code, err = run_cli(["fit", "--config", str(tmp_path / "c.yaml")], capsys)
    assert code == 2 and f"c.yaml extends gone.yaml, which is not a file (looked for {tmp_path / 'gone.yaml'})" in err

    write(tmp_path / "d.yaml", {"extends": {"path": "a.yaml"}})
    code, err = run_cli(["fit", "--config", str(tmp_path / "d.yaml")], capsys)
    assert code == 2 and "'extends' takes a config file's path" in err
