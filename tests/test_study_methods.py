"""The study's methods side by side, against hand computations: derived variants (fine-tune, post-hoc map) and
sweeps in the study file, curves with 95 % bands, the Pareto-best settings, the log trend, the cost plan, post-hoc
maps saved and reloaded, the set counts beside zero-shot accuracy, and the own-data fixes (captions without a
header, the source-name key map, ``key=null``)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from alignclip.config import ConfigError, load_config
from alignclip.study.spec import parse_study
from alignclip.study.stats import log_trend, mean_interval


def _study(**changes) -> dict:
    variants = [{"name": "CLIP", "configs": ["experiment/embedded_clip"]},
                {"name": "AlignCLIP", "configs": ["experiment/embedded_default"]}]
    raw = {"name": "s", "seeds": [0, 1], "variants": variants,
           "fit_sets": [{"name": "fit", "data": "generated", "split": "train", "limit": 64}]}
    raw.update(changes)
    return raw


def _with(*extra) -> list:
    return _study()["variants"] + list(extra)


def test_sweep_points_become_variants_and_the_base_value_is_the_base_run():
    raw = _study(sweeps=[{"name": "w", "variant": "AlignCLIP", "keys": ["loss.imsep_weight"],
                          "values": [0.0, 0.5, 1.0]}])
    spec = parse_study(raw, "s.yaml")
    (sweep,) = spec.sweeps
    # embedded_default's own IMSep weight is 0.5: that point is AlignCLIP itself, trained once
    assert [(p.values, p.variant) for p in sweep.points] == [((0.0,), "w-0.0"), ((0.5,), "AlignCLIP"),
                                                            ((1.0,), "w-1.0")]
    w1 = spec.variant("w-1.0")
    assert w1.configs == spec.variant("AlignCLIP").configs and w1.overrides == ("loss.imsep_weight=1.0",)
    assert [v.name for v in spec.variants] == ["CLIP", "AlignCLIP", "w-0.0", "w-1.0"]
    two = parse_study(_study(sweeps=[{"name": "t", "variant": "AlignCLIP",
                                      "keys": ["loss.imsep_weight", "optim.lr"],
                                      "values": [[0.5, 0.002], [0.5, 0.001], [1.0, 0.001]]}]), "s.yaml")
    assert [p.variant for p in two.sweeps[0].points] == ["AlignCLIP", "t-0.5-0.001", "t-1.0-0.001"]


def test_derived_variants_and_their_checks_name_the_key():
    posthoc = {"name": "CLIP+p", "posthoc": {"from": "CLIP", "map": "procrustes", "fit": "fit"}}
    spec = parse_study(_study(variants=_with(posthoc)), "s.yaml")
    variant = spec.variant("CLIP+p")
    assert variant.kind == "posthoc" and not variant.trains and variant.source == "CLIP"
    sweep = {"name": "w", "variant": "AlignCLIP", "keys": ["loss.imsep_weight"], "values": [0.0, 1.0]}
    cases = [
        (_study(variants=_with({"name": "X", "posthoc": {"from": "CLIP", "map": "pca", "fit": "fit"}})),
         "variants[2].posthoc.map must be one of"),
        (_study(variants=_with({"name": "X", "posthoc": {"from": "Nope", "map": "mlp", "fit": "fit"}})),
         "variants[2].posthoc.from 'Nope' must name a pretraining variant"),
        (_study(variants=_with({"name": "X", "posthoc": {"from": "CLIP", "map": "mlp", "fit": "val"}})),
         "variants[2].posthoc.fit 'val' is not a fit set"),
        (_study(variants=_with({"name": "X", "posthoc": {"from": "CLIP", "map": "mlp"}})),
         "'variants[2].posthoc' is missing ['fit']"),
        (_study(variants=_with({"name": "X", "configs": ["experiment/embedded_clip"],
                                "posthoc": {"from": "CLIP", "map": "mlp", "fit": "fit"}})),
         "a post-hoc map trains nothing"),
        (_study(variants=_with({"name": "X", "configs": ["experiment/embedded_clip"],
                                "finetune": {"from": "CLIP", "steps": 0}})),
         "variants[2].finetune.steps must be an integer >= 1"),
        (_study(sweeps=[dict(sweep, variant="CLIP+p")], variants=_with(posthoc)), "is not a trained variant"),
        (_study(sweeps=[dict(sweep, keys=["loss.imsep_wieght"])]), "no such config key"),
        (_study(sweeps=[dict(sweep, values=[1.0])]), "must list at least two values"),
        (_study(sweeps=[dict(sweep, extrapolate=100)]), "sweeps[0].extrapolate must be a number > 0 and needs trend"),
        (_study(sweeps=[dict(sweep, keys=["loss.imsep_weight", "optim.lr"], values=[0.0, 1.0])]),
         "each value must give 2 value(s)"),
        (_study(eval_sets=[{"name": "e", "data": "/d/{0..1}.tar", "classnames": "c.txt"}]),
         "needs all three of classnames, templates and labels"),
        (_study(plan={"mfu": 1.5}), "plan: mfu must lie in (0, 1]"),
        (_study(tradeoff={"gap": "gap/alignment_score", "y": []}), "unknown key(s) ['y'] in tradeoff"),
    ]
    for raw, message in cases:
        with pytest.raises(ConfigError) as err:
            parse_study(raw, "s.yaml")
        assert message in str(err.value) and "s.yaml" in str(err.value), (message, str(err.value))


def test_mean_interval_and_log_trend_by_hand():
    mean, low, high = mean_interval([0.2, 0.4, 0.9])
    # sd sqrt(0.13), t(2) = 4.3027: half-width 4.3027 * 0.36056 / sqrt(3) = 0.89568
    assert mean == pytest.approx(0.5) and high - mean == pytest.approx(0.89568, abs=1e-4) and low < mean
    assert mean_interval([0.3]) == (0.3, None, None)
    xs, ys = [10, 10, 100, 100, 1000, 1000], [0.30, 0.32, 0.40, 0.41, 0.52, 0.50]
    trend = log_trend(xs, ys, x_new=10_000)
    slope, intercept = np.polyfit(np.log10(xs), ys, 1)
    assert trend.slope == pytest.approx(slope) and trend.intercept == pytest.approx(intercept)
    # by hand: u = 1,1,2,2,3,3; Sxx = 4; residuals give RSS; t(4) = 2.7764
    rss = sum((y - intercept - slope * math.log10(x)) ** 2 for x, y in zip(xs, ys))
    half = 2.7764 * math.sqrt(rss / 4) / math.sqrt(4)
    assert trend.slope_high - trend.slope == pytest.approx(half, abs=1e-4)
    assert trend.predicted == pytest.approx(intercept + 4 * slope)
    # the prediction at 10^4 is two decades beyond the mean log x: sqrt(1/6 + 4/4) times sigma times t
    assert trend.predicted_high - trend.predicted == pytest.approx(
        2.7764 * math.sqrt(rss / 4) * math.sqrt(1 / 6 + 4 / 4), abs=1e-4)
    with pytest.raises(ValueError):
        log_trend([10, 10, 10], [1, 2, 3])


def test_curves_tradeoff_and_pareto_by_hand(tmp_path):
    from alignclip.study.report import markdown
    from alignclip.study.tradeoff import pareto_best, plot_sweep, plot_tradeoff, sweep_curve, tradeoff_lines

    spec = parse_study(_study(sweeps=[{"name": "w", "variant": "AlignCLIP", "keys": ["loss.imsep_weight"],
                                       "values": [0.0, 0.5, 1.0]}]), "s.yaml")
    (sweep,) = spec.sweeps
    # alignment rises with the weight, recall falls; CLIP has the worst gap and the best recall
    align = {"CLIP": {"0": 0.40, "1": 0.44}, "w-0.0": {"0": 0.50, "1": 0.52}, "AlignCLIP": {"0": 0.70, "1": 0.74},
             "w-1.0": {"0": 0.80, "1": 0.84}}
    recall = {"CLIP": {"0": 0.30, "1": 0.34}, "w-0.0": {"0": 0.28, "1": 0.26}, "AlignCLIP": {"0": 0.29, "1": 0.27},
              "w-1.0": {"0": 0.10, "1": 0.12}}
    values = {"gap/alignment_score": align, "retrieval/text_retrieval_recall@1": recall}
    curve = sweep_curve(values, "gap/alignment_score", sweep)
    assert [(r["label"], r["variant"]) for r in curve] == [("0.0", "w-0.0"), ("0.5", "AlignCLIP"), ("1.0", "w-1.0")]
    # two seeds 0.70, 0.74: sd 0.028284, t(1) = 12.706, half-width 12.706 * 0.028284 / sqrt(2) = 0.25412
    assert curve[1]["mean"] == pytest.approx(0.72) and curve[1]["high"] == pytest.approx(0.72 + 0.25412, abs=1e-4)
    # w-0.0 is dominated by AlignCLIP (smaller gap, same-or-better recall: 0.28 vs 0.27 mean) -> not Pareto-best
    assert pareto_best(values, "gap/alignment_score", "retrieval/text_retrieval_recall@1",
                       ["CLIP", "w-0.0", "AlignCLIP", "w-1.0"]) == ["CLIP", "AlignCLIP", "w-1.0"]
    # a lower-is-better gap metric flips the direction
    l2m = {"gap/centroid_distance": {v: {s: 1 - x for s, x in seeds.items()} for v, seeds in align.items()},
           "retrieval/text_retrieval_recall@1": recall}
    assert pareto_best(l2m, "gap/centroid_distance", "retrieval/text_retrieval_recall@1",
                       ["CLIP", "w-0.0", "AlignCLIP", "w-1.0"]) == ["CLIP", "AlignCLIP", "w-1.0"]
    lines = tradeoff_lines(["CLIP", "w-0.0", "AlignCLIP", "w-1.0"], spec.sweeps)
    assert lines == [("AlignCLIP: w", [("w-0.0", "w=0.0"), ("AlignCLIP", "w=0.5"), ("w-1.0", "w=1.0")]),
                     ("CLIP", [("CLIP", "CLIP")])]
    png = plot_sweep(values, sweep, [("alignment", "gap/alignment_score"), ("R@1", "retrieval/text_retrieval_"
                                                                                     "recall@1")],
                     tmp_path / "sweep.png", baseline="CLIP")
    trade = plot_tradeoff(values, ("alignment", "gap/alignment_score"),
                          [("R@1", "retrieval/text_retrieval_recall@1")], lines, tmp_path / "trade.png")
    assert png.stat().st_size > 5000 and trade.stat().st_size > 5000
    results = {"study": "s", "variants": ["CLIP", "AlignCLIP"], "baseline": "CLIP", "seeds": [0, 1],
               "runs_summary": "", "wall_time_s": 0.0, "aggregate": {}, "runs": [],
               "sweeps": {"val": {"w": {"base": "AlignCLIP", "keys": ["loss.imsep_weight"],
                                        "curves": {"gap/alignment_score": curve}}}},
               "tradeoff": {"val": {"gap": "gap/alignment_score", "downstream": ["retrieval/text_retrieval_recall@1"],
                                    "pareto": {"retrieval/text_retrieval_recall@1": ["CLIP", "AlignCLIP"]}}}}
    text = markdown(results, {})
    assert "| loss.imsep_weight | variant | seeds | alignment |" in text
    assert "| 0.5 | AlignCLIP | 2 | 0.720 [0.466, 0.974] |" in text
    assert "- I→T R@1: CLIP, AlignCLIP" in text


def test_counts_beside_zero_shot_and_metric_names_read_defensively():
    from alignclip.embeddings import EmbeddingSet, ZeroShotTask
    from alignclip.study.measure import set_counts
    from alignclip.study.report import counts_line, downstream_columns, flatten

    rng = np.random.default_rng(0)
    labels = np.array([0, 0, 0, 0, 1, 2, -1, 0, 1])  # 8 labelled, 5 of class 0
    es = EmbeddingSet.from_arrays(rng.normal(size=(9, 4)), rng.normal(size=(12, 4)),
                                  np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 2]),
                                  zeroshot={"kind": ZeroShotTask(["a", "b", "c"], np.eye(3, 4), labels)})
    counts = set_counts(es)
    assert counts == {"pairs": 12, "images": 9, "zeroshot_kind/labelled": 8,
                      "zeroshot_kind/majority_rate": 5 / 8}
    flat = flatten({"gap": {"alignment_score": 0.5}, "counts": counts,
                    "tasks": {"zeroshot_kind": {"acc1": 0.6, "mean_per_class_recall": 0.4, "note": "x",
                                                "tie_aware_acc1": 0.55}}})
    assert flat["counts/zeroshot_kind/majority_rate"] == 0.625 and "zeroshot_kind/note" not in flat
    assert downstream_columns(flat)[:2] == [("zero-shot kind top-1", "zeroshot_kind/acc1"),
                                            ("zero-shot kind per-class recall", "zeroshot_kind/mean_per_class_recall")]
    values = {k: {"CLIP": {0: v}} for k, v in flat.items()}
    assert counts_line(values) == ("Measured on 12 image-caption pairs of 9 images. Zero-shot kind: 8 labelled "
                                   "images, majority-class rate 0.625.")


@pytest.mark.parametrize("kind", ["mean_shift", "mean_centering", "procrustes", "mlp"])
def test_posthoc_maps_fit_save_and_reload_identically(tmp_path, kind):
    from alignclip.analysis.metrics import l2_normalize
    from alignclip.embeddings import EmbeddingSet
    from alignclip.study.posthoc import fit_map, load_map, save_map

    rng = np.random.default_rng(1)
    img = l2_normalize(rng.normal(size=(64, 8)) + 2.0)
    txt = l2_normalize(rng.normal(size=(64, 8)) - 1.0)
    fit = EmbeddingSet.from_arrays(img, txt)
    assert load_map(tmp_path / "m") is None
    method = save_map(fit_map(kind, fit, seed=0), tmp_path / "m")
    again = load_map(tmp_path / "m")
    for side in ("map_image", "map_text"):
        np.testing.assert_allclose(getattr(again, side)(img), getattr(method, side)(img), atol=1e-6)
    if kind == "mean_shift":  # the mapped images' mean is the texts' mean (Liang et al. 2022)
        np.testing.assert_allclose(again.map_image(img).mean(0), txt.mean(0), atol=1e-9)


def test_cost_plan_is_the_flop_model_by_hand():
    from alignclip.study.plan import plan_study, plan_table
    from alignclip.study.spec import load_study
    from alignclip.training.flops import step_flops

    spec = load_study("configs/study/cc12m_paper.yaml")
    costs = {c.variant: c for c in plan_study(spec, 10_000_000)}
    config = load_config("experiment/cc12m_clip")
    per_sample = step_flops(config).total
    steps = 30 * (10_000_000 // 512)
    gpu_hours = per_sample * 512 * steps / (989.4e12 * 0.35) / 3600
    assert costs["CLIP"].steps == steps and costs["CLIP"].gpu_hours == pytest.approx(gpu_hours)
    assert costs["CLIP"].wall_hours == pytest.approx(gpu_hours / 8)
    table = plan_table(spec, 10_000_000)
    assert "assumed MFU 35%" in table and f"| **total** | 9 |" in table
    assert f"{gpu_hours * 3:,.0f} |" in table.splitlines()[4]  # CLIP's row: three seeds


def test_plan_flag_prints_and_submits_nothing(capsys, tmp_path):
    from alignclip.commands.study import main

    assert main(["configs/study/cc12m_paper.yaml", "--plan", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "GPU-hours per run" in out and "| CLIP | 3 |" in out and not any(tmp_path.iterdir())


def test_null_clears_an_inherited_key():
    base = ["data.semantic_dir=/inherited"]
    assert load_config("experiment/embedded_default", base).data.semantic_dir == "/inherited"
    for clear in ("data.semantic_dir=null", "data.semantic_dir=", "data.semantic_dir=~"):
        assert load_config("experiment/embedded_default", base + [clear]).data.semantic_dir == ""
    assert load_config("experiment/embedded_default", ["model.norm_eps=null"]).model.norm_eps is None  # Optional
    with pytest.raises(ConfigError, match="semantic_dirr"):
        load_config("experiment/embedded_default", ["data.semantic_dirr=null"])


def test_captions_without_a_header_say_so_or_are_read_with_no_header(tmp_path):
    from alignclip.data.writer import read_captions_file

    path = tmp_path / "captions.csv"
    path.write_text('photo_1.jpg,"a dog, running"\nchat é.png,deux chats\n\n')
    with pytest.raises(ValueError, match=r"looks like data, not a header: add a header row .* --no-header"):
        read_captions_file(path)
    assert read_captions_file(path, header=False) == [("photo_1.jpg", "a dog, running"), ("chat é.png", "deux chats")]
    short = tmp_path / "short.tsv"
    short.write_text("a.jpg\n")
    with pytest.raises(ValueError, match=r"short.tsv, line 1: expected image"):
        read_captions_file(short, header=False)


def test_make_shards_keeps_the_source_names(tmp_path):
    from PIL import Image

    from alignclip.commands.make_shards import main
    from alignclip.data.writer import source_keys

    images = tmp_path / "imgs"
    (images / "sub").mkdir(parents=True)
    names = ["b.png", "sub/ä.jpg", "sub/b.png", "missing.jpg"]
    for name in names[:3]:
        Image.new("RGB", (20, 12), (200, 10, 10)).save(images / name)
    captions = tmp_path / "c.csv"
    captions.write_text("".join(f"{n},caption {i}\n" for i, n in enumerate(names)))
    assert main(["folder", "--images", str(images), "--captions", str(captions), "--out", str(tmp_path / "s"),
                 "--samples-per-shard", "2", "--no-header"]) == 0
    keys = source_keys(str(tmp_path / "s"))
    # every name as written; "ä.jpg" alone is unambiguous, "b.png" is not (two folders hold one)
    assert keys == {"b.png": "000000000", "sub/ä.jpg": "000000001", "sub/b.png": "000000002",
                    "missing.jpg": "000000003", "ä.jpg": "000000001"}
    assert source_keys("generated") == {}
    # labels keyed by source name, as alignclip-eval / -gap / -distill and a study read them (--labels)
    from alignclip.embeddings import tasks_from_files

    (tmp_path / "classes.txt").write_text("red\nblue\n")
    (tmp_path / "templates.txt").write_text("a {c} thing\n")
    (tmp_path / "labels.tsv").write_text("ä.jpg\tblue\nsub/b.png\tred\n000000000\tred\n")
    tasks = tasks_from_files(str(tmp_path / "classes.txt"), str(tmp_path / "templates.txt"),
                             str(tmp_path / "labels.tsv"), data=str(tmp_path / "s"))
    assert tasks["val_labels"] == {"000000001": {"classes": 1}, "000000002": {"classes": 0},
                                   "000000000": {"classes": 0}}


def test_no_train_reports_without_submitting(tmp_path):
    import json

    import yaml

    from alignclip.commands.study import main

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(_study(output_dir=str(tmp_path / "out"))))
    assert main([str(path), "--no-train"]) == 0
    results = json.loads((tmp_path / "out" / "s" / "study_results.json").read_text())
    assert results["runs_summary"] == "0 trained, 0 finished before, 0 failed, 4 not trained (--no-train)"
    assert not (tmp_path / "out" / "s" / "runs").exists()  # nothing was submitted


def test_an_extrapolation_outside_the_metrics_range_says_so():
    from alignclip.study.report import metric_range, sweep_section

    assert metric_range("zeroshot_shape/mean_per_class_recall") == (0.0, 1.0)
    assert metric_range("gap/alignment_score") == (-1.0, 1.0)
    trend = {"slope": 0.6, "slope_low": -0.4, "slope_high": 1.6, "n": 9, "x_new": 73242.0, "predicted": 3.163,
             "predicted_low": -1.3, "predicted_high": 7.7}
    sweep = {"base": "CLIP", "keys": ["train.epochs"], "curves": {}, "trends": {
        "zeroshot_shape/mean_per_class_recall": trend, "retrieval/text_retrieval_recall@1": dict(trend, predicted=0.5)}}
    text = "\n".join(sweep_section("val", "clip_epochs", sweep))
    assert "at 73242: 3.163 [-1.300, 7.700] (an extrapolation: valid only if the trend stays log-linear; outside " \
           "the metric's range [0, 1]: it cannot)" in text
    assert "at 73242: 0.500 [-1.300, 7.700] (an extrapolation: valid only if the trend stays log-linear)" in text


def test_caption_embeddings_that_cannot_be_made_stop_the_study_in_one_line(tmp_path, capsys):
    import yaml
    from PIL import Image

    from alignclip.commands.study import main
    from alignclip.data.writer import write_folder_shards

    (tmp_path / "img").mkdir()
    for i in range(4):
        Image.new("RGB", (24, 16), (40 * i, 10, 10)).save(tmp_path / "img" / f"{i}.png")
    write_folder_shards([(f"{i}.png", f"a thing {i}") for i in range(4)], tmp_path / "img", tmp_path / "shards", 4,
                        log=lambda *_: None)
    raw = {"name": "s", "seeds": [0], "output_dir": str(tmp_path / "out"),
           "overrides": [f"data.train={tmp_path / 'shards'}", f"loss.semantic_model={tmp_path / 'no-model'}"],
           "variants": [{"name": "AlignCLIP", "configs": ["experiment/embedded_default"]}]}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "loss.semantic_model" in err and "no-model" in err
    assert not (tmp_path / "out" / "s" / "runs").exists()  # stopped before anything trained
