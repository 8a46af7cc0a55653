"""The study's statistics against hand computations, its file checks, and the report's layout."""

from __future__ import annotations

import math

import pytest

from alignclip.commands.study import main as study_main
from alignclip.config import ConfigError
from alignclip.study.report import aggregate, markdown
from alignclip.study.spec import parse_study
from alignclip.study.stats import paired_difference, summarize, t_quantile


def test_t_quantiles_match_the_printed_table():
    # Student-t two-sided 95 % critical values as printed in any table (1, 2, 4, 9 degrees of freedom)
    for dof, printed in ((1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262)):
        assert t_quantile(dof) == pytest.approx(printed, abs=5e-4)


def test_summary_is_mean_and_sample_std():
    s = summarize([0.2, 0.4, 0.9])
    assert s.mean == pytest.approx(0.5)
    # by hand: deviations -0.3, -0.1, 0.4 -> squares 0.09 + 0.01 + 0.16 = 0.26, / (3 - 1) = 0.13
    assert s.std == pytest.approx(math.sqrt(0.13))
    assert s.text() == "0.500 ± 0.361"
    one = summarize([0.25])
    assert one.n == 1 and math.isnan(one.std) and one.text() == "0.250"


def test_paired_difference_by_hand():
    variant = {0: 0.5, 1: 0.7, 2: 0.6}
    baseline = {0: 0.3, 1: 0.4, 2: 0.5, 7: 0.9}  # seed 7 has no partner: left out
    d = paired_difference(variant, baseline)
    # differences 0.2, 0.3, 0.1: mean 0.2, sd 0.1, half-width 4.303 * 0.1 / sqrt(3) = 0.2484
    assert d.n == 3 and d.mean == pytest.approx(0.2)
    assert d.low == pytest.approx(0.2 - 0.24841, abs=1e-4) and d.high == pytest.approx(0.2 + 0.24841, abs=1e-4)
    assert d.excludes_zero is False
    tight = paired_difference({0: 1.0, 1: 1.1, 2: 1.2}, {0: 0.5, 1: 0.62, 2: 0.69})
    # differences 0.5, 0.48, 0.51: mean 0.49667, sd 0.015275, half-width 4.303 * 0.015275 / sqrt(3) = 0.037946
    assert tight.low == pytest.approx(0.49667 - 0.037946, abs=1e-4) and tight.excludes_zero is True
    assert tight.text() == "+0.497 [+0.459, +0.535] *"
    single = paired_difference({3: 0.4}, {3: 0.1})
    assert single.mean == pytest.approx(0.3) and single.low is None and single.excludes_zero is None
    assert single.text() == "+0.300 (n/a)"
    with pytest.raises(ValueError, match="no seed in common"):
        paired_difference({0: 1.0}, {1: 1.0})


def _measurement(align: float, acc: float) -> dict:
    return {"gap": {"alignment_score": align, "centroid_distance": 1 - align, "rmg_l2": 0.3,
                    "linear_separability": 0.9, "uniformity": -2.0},
            "tasks": {"zeroshot_colour": {"acc1": acc, "acc5": 1.0}, "linear_probe_colour": {"acc1": acc + 0.3},
                      "retrieval": {"text_retrieval_recall@1": 0.1, "image_retrieval_recall@1": 0.2,
                                    "text_retrieval_recall@5": 0.3, "image_retrieval_recall@5": 0.4}}}


def test_aggregate_and_report_layout():
    measurements = {"CLIP": {0: {"val": _measurement(0.4, 0.5)}, 1: {"val": _measurement(0.5, 0.6)}},
                    "AlignCLIP": {0: {"val": _measurement(0.8, 0.55)}, 1: {"val": _measurement(0.9, 0.6)}}}
    agg = aggregate(measurements, "CLIP")["val"]
    assert agg["summary"]["gap/alignment_score"]["CLIP"]["mean"] == pytest.approx(0.45)
    diff = agg["difference"]["gap/alignment_score"]["AlignCLIP"]
    assert diff["mean"] == pytest.approx(0.4) and diff["n"] == 2
    # differences 0.4, 0.4: sd 0 -> the interval is the point, and it excludes zero
    assert diff["low"] == pytest.approx(0.4) and diff["excludes_zero"] is True
    acc = agg["difference"]["zeroshot_colour/acc1"]["AlignCLIP"]
    assert acc["mean"] == pytest.approx(0.025)  # 0.05 and 0.0
    results = {"study": "t", "variants": ["CLIP", "AlignCLIP"], "baseline": "CLIP", "seeds": [0, 1],
               "runs_summary": "4 trained", "wall_time_s": 1.0, "aggregate": {"val": agg}, "runs": []}
    text = markdown(results, {"CDF": "plots/val/cosine_cdf.png"})
    assert "| variant | alignment | L2M | RMG | lin. separability | uniformity |" in text
    assert "| CLIP | 0.450 ± 0.071 |" in text
    assert "zero-shot colour top-1" in text and "I→T R@1" in text and "T→I R@5" in text
    assert "probe colour top-1" in text and "| 0.850 ± 0.071 |" in text  # CLIP's probe: 0.8, 0.9
    assert "| AlignCLIP | +0.400 [+0.400, +0.400] * |" in text
    assert "![CDF](plots/val/cosine_cdf.png)" in text
    # per seed: alignment, L2M, separability, zero-shot colour, I→T R@1 (no probe), in seed order
    assert "### Per seed (0, 1)\n\n| variant | alignment | L2M | lin. separability | zero-shot colour top-1 | I→T R@1 |" \
        in text
    assert "| CLIP | 0.400 / 0.500 | 0.600 / 0.500 | 0.900 / 0.900 | 0.500 / 0.600 | 0.100 / 0.100 |" in text
    del measurements["AlignCLIP"][1]  # a run that failed: its seed shows as missing
    results["aggregate"] = aggregate(measurements, "CLIP")
    assert "| AlignCLIP | 0.800 / – | 0.200 / – | 0.900 / – | 0.550 / – | 0.100 / – |" in markdown(results, {})


def _study(**changes) -> dict:
    variants = [{"name": "CLIP", "configs": ["experiment/embedded_clip"]},
                {"name": "AlignCLIP", "configs": ["experiment/embedded_default"]}]
    raw = {"name": "s", "seeds": [0, 1], "variants": variants}
    raw.update(changes)
    return raw


def test_study_file_checks_name_the_key():
    spec = parse_study(_study(), "s.yaml", ["train.max_steps=3"])
    assert spec.baseline == "CLIP" and spec.seeds == (0, 1) and spec.eval_sets[0].data == "generated"
    assert spec.run_dir("CLIP", 1).parts[-3:] == ("runs", "CLIP", "seed1")
    cases = [(_study(seedz=[0]), "unknown key(s) ['seedz']"),
             (_study(seeds=[0, 0]), "'seeds' must be a non-empty list of distinct integers"),
             (_study(baseline="OpenCLIP"), "'baseline' 'OpenCLIP' is not a variant"),
             (_study(executor="k8s"), "'executor' must be 'local' or 'slurm'"),
             (_study(variants=[{"name": "X", "configs": ["experiment/nope"]}]), "variants[0].configs"),
             (_study(variants=[{"name": "a/b", "configs": ["experiment/embedded_clip"]}]), "must be a folder name"),
             (_study(overrides=["train.lrr=1"]), "variant CLIP: command-line override 'train.lrr=1'"),
             (_study(overrides=["nonsense"]), "'overrides' entry 'nonsense' is not of the form key=value")]
    for raw, message in cases:
        with pytest.raises(ConfigError) as err:
            parse_study(raw, "s.yaml")
        assert message in str(err.value) and "s.yaml" in str(err.value)


def test_command_exits_2_with_one_line_on_bad_input(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: s\nseeds: [0]\nvariants: [{name: A, configs: [experiment/embedded_clip]}]\n")
    assert study_main([str(bad), "train.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.lrr" in err and str(bad) in err
    assert study_main([str(bad), "--seeds", "0", "train.lrr=1"]) == 2  # overrides after the options too
    assert "train.lrr" in capsys.readouterr().err
    assert study_main([str(bad), "--seeds", "1,x"]) == 2
    assert "--seeds '1,x'" in capsys.readouterr().err
    assert study_main([str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err


def test_shipped_study_files_resolve():
    from alignclip.study.spec import load_study

    embedded = load_study("configs/study/embedded.yaml")
    assert [v.name for v in embedded.variants] == ["CLIP", "SharedCLIP", "AlignCLIP", "AlignCLIP-step0"] \
        and embedded.seeds == (0, 1, 2)
    paper = load_study("configs/study/cc12m_paper.yaml")
    assert paper.executor == "slurm" and len(paper.variants) == 3 and len(paper.seeds) == 3


def test_probe_split_of_an_eval_set():
    spec = parse_study(_study(eval_sets=[{"name": "g", "probe_split": "train"}, {"name": "h"}]), "s.yaml")
    probe = spec.eval_sets[0].probe_set()
    assert (probe.name, probe.data, probe.split, probe.tasks, probe.probe_split) == ("g-probe", "generated", "train",
                                                                                    "", "")
    assert spec.eval_sets[1].probe_split == "" and spec.eval_sets[1].probe_set() is None  # default: no probe
    for item in ({"name": "g", "probe_split": "val"}, {"name": "g", "split": "train", "probe_split": "train"},
                 {"name": "s", "data": "/d/x-{0..1}.tar", "tasks": "/d/t.json", "probe_split": "train"}):
        with pytest.raises(ConfigError, match=r"eval_sets\[0\]\.probe_split") as err:
            parse_study(_study(eval_sets=[item]), "s.yaml")
        assert "s.yaml" in str(err.value)


def test_measured_generated_set_has_linear_probes(tmp_path):
    """The study's path (encode_with_probe, measure_set) with a real exported model: the train split encoded once
    beside the val set, probe figures equal evaluate_set's with that train set, and a second call reads the caches."""
    import numpy as np

    from alignclip.config import load_config
    from alignclip.data.generated import split_tasks
    from alignclip.eval.suite import evaluate_set
    from alignclip.study.measure import EvalSet, encode_with_probe, measure_set
    from tests.helpers.tiny import export_untrained, tiny_overrides

    overrides = tiny_overrides(tmp_path / "data", **{"data.generated.version": 2})
    model = export_untrained(tmp_path / "m.safetensors", overrides)
    cache = tmp_path / "emb" / "step-g"
    es, train = encode_with_probe(model, EvalSet("g", probe_split="train"), cache)
    assert (tmp_path / "emb" / "step-g-probe" / "meta.json").is_file()
    assert len(train.image) == 32 and len(set(train.keys)) == 32  # 64 samples, each image once (2 captions each)
    labelled = {train.keys[i] for i in np.flatnonzero(train.zeroshot["colour"].labels >= 0)}
    assert labelled and labelled == set(split_tasks(load_config(None, overrides).data, "train")["zero_shot"]["colour"]
                                         ["keys"])  # the leading samples hold every labelled image
    tasks = measure_set(es, train=train)["tasks"]
    assert {"linear_probe_colour", "linear_probe_shape"} <= set(tasks)
    for name in ("colour", "shape"):
        assert tasks[f"linear_probe_{name}"] == evaluate_set(es, train=train)[f"linear_probe_{name}"]
    plain, none = encode_with_probe(model, EvalSet("g"), tmp_path / "emb" / "plain")
    assert none is None and not any(t.startswith("linear_probe_") for t in measure_set(plain)["tasks"])
    model.unlink()  # both sets now come from their caches: encoding again would need the model
    again, train_again = encode_with_probe(model, EvalSet("g", probe_split="train"), cache)
    assert measure_set(again, train=train_again)["tasks"] == tasks


def test_shipped_embedded_study_fits_probes_on_the_train_split():
    from alignclip.study.spec import load_study

    (generated,) = load_study("configs/study/embedded.yaml").eval_sets
    assert generated.data == "generated" and generated.split == "val" and generated.probe_split == "train"
