"""`keep:` — a benchmark goes on in a later session from its tracked copy of finished evaluations."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest
import yaml

from spf.bench.keep import KEPT_FIELDS, Keep, KeptBaseMismatch, base_fingerprint, base_probe
from spf.bench.report import collect
from spf.bench.run import BenchConfigError, cells, load_bench_config, run_cell
from tests.recipes.test_bench import SEEDED, _prepared, _tiny


def _cell(cfg, cell_id):
    return next(c for c in cells(cfg) if c.id == cell_id)


def test_a_fresh_work_folder_is_filled_from_the_kept_copy_without_retraining(
    tmp_path, shared_data, monkeypatch
):
    import spf.eval.suites
    import spf.training.loop

    keep = tmp_path / "kept"
    cfg = _prepared(tmp_path, shared_data, **SEEDED, keep=str(keep))
    first = run_cell(cfg, _cell(cfg, "vanilla@sst2"))
    assert json.loads((keep / "base.json").read_text())["fingerprint"] == "name:tiny-llama"
    assert (
        json.loads((keep / "cells" / "vanilla__sst2" / "cell.json").read_text())["verdicts"]
        == first["verdicts"]
    )
    for seed in (0, 1):
        assert (keep / "cells" / "vanilla__sst2" / f"seed-{seed}" / "train_metrics.json").is_file()
    kept = sorted(keep.rglob("verdicts.jsonl.gz"))
    assert len(kept) == 2 * 2 * 2  # seeds × curve points × suites
    with gzip.open(kept[0], "rt", encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    assert rows and all(set(r) <= set(KEPT_FIELDS) for r in rows)  # no generated text is kept

    shutil.rmtree(cfg.work_dir)  # the next session: a fresh machine, the tracked copy only
    assert collect(cfg)["cells"]["vanilla@sst2"]["suites"] == first["suites"]  # the report, before any rerun
    cfg = _prepared(tmp_path, shared_data, **SEEDED, keep=str(keep))

    def refuse(*a, **k):
        raise AssertionError("nothing may be trained or evaluated again")

    monkeypatch.setattr(spf.training.loop, "train", refuse)
    monkeypatch.setattr(spf.eval.suites, "run_eval", refuse)
    again = run_cell(cfg, _cell(cfg, "vanilla@sst2"))
    assert again["verdicts"] == first["verdicts"] and again["suites"] == first["suites"]
    assert again["seeds"] == [0, 1] and again["train_by_seed"] == first["train_by_seed"]
    # a finished cell comes back as it was kept: its timings are the run that computed it, not the restore
    assert (again["total_seconds"], again["peak_rss_mb"]) == (first["total_seconds"], first["peak_rss_mb"])
    kept_cell = keep / "cells" / "vanilla__sst2" / "cell.json"
    assert json.loads(kept_cell.read_text())["total_seconds"] == first["total_seconds"]


def test_a_seed_with_a_missing_kept_evaluation_is_retrained_and_only_it(tmp_path, shared_data, monkeypatch):
    import spf.training.loop

    keep = tmp_path / "kept"
    cfg = _prepared(tmp_path, shared_data, **SEEDED, keep=str(keep))
    run_cell(cfg, _cell(cfg, "vanilla@sst2"))
    shutil.rmtree(cfg.work_dir)
    shutil.rmtree(keep / "cells" / "vanilla__sst2" / "seed-1" / "eval" / "step-1" / "harmful")
    (keep / "cells" / "vanilla__sst2" / "cell.json").unlink()
    cfg = _prepared(tmp_path, shared_data, **SEEDED, keep=str(keep))
    trained, real = [], spf.training.loop.train
    monkeypatch.setattr(
        spf.training.loop, "train", lambda t, cb=None: (trained.append(t.seed), real(t, cb))[1]
    )
    rec = run_cell(cfg, _cell(cfg, "vanilla@sst2"))
    assert trained == [1] and rec["seeds"] == [0, 1]
    assert (
        keep / "cells" / "vanilla__sst2" / "seed-1" / "eval" / "step-1" / "harmful" / "results.json"
    ).is_file()


def test_kept_evaluations_of_another_base_are_refused(tmp_path, shared_data):
    keep = tmp_path / "kept"
    cfg = _prepared(tmp_path, shared_data, **SEEDED, keep=str(keep))
    keep.mkdir()
    (keep / "base.json").write_text(json.dumps({"aligned": "runs/old", "fingerprint": "sha256:abc"}))
    with pytest.raises(KeptBaseMismatch, match=r"base\.json.*runs/old.*tiny-llama"):
        run_cell(cfg, _cell(cfg, "ref:aligned"))
    assert not (cfg.work_dir / "cells" / "ref__aligned" / "cell.json").exists()


def test_base_fingerprint_follows_the_weights(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"one")
    a = base_fingerprint(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")  # not weights
    assert base_fingerprint(str(tmp_path)) == a
    (tmp_path / "model.safetensors").write_bytes(b"two")
    assert base_fingerprint(str(tmp_path)) != a and a.startswith("sha256:")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors"):
        base_fingerprint(str(tmp_path / "empty"))
    assert base_fingerprint("smollm2-135m-instruct") == "name:smollm2-135m-instruct"


@pytest.mark.parametrize("where", ["work", "work/kept", "."])
def test_keep_inside_or_around_the_work_folder_is_refused(tmp_path, shared_data, where):
    path = _tiny(tmp_path, shared_data)
    cfg = yaml.safe_load(path.read_text())
    cfg["keep"] = str(tmp_path / where) if where != "." else str(tmp_path)
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(BenchConfigError, match=r"keep: .* apart from work"):
        load_bench_config(path)


def test_shipped_cpu_benchmark_keeps_its_evaluations_in_the_repository():
    cfg = load_bench_config(Path(__file__).resolve().parents[2] / "bench" / "cpu.yaml")
    assert cfg.keep is not None and not cfg.keep.startswith("runs/")


def test_a_rebuilt_base_that_answers_the_probe_alike_is_the_same_base(tmp_path):
    import torch

    from spf.models import tiny_llama

    model, tokenizer = tiny_llama(seed=3)
    base = tmp_path / "base" / "aligned"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    keep = Keep(tmp_path / "kept", tmp_path / "work", str(base))
    keep.check_base()
    first = json.loads((tmp_path / "kept" / "base.json").read_text())
    assert first["probe"].startswith("sha256:") and first["probe"] == base_probe(str(base))
    with torch.no_grad():  # a rounding-level rebuild: other bytes, same greedy answers
        model.model.layers[0].mlp.down_proj.weight[0, 0] *= 1 + 1e-6
    model.save_pretrained(base)
    assert base_fingerprint(str(base)) != first["fingerprint"]
    keep.check_base()
    assert json.loads((tmp_path / "kept" / "base.json").read_text())["equivalent"] == [
        base_fingerprint(str(base))
    ]
    with torch.no_grad():  # another model (its MLPs, not a rounding): refused
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.mul_(50.0)
    model.save_pretrained(base)
    with pytest.raises(KeptBaseMismatch, match="decides the probe differently"):
        keep.check_base()
